"""NeMo Aligner's script-level API at its module paths: its own DPO script and its API page's example run here."""

import math

import pytest
import torch

from training_workers import api_page_example, nemo_aligner_script_job, train_job

# Small batches of the embedded default model and data: the point is the API, not the model.
TINY = ["model.micro_batch_size=2", "model.global_batch_size=4", "trainer.dpo.max_steps=3",
        "trainer.dpo.val_check_interval=3", "trainer.dpo.limit_val_batches=1"]
LN2_FP32 = torch.tensor(math.log(2), dtype=torch.float32).item()


def series(records, key):
    return [r[key] for r in records if key in r]


def test_nemo_aligner_train_script_trains_as_our_example(dist_pool, tmp_path):
    nemo = dist_pool.run(1, nemo_aligner_script_job, str(tmp_path / "nemo"),
                         [*TINY, "exp_manager.create_checkpoint_callback=False"])[0]
    ours = dist_pool.run(1, train_job, str(tmp_path / "ours"), [*TINY, "exp_manager.create_checkpoint_callback=False"])[0]
    losses = series(nemo, "train/loss")
    assert len(losses) == 3 and losses[0] == LN2_FP32
    assert len(series(nemo, "val/loss")) == 1
    # The same job: the same shuffled batches and optimizer give the same training losses.
    assert losses == pytest.approx(series(ours, "train/loss"), rel=1e-6)
    assert series(nemo, "train/consumed_samples") == [4, 8, 12]


def test_api_page_example_runs(dist_pool):
    result = dist_pool.run(1, api_page_example, ["model.micro_batch_size=2", "model.global_batch_size=4",
                                                 "trainer.dpo.max_steps=2", "trainer.dpo.val_check_interval=2",
                                                 "trainer.dpo.limit_val_batches=1"])[0]
    assert series(result["records"], "train/loss")[0] == LN2_FP32
    assert len(series(result["records"], "train/loss")) == 2
    assert math.isfinite(result["val_loss"]) and "acc" in result["val_metrics"]
    assert isinstance(result["eos_id"], int)
    assert result["state"]["step"] == 2 and result["state"]["consumed_samples"] == 8
    assert result["test_ds"] is None  # no test file given


def test_refusals_name_what_is_not_supported_yet():
    from omegaconf import OmegaConf

    from nemo_dpo.data.nlp.builders import build_dataloader, build_train_valid_test_dpo_packed_datasets
    from nemo_dpo.data.nlp.datasets import DPOPackedDataset
    from nemo_dpo.utils.train_script_utils import init_peft

    with pytest.raises(ValueError, match="needs data_impl='packed_jsonl', got 'jsonl'"):
        build_train_valid_test_dpo_packed_datasets(None, None, "jsonl", None, None, 64, 0, None)
    with pytest.raises(ValueError, match=r"^x\.npy: cannot read"):
        DPOPackedDataset(None, None, "train", "x.npy", None, None, 64, 0)
    with pytest.raises(ValueError, match=r"model.peft.peft_scheme='ptuning'; valid: none, lora"):
        init_peft(None, OmegaConf.create({"peft": {"peft_scheme": "ptuning", "restore_from_path": None}}))
    with pytest.raises(FileNotFoundError, match="restore_from_path=nowhere: not a LoRA adapter folder"):
        init_peft(None, OmegaConf.create({"peft": {"peft_scheme": "lora", "restore_from_path": "nowhere"}}))
    init_peft(None, OmegaConf.create({"peft": {"peft_scheme": "none", "restore_from_path": None}}))
    with pytest.raises(NotImplementedError, match="load_gbs=False"):
        build_dataloader(None, [], 0, 1, 1, load_gbs=False)


def test_timer_and_logger_wrapper():
    from nemo_dpo.utils.distributed import Timer
    from nemo_dpo.utils.train_script_utils import CustomLoggerWrapper

    timer = Timer("00:01:00:00")
    timer.start_time()
    assert 3590 < timer.get_time_remaining() <= 3600 and timer.get_time_elapsed() >= 0
    assert Timer(None).max_seconds is None

    class Recorder:
        def __init__(self):
            self.calls = []

        def log_metrics(self, metrics, step):
            self.calls.append((metrics, step))

        def finalize(self):
            self.calls.append("finalized")

    recorder = Recorder()
    wrapper = CustomLoggerWrapper([recorder, object()])  # loggers without a method are skipped
    wrapper.log_metrics({"loss": 1.0}, step=3, prefix="train/")
    wrapper.log_hyperparams({"a": 1})
    wrapper.finalize()
    assert recorder.calls == [({"train/loss": 1.0}, 3), "finalized"]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=str)
def test_trainer_takes_nemo_sampler_and_plain_adamw_with_the_same_losses(dist_pool, tmp_path, tp, pp):
    from dpo_workers import synthetic_pairs, train_dpo

    items = synthetic_pairs(14)
    # No weight decay: megatron's optimizer exempts biases and norms from it, a plain AdamW over all
    # parameters does not. Clipping at 1.0 is active (norms of about 5).
    optim = {"weight_decay": 0.0}
    runs = {kind: dist_pool.run(2, train_dpo, tp, pp, 2, 4, 3, items, str(tmp_path / kind), None, 32, optim,
                                kind == "nemo")[0]["records"]
            for kind in ("ours", "nemo")}
    assert len(series(runs["nemo"], "train/loss")) == 3
    for key in ("train/loss", "train/grad_norm", "train/acc", "val/loss"):
        assert series(runs["nemo"], key) == pytest.approx(series(runs["ours"], key), rel=1e-5), key
    assert series(runs["nemo"], "train/loss")[-1] < series(runs["nemo"], "train/loss")[0]
