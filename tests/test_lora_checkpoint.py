"""LoRA checkpoints: adapters and optimizer only, resumed at another TP layout, exported by the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from nemo_dpo.checkpoint.pretrained import DEFAULT_MODEL_DIR
from nemo_dpo.checkpoint.training_checkpoint import read_trainer_state
from lora_workers import restored_adapters_as_peft
from test_train_gpt_dpo import run_in_pool
from training_workers import export_hf

LORA = ["model.peft.peft_scheme=lora", "model.peft.lora_tuning.adapter_dim=4",
        "model.peft.lora_tuning.target_modules=[attention,mlp_fc2]", "model.peft.lora_tuning.layer_selection=[2,4]",
        "model.optim.lr=2e-2", "model.optim.sched.warmup_steps=1"]
RUN = [*LORA, "trainer.dpo.max_steps=6", "trainer.dpo.save_interval=3", "trainer.dpo.val_check_interval=6",
       "trainer.dpo.limit_val_batches=1", "model.global_batch_size=16", "model.micro_batch_size=4",
       "exp_manager.checkpoint_callback_params.save_top_k=-1"]


def losses_by_step(records):
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.fixture(scope="module")
def saved_at_tp2(dist_pool, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("tp2")
    records = run_in_pool(dist_pool, log_dir, *RUN, "model.tensor_model_parallel_size=2", nproc=2)
    return log_dir, losses_by_step(records)


def test_checkpoint_holds_adapters_and_optimizer_only(saved_at_tp2):
    log_dir, _ = saved_at_tp2
    folder = next(f for f in (log_dir / "checkpoints").iterdir() if f.name.endswith("epoch=0") and "step=3" in f.name)
    names = sorted(p.name for p in folder.iterdir())
    assert "weights" not in names and {"adapters", "optimizer", "lora.json"} <= set(names)
    record = json.loads((folder / "lora.json").read_text())
    assert record["base_checkpoint"] is None  # the embedded default model
    assert record["lora_tuning"]["target_modules"] == ["attention", "mlp_fc2"]
    assert record["lora_tuning"]["layer_selection"] == [2, 4]
    # 2 layers x (qkv: 4 x 192 + 256 x 4, proj: 4 x 192 + 192 x 4, fc2: 4 x 512 + 192 x 4) fp32 values, Adam x2
    adapter_bytes = 4 * 2 * (4 * 192 + 256 * 4 + 4 * 192 + 192 * 4 + 4 * 512 + 192 * 4)
    sizes = {name: sum(p.stat().st_size for p in (folder / name).rglob("*") if p.is_file())
             for name in ("adapters", "optimizer")}
    # (plus megatron's per-piece headers and metadata); the base model's weights are 6.2 MiB.
    assert adapter_bytes <= sizes["adapters"] < 2 * adapter_bytes
    assert 2 * adapter_bytes <= sizes["optimizer"] < 4 * adapter_bytes


def resume_from_step3(dist_pool, checkpoints, tmp_path, *overrides):
    """Losses by step of a run resumed from the step-3 checkpoint among ``checkpoints`` (copied)."""
    shutil.copytree(checkpoints, tmp_path / "checkpoints")
    for folder in (tmp_path / "checkpoints").iterdir():
        if folder.name == "final_model" or read_trainer_state(folder)["step"] > 3:
            shutil.rmtree(folder)
    return losses_by_step(run_in_pool(dist_pool, tmp_path, *RUN, *overrides,
                                      "exp_manager.create_checkpoint_callback=False"))


def test_saved_at_tp2_resumes_at_tp1(dist_pool, saved_at_tp2, tmp_path):
    log_dir, saving_run = saved_at_tp2
    resumed = resume_from_step3(dist_pool, log_dir / "checkpoints", tmp_path)
    assert sorted(resumed) == [4, 5, 6]
    assert saving_run[6] < saving_run[1] - 0.01  # it trains
    for step in resumed:
        assert resumed[step] == pytest.approx(saving_run[step], abs=1e-6), step


def test_sharded_optimizer_saved_at_dp2_resumes_at_dp1(dist_pool, tmp_path):
    """megatron's DistributedOptimizer over the adapters only: its state reshards from DP=2 to DP=1."""
    sharded = "model.optim.name=distributed_fused_adam"
    saving_run = losses_by_step(run_in_pool(dist_pool, tmp_path / "dp2", *RUN, sharded, nproc=2))
    resumed = resume_from_step3(dist_pool, tmp_path / "dp2" / "checkpoints", tmp_path / "dp1", sharded)
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(saving_run[step], abs=1e-6), step


def test_lora_from_hf_folder_exports_merged_and_peft_folders_that_agree(dist_pool, tmp_path):
    """LoRA DPO from a Hugging Face folder; the CLI's PEFT adapter (on that folder) and merged model agree."""
    import transformers
    from peft import PeftModel

    dist_pool.run(1, export_hf, str(DEFAULT_MODEL_DIR), str(tmp_path / "base"))
    start = f"pretrained_checkpoint.restore_from_path={tmp_path / 'base'}"
    records = run_in_pool(dist_pool, tmp_path / "run", *LORA, start, "trainer.dpo.max_steps=4", "trainer.dpo.val_check_interval=4",
                          "trainer.dpo.limit_val_batches=1", "model.global_batch_size=16", "model.micro_batch_size=4")
    assert len(losses_by_step(records)) == 4
    final = str(tmp_path / "run" / "checkpoints" / "final_model")
    assert json.loads((tmp_path / "run" / "checkpoints" / "final_model" / "lora.json").read_text())[
        "base_checkpoint"] == str(tmp_path / "base")
    dist_pool.run(2, export_hf, final, str(tmp_path / "adapter"), "--tp", "2")
    dist_pool.run(1, export_hf, final, str(tmp_path / "merged"), "--merge-lora")
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    base_logits = base(tokens).logits.detach()
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter")(tokens).logits.detach()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(tokens).logits.detach()
    assert (adapted - base_logits).abs().max() > 1e-3  # the trained adapters change the model
    # Merged (W + sBA) and separate (Wx + sB(Ax)) round differently in fp32: 2e-6 of the logits'
    # scale measured (3e-5 on logits up to 17), against an adapter effect of 2.4.
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5 * adapted.abs().max().item())


def test_restore_from_path_starts_from_the_saved_adapters(dist_pool, saved_at_tp2, tmp_path):
    log_dir, _ = saved_at_tp2
    final = log_dir / "checkpoints" / "final_model"
    dist_pool.run(1, export_hf, str(final), str(tmp_path / "saved"))
    dist_pool.run(1, restored_adapters_as_peft, [*LORA, f"model.peft.restore_from_path={final}"],
                  str(tmp_path / "restored"))
    saved = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    restored = load_file(tmp_path / "restored" / "adapter_model.safetensors")
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    assert any(k.endswith("lora_B.weight") and saved[k].abs().max() > 0 for k in saved)  # trained, not the draw
