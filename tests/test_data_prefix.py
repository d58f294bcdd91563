"""``model.data.data_prefix`` in NeMo Aligner's forms, weighted blends, data_impl and files that are not JSONL."""

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from nemo_dpo.algorithms.dpo import DPOTrainer
from nemo_dpo.data import (
    BlendedDataset,
    DataPrefixError,
    MegatronPretrainingRandomBatchSampler,
    PreferenceDataError,
    load_tokenizer,
)
from nemo_dpo.data.blending import blending_order
from nemo_dpo.training import DEFAULT_DATA_DIR, build_dataset, check_data_impl, compose_config
from nemo_dpo.training.data import build_val_dataloader

NEMO_ALIGNER_DATA = Path(__file__).resolve().parent / "data" / "nemo_aligner_dpo.jsonl"
SEQ_LENGTH = 64


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_DATA_DIR.parent / "default_model" / "tokenizer")


def model_cfg(data_prefix, **data):
    """The part of ``model`` the dataset builders read, with ``data_prefix`` as given."""
    cfg = OmegaConf.create({"seed": 1234, "encoder_seq_length": SEQ_LENGTH, "micro_batch_size": 8,
                            "global_batch_size": 8, "data": {"data_impl": "jsonl", "seq_length": SEQ_LENGTH,
                                                             "num_workers": 0, **data}})
    cfg.data.data_prefix = data_prefix
    return cfg


def items_of(dataset) -> list[tuple]:
    return [(tuple(item["chosen"].tolist()), tuple(item["rejected"].tolist())) for item in dataset]


def write_pairs(path: Path, tag: str, count: int) -> Path:
    with open(path, "w") as out:
        for i in range(count):
            out.write(json.dumps({"prompt": f"{tag} {i}?", "chosen_response": f"{tag} yes",
                                  "rejected_response": f"{tag} no"}) + "\n")
    return path


def test_every_data_prefix_form_builds_the_same_dataset(tokenizer):
    path = str(NEMO_ALIGNER_DATA)
    reference = items_of(build_dataset(model_cfg({"train": path}), tokenizer, "train"))
    assert len(reference) == 32
    forms = {
        "string": path,
        "one-element list": [path],
        "dict of lists": {"train": [path], "validation": [path], "test": [path]},
        "dict of strings": {"train": path, "validation": path, "test": path},
        "blend of one": [1.0, path],
    }
    for name, form in forms.items():
        cfg = model_cfg(form)
        # OmegaConf turned the list and dict forms into ListConfig / DictConfig.
        assert OmegaConf.is_config(cfg.data.data_prefix) or isinstance(form, str)
        for split in ("train", "validation", "test"):  # a path or list outside a dict serves every split
            assert items_of(build_dataset(cfg, tokenizer, split)) == reference, (name, split)
    # NeMo Aligner's command line: a dict of one-element lists, as Hydra composes it.
    composed = compose_config([f"model.data.data_prefix={{train: [{path}], validation: [{path}]}}"]).model
    assert OmegaConf.is_list(composed.data.data_prefix.train)
    composed.data.seq_length = SEQ_LENGTH
    assert items_of(build_dataset(composed, tokenizer, "validation")) == reference
    assert build_dataset(composed, tokenizer, "test") is None


def test_blending_order_is_nemos_greedy_rule():
    # By hand: each sample goes to the dataset furthest behind w_j * max(i, 1), the first on a tie.
    assert blending_order([0.5, 0.3, 0.2], 10).tolist() == [0, 1, 2, 0, 1, 0, 2, 0, 1, 0]
    assert blending_order([5, 3, 2], 10).tolist() == blending_order([0.5, 0.3, 0.2], 10).tolist()
    assert blending_order([0, 1], 4).tolist() == [1, 1, 1, 1]  # NeMo would draw one sample from a weight 0


