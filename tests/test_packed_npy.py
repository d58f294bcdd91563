"""NeMo Aligner's packed DPO ``.npy`` files: safe reading, the format field by field, training on them."""

import pickle
from pathlib import Path

import numpy as np
import pytest

from nemo_dpo.data import DPOModelDataset, DPOPackedDataset, PackedDataError, dpo_custom_collate, load_tokenizer
from nemo_dpo.data.packed_npy import load_packed_npy, save_packed_npy
from scripts.prepare_packed_dpo_dataset import prepare
from test_train_gpt_dpo import LN2_FP32, NO_SAVE, run_in_pool, series

REPO = Path(__file__).resolve().parent.parent
NEMO_FIXTURE = REPO / "tests" / "fixtures" / "nemo_aligner" / "dummy_dpo_packed_90.npy"
DEFAULT_DATA = REPO / "nemo_dpo" / "assets" / "default_data" / "train.jsonl"
LLAMA3_VOCAB = 128256


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(REPO / "nemo_dpo" / "assets" / "default_model" / "tokenizer")


@pytest.fixture(scope="module")
def small_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:96]))
    return path


@pytest.fixture(scope="module")
def packed_file(small_jsonl, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed")
    return prepare(small_jsonl, tokenizer, 64, [192], out, "first_fit_shuffle", seed=7)[0]


def test_nemo_aligners_own_file_reads_as_its_pairs():
    dataset = DPOPackedDataset(None, None, "train", NEMO_FIXTURE, None, None, 4096, 1234)
    raw = np.load(NEMO_FIXTURE, allow_pickle=True)  # trusted: NeMo Aligner's own test file, to compare with
    assert dataset.num_packs == len(raw) == 100 and len(dataset) == 100  # one pair per pack in this file
    pack, first = raw[0], dataset[0]
    chosen_end, rejected_end = pack["seq_boundaries"][1:3]
    assert first["chosen"].tolist() == pack["input_ids"][:chosen_end]
    assert first["rejected_labels"].tolist() == pack["labels"][chosen_end:rejected_end]
    assert (first["chosen_length"], first["rejected_length"]) == tuple(pack["lengths"][:2])
    assert (first["chosen_reward"], first["rejected_reward"]) == tuple(pack["reward"][:2])
    DPOPackedDataset(None, type("T", (), {"vocab_size": LLAMA3_VOCAB})(), "train", NEMO_FIXTURE, None, None, 4096, 0)
    with pytest.raises(PackedDataError, match=r"^.*dummy_dpo_packed_90\.npy: pack 0: token id \d+ in 'input_ids' "
                                              r"is outside the vocabulary \[0, 1000\)$"):
        DPOPackedDataset(None, type("T", (), {"vocab_size": 1000})(), "train", NEMO_FIXTURE, None, None, 4096, 0)


def test_our_file_has_the_structure_nemo_aligners_reader_expects(packed_file, small_jsonl, tokenizer):
    raw = np.load(packed_file, allow_pickle=True)  # written by our script in this test
    assert raw.dtype == object and raw.ndim == 1
    jsonl = DPOModelDataset(None, tokenizer, "j", small_jsonl, None, None, 64, 0)
    expected = {}
    for i in range(len(jsonl)):
        item = jsonl[i]
        expected[tuple(item["chosen"][: item["chosen_length"]].tolist())] = item
    seen = 0
    for pack in raw:
        assert sorted(pack) == ["input_ids", "labels", "lengths", "reward", "seq_boundaries"]
        assert all(isinstance(pack[k], list) for k in pack)
        assert all(type(t) is int for k in ("input_ids", "labels", "lengths", "seq_boundaries") for t in pack[k])
        assert all(type(r) is float for r in pack["reward"])
        bounds = pack["seq_boundaries"]
        assert bounds[0] == 0 and bounds[-1] == len(pack["input_ids"]) == len(pack["labels"]) <= 192
        assert len(bounds) % 2 == 1 and len(pack["lengths"]) == len(pack["reward"]) == len(bounds) - 1
        assert pack["lengths"] == np.diff(bounds).tolist()
        for k in range(0, len(bounds) - 1, 2):
            chosen = pack["input_ids"][bounds[k]:bounds[k + 1]]
            item = expected[tuple(chosen)]  # each pair is one of the JSONL's, chosen then rejected
            rejected = pack["input_ids"][bounds[k + 1]:bounds[k + 2]]
            assert rejected == item["rejected"][: item["rejected_length"]].tolist()
            for side, start, end in (("chosen", bounds[k], bounds[k + 1]), ("rejected", bounds[k + 1], bounds[k + 2])):
                # Unshifted labels, -100 on the prompt: NeMo's reader drops the first label of each sequence.
                assert pack["labels"][start:end] == item[f"{side}_labels"][: end - start].tolist()
            assert pack["reward"][k:k + 2] == [item["chosen_reward"], item["rejected_reward"]] == [1.0, 0.0]
            seen += 1
    assert seen == len(jsonl)


def test_global_collate_fn_is_the_jsonl_collate_of_the_same_pairs(packed_file, tokenizer):
    dataset = DPOPackedDataset(None, tokenizer, "train", packed_file, None, None, 64, 0)
    packs = [dataset.pack(i) for i in range(3)]
    pairs = [dataset[i] for i in range(sum(len(p["lengths"]) // 2 for p in packs))]
    from_packs = dataset.global_collate_fn(packs, eos_id=tokenizer.eos_id)
    from_pairs = dpo_custom_collate(pairs, eos_id=tokenizer.eos_id)
    assert from_packs.keys() == from_pairs.keys()
    assert all((from_packs[k] == from_pairs[k]).all() for k in from_pairs)


class _Boom:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


def test_a_pickle_naming_anything_else_is_refused_unexecuted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = np.empty(1, dtype=object)
    evil[0] = {"input_ids": _Boom()}
    np.save(tmp_path / "evil.npy", evil, allow_pickle=True)
    with pytest.raises(PackedDataError, match=r"^\S*evil\.npy: refused to load: its pickled data references "
                                              r"(posix|os|nt)\.system, which a packed DPO file never needs"):
        load_packed_npy(tmp_path / "evil.npy")
    assert not (tmp_path / "PWNED").exists()
    np.save(tmp_path / "ints.npy", np.arange(4))
    with pytest.raises(PackedDataError,
                       match=r"ints\.npy: not a packed DPO \.npy file .* shape \(4,\) and dtype int64$"):
        load_packed_npy(tmp_path / "ints.npy")
    (tmp_path / "text.npy").write_text('{"prompt": "x"}\n')
    with pytest.raises(PackedDataError, match=r"text\.npy: not a packed DPO \.npy file"):
        load_packed_npy(tmp_path / "text.npy")
    raw = tmp_path / "raw.npy"
    with raw.open("wb") as f:  # a valid header over a pickle of something that is not a list of packs
        np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": (1,)})
        pickle.dump({"a": 1}, f)
    with pytest.raises(PackedDataError, match=r"raw\.npy: not a packed DPO \.npy file.*payload is a dict"):
        load_packed_npy(raw)


@pytest.mark.parametrize("change,message", [
    (lambda p: p.pop("reward"), r"missing key\(s\) \['reward'\]"),
    (lambda p: p.update(lengths=[p["lengths"][0] + 1, p["lengths"][1] - 1] + p["lengths"][2:]),
     r"'lengths' .* must equal the sequence lengths given by 'seq_boundaries'"),
    (lambda p: p["seq_boundaries"].__setitem__(-1, p["seq_boundaries"][-1] + 1),
     r"'seq_boundaries' must increase from 0 to len"),
    (lambda p: p.update(seq_boundaries=p["seq_boundaries"][:-1]), r"'seq_boundaries' .* for at least one pair"),
    (lambda p: p.update(labels=p["labels"][:-1]), r"'labels' has \d+ entries, 'input_ids' \d+"),
    (lambda p: p["input_ids"].__setitem__(0, -3), r"token id -3 in 'input_ids' is outside the vocabulary"),
    (lambda p: p["labels"].__setitem__(-1, 5), r"sequence \d+: 'labels' must be the token ids or -100"),
])
def test_bad_pack_structure_errors_name_file_and_pack(tmp_path, packed_file, change, message):
    packs = load_packed_npy(packed_file)
    change(packs[2])
    save_packed_npy(tmp_path / "bad.npy", packs)
    with pytest.raises(PackedDataError, match=rf"^\S*bad\.npy: pack 2: {message}") as err:
        DPOPackedDataset(None, None, "train", tmp_path / "bad.npy", None, None, 64, 0)
    assert "\n" not in str(err.value)


def test_rejected_not_following_its_chosen_is_refused(tmp_path, packed_file):
    packs = load_packed_npy(packed_file)
    pack = next(p for p in packs if len(p["lengths"]) >= 4)
    b = pack["seq_boundaries"]  # swap the first pair's rejected with the second pair's chosen
    seqs = [pack["input_ids"][s:e] for s, e in zip(b, b[1:])]
    prompt = pack["labels"].index(next(t for t in pack["labels"] if t != -100))
    # Swapping must change the pack: the fixture's first two pairs have different prompts.
    assert seqs[0][:prompt] != seqs[2][:prompt]
    labels = [pack["labels"][s:e] for s, e in zip(b, b[1:])]
    order = [0, 2, 1, 3] + list(range(4, len(seqs)))
    pack["input_ids"] = [t for i in order for t in seqs[i]]
    pack["labels"] = [t for i in order for t in labels[i]]
    pack["lengths"] = [len(seqs[i]) for i in order]
    pack["seq_boundaries"] = np.concatenate([[0], np.cumsum(pack["lengths"])]).tolist()
    save_packed_npy(tmp_path / "swapped.npy", packs)
    with pytest.raises(PackedDataError, match=r"swapped\.npy: pack \d+: pair 0: chosen and rejected \(sequences 0 "
                                              r"and 1\) must be consecutive and share their prompt$"):
        DPOPackedDataset(None, None, "train", tmp_path / "swapped.npy", None, None, 64, 0)


def test_a_packed_file_trains_like_the_jsonl_it_came_from(dist_pool, packed_file, small_jsonl, tokenizer, tmp_path):
    """Same pairs in the same order give the same losses; the script reorders pairs when packing,
    so the JSONL is rewritten in the packed file's pair order first."""
    packed = DPOPackedDataset(None, tokenizer, "train", packed_file, None, None, 64, 0)
    jsonl = DPOModelDataset(None, tokenizer, "j", small_jsonl, None, None, 64, 0)
    record_of = {tuple(jsonl[i]["chosen"][: jsonl[i]["chosen_length"]].tolist()): jsonl.indices[i]
                 for i in range(len(jsonl))}
    lines = small_jsonl.read_text().splitlines(keepends=True)
    reordered = tmp_path / "reordered.jsonl"
    reordered.write_text("".join(lines[record_of[tuple(packed[i]["chosen"].tolist())]] for i in range(len(packed))))
    common = [*NO_SAVE, "trainer.dpo.max_steps=3", "model.data.seq_length=64", "model.data.packing=true",
              "model.global_batch_size=8", "model.micro_batch_size=4"]
    runs = {}
    for impl, path in (("packed_jsonl", packed_file), ("jsonl", reordered)):
        prefix = f"model.data.data_prefix={{train:[{path}],validation:null,test:null}}"
        runs[impl] = run_in_pool(dist_pool, tmp_path / impl, f"model.data.data_impl={impl}", prefix, *common)
    losses = series(runs["packed_jsonl"], "train/loss")
    assert len(losses) == 3 and losses[0] == pytest.approx(LN2_FP32, abs=1e-6)  # packed sums round differently
    assert losses == series(runs["jsonl"], "train/loss")
    assert series(runs["packed_jsonl"], "train/grad_norm") == series(runs["jsonl"], "train/grad_norm")
