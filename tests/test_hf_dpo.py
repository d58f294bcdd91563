"""DPO starting from a Hugging Face folder, and its result exported back to transformers."""

import torch

from nemo_dpo.checkpoint.pretrained import DEFAULT_MODEL_DIR
from test_train_gpt_dpo import LN2_FP32, run_in_pool, series
from training_workers import export_hf


def export(dist_pool, checkpoint, out):
    dist_pool.run(1, export_hf, str(checkpoint), str(out))


def test_dpo_from_hf_folder_trains_and_exports(dist_pool, tmp_path):
    from transformers import AutoModelForCausalLM

    export(dist_pool, DEFAULT_MODEL_DIR, tmp_path / "hf_start")
    records = run_in_pool(
        dist_pool, tmp_path / "run", f"pretrained_checkpoint.restore_from_path={tmp_path / 'hf_start'}",
        "trainer.dpo.max_steps=20", "trainer.dpo.val_check_interval=20",
        "trainer.dpo.limit_val_batches=2",
    )
    losses = series(records, "train/loss")
    assert losses[0] == LN2_FP32 and min(losses[-5:]) < LN2_FP32, losses
    assert series(records, "val/loss")[-1] < LN2_FP32

    export(dist_pool, tmp_path / "run" / "checkpoints" / "final_model", tmp_path / "hf_trained")
    start = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_start")
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_trained")
    assert type(trained) is type(start)
    tokens = torch.tensor([[4, 25, 30, 40, 50, 60]])
    with torch.no_grad():
        assert not torch.equal(trained(tokens).logits, start(tokens).logits)  # DPO changed the weights