def test_a_blend_draws_in_proportion_to_its_weights_over_an_epoch(tmp_path, tokenizer):
    a, b = write_pairs(tmp_path / "a.jsonl", "alpha", 40), write_pairs(tmp_path / "b.jsonl", "beta", 40)
    blend = build_dataset(model_cfg({"train": [0.8, str(a), 0.2, str(b)]}), tokenizer, "train")
    assert isinstance(blend, BlendedDataset) and len(blend) == 80  # one epoch: the files' records together
    from_a = set(items_of(build_dataset(model_cfg(str(a)), tokenizer, "train")))
    from_b = set(items_of(build_dataset(model_cfg(str(b)), tokenizer, "train")))
    sampler = MegatronPretrainingRandomBatchSampler(total_samples=len(blend), consumed_samples=0, micro_batch_size=8,
                                                    global_batch_size=8, data_parallel_rank=0, data_parallel_size=1,
                                                    seed=1234)
    drawn = [blend[i] for batch in sampler for i in batch]
    files = Counter("a" if key in from_a else "b" if key in from_b else "?" for key in items_of(drawn))
    # The greedy rule keeps each file's count within 1 of weight x samples; an epoch of the
    # sampler leaves out at most global_batch_size - 1 samples (none here: 80 = 10 x 8).
    n = len(drawn)
    tolerance = 1 + (8 - 1) * (n != len(blend))
    assert n == 80 and files["?"] == 0
    assert abs(files["a"] - 0.8 * n) <= tolerance and abs(files["b"] - 0.2 * n) <= tolerance, files
    # Scaled weights blend the same; the records each file gives are a permutation seeded by model.seed.
    again = build_dataset(model_cfg({"train": [4, str(a), 1, str(b)]}), tokenizer, "train")
    assert again.dataset_index.tolist() == blend.dataset_index.tolist()
    assert again.sample_index.tolist() == blend.sample_index.tolist()
    reseeded = BlendedDataset(blend.datasets, [0.8, 0.2], seed=1)
    assert reseeded.dataset_index.tolist() == blend.dataset_index.tolist()
    assert reseeded.sample_index.tolist() != blend.sample_index.tolist()
    # The 16 draws from b are 16 different records, not b's first 16 lines.
    assert sorted(blend.sample_index[blend.dataset_index == 1].tolist()) != list(range(16))
    assert len(set(blend.sample_index[blend.dataset_index == 1].tolist())) == 16


def test_a_file_smaller_than_its_share_repeats_every_record_evenly():
    blend = BlendedDataset([list(range(10)), list(range(100, 130))], [0.8, 0.2], seed=0)
    assert blend.counts == [32, 8]
    uses = Counter(blend[i] for i in range(len(blend)) if blend.locate(i)[0] == 0)
    assert sorted(uses) == list(range(10)) and set(uses.values()) == {3, 4}


def test_train_only_data_trains_without_validation_and_says_so(tokenizer, caplog):
    cfg = model_cfg({"train": [str(NEMO_ALIGNER_DATA)], "validation": None, "test": None})
    train_ds = build_dataset(cfg, tokenizer, "train")
    assert build_dataset(cfg, tokenizer, "validation") is None
    with caplog.at_level(logging.WARNING, logger="nemo_dpo.training.data"):
        val_dl = build_val_dataloader(cfg, None)
    assert len(val_dl) == 0 and list(val_dl) == []
    assert [r.getMessage() for r in caplog.records] == [
        "no validation data (model.data.data_prefix.validation is null): training without validation"]
    sampler = MegatronPretrainingRandomBatchSampler(total_samples=len(train_ds), consumed_samples=0,
                                                    micro_batch_size=8, global_batch_size=8, data_parallel_rank=0,
                                                    data_parallel_size=1, seed=0)
    trainer = DPOTrainer(OmegaConf.create({"max_epochs": 1, "max_steps": 3, "val_check_interval": 1}), None, None,
                         None, type("Loader", (), {"batch_sampler": sampler})(), val_dl, None, None, None, None, None)
    assert trainer.limit_val_batches == 0 and trainer.max_steps == 3  # no validation step is ever scheduled


@pytest.mark.parametrize("make_prefix, message", [
    (lambda a, b: {"train": [0.8, a, 0.2]},
     "model.data.data_prefix.train has 3 items: give one path, or a blend [weight, path, weight, path, ...]"),
    (lambda a, b: {"train": [a, b]}, "model.data.data_prefix.train[0]='{a}': expected a weight"),
    (lambda a, b: {"train": [0.5, a, "heavy", b]}, "model.data.data_prefix.train[2]='heavy': expected a weight"),
    (lambda a, b: {"train": [True, a, 1, b]}, "model.data.data_prefix.train[0]=True: expected a weight"),
    (lambda a, b: {"train": [0.5, a, -0.5, b]},
     "model.data.data_prefix.train[2]=-0.5: a weight must be a finite number >= 0"),
    (lambda a, b: {"train": [0, a, 0, b]}, "model.data.data_prefix.train: the blend's weights sum to 0"),
    (lambda a, b: {"train": [1, a, 1, b + ".missing"]},
     "model.data.data_prefix.train[3]='{b}.missing': file not found"),
    (lambda a, b: {"train": [a], "validation": [b + ".missing"]},
     "model.data.data_prefix.validation[0]='{b}.missing': file not found"),
    (lambda a, b: b + ".missing", "model.data.data_prefix='{b}.missing': file not found"),
    (lambda a, b: {"train": [[a]]}, "model.data.data_prefix.train[0]=['{a}']: expected the path of a data file"),
    (lambda a, b: {"train": []}, "model.data.data_prefix.train has 0 items"),
    (lambda a, b: {"train": a, "validation_2": b},
     "model.data.data_prefix has unknown key 'validation_2'; valid keys: train, validation, test"),
])
def test_bad_data_prefix_forms_get_one_line_naming_key_and_item(tmp_path, tokenizer, make_prefix, message):
    a, b = str(write_pairs(tmp_path / "a.jsonl", "a", 2)), str(write_pairs(tmp_path / "b.jsonl", "b", 2))
    cfg = model_cfg(make_prefix(a, b))
    with pytest.raises(DataPrefixError) as err:
        for split in ("train", "validation"):
            build_dataset(cfg, tokenizer, split)
    text = str(err.value)
    assert text.startswith(message.format(a=a, b=b)) and "\n" not in text, text


def test_unknown_data_impls_are_refused_in_one_line():
    check_data_impl(OmegaConf.create({"data_impl": "packed_jsonl"}))
    with pytest.raises(ValueError, match=r"^model\.data\.data_impl='json' is not supported; valid values: "
                                         r"\['jsonl', 'packed_jsonl'\]$"):
        check_data_impl(OmegaConf.create({"data_impl": "json"}))


def _npy(path: Path) -> Path:
    np.save(path, np.array([{"input_ids": [1, 2, 3]}], dtype=object), allow_pickle=True)
    return path


@pytest.mark.parametrize("make_file, message", [
    (lambda tmp: _npy(tmp / "packed.npy"), "{path}: a NumPy .npy file, not JSONL text"),
    (lambda tmp: (tmp / "latin1.jsonl").write_bytes(
        b'{"prompt": "caf\xe9", "chosen_response": "a", "rejected_response": "b"}\n') and tmp / "latin1.jsonl",
     "{path}:1: invalid UTF-8 (byte 0xe9 at offset 15 of the line, 15 of the file); JSONL data must be UTF-8"),
    (lambda tmp: (tmp / "zeros.jsonl").write_bytes(b"\x00" * 64) and tmp / "zeros.jsonl",
     "{path}:1: a NUL byte at offset 0 of the line; JSONL data is text, is this a binary file?"),
])
def test_a_file_that_is_not_jsonl_text_gets_one_line_naming_it(tmp_path, tokenizer, make_file, message):
    path = make_file(tmp_path)
    with pytest.raises(PreferenceDataError) as err:
        build_dataset(model_cfg({"train": [str(path)]}), tokenizer, "train")
    text = str(err.value)
    assert text.startswith(message.format(path=path)) and "\n" not in text, text


def test_nemo_aligner_data_prefix_dict_trains(dist_pool, tmp_path):
    """One short job given its data as NeMo Aligner's functional test does: a dict of one-element lists."""
    from training_workers import train_job

    path = NEMO_ALIGNER_DATA
    overrides = [f"model.data.data_prefix={{train: [{path}], validation: [{path}]}}", "model.global_batch_size=8",
                 "model.micro_batch_size=4", "trainer.dpo.max_steps=2", "trainer.dpo.val_check_interval=2",
                 "trainer.dpo.limit_val_batches=1", "exp_manager.create_checkpoint_callback=False"]
    records = dist_pool.run(1, train_job, str(tmp_path / "logs"), overrides)[0]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    val_losses = [r["val/loss"] for r in records if "val/loss" in r]
    assert len(losses) == 2 and len(val_losses) == 1 and all(np.isfinite(losses + val_losses))
