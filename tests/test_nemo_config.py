"""NeMo Aligner's own DPO config runs as is; every key of it is acted on, warned about or refused."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nemo_dpo.checkpoint.pretrained import DEFAULT_MODEL_DIR
from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import DPOSettings
from nemo_dpo.training.config import CONFIG_DIR, CONFIG_NAME, _key_paths, compose_config, prepare_config
from nemo_dpo.training.data import DEFAULT_DATA_DIR
from nemo_dpo.training.nemo_keys import ACTED, NEMO_KEYS, REFUSED, WARNED, key_table_rows, rule_for
from training_workers import config_file_train_job

NEMO_DIR = Path(__file__).parent / "fixtures" / "nemo_aligner"
NEMO_YAML = NEMO_DIR / "gpt_dpo.yaml"
NEMO_FORMAT_DATA = Path(__file__).parent / "data" / "nemo_aligner_dpo.jsonl"
# What a user must give: the data, and the launch size (the YAML says 8 nodes x 8 GPUs; the test
# starts one process). The model: the embedded default, as restore_from_path is null.
MUST_GIVE = [f"model.data.data_prefix={{train: {DEFAULT_DATA_DIR / 'train.jsonl'}, "
             f"validation: {DEFAULT_DATA_DIR / 'validation.jsonl'}}}", "trainer.num_nodes=1", "trainer.devices=1"]


def nemo_config(*overrides: str, log_dir="/tmp/unused"):
    return compose_config([f"exp_manager.explicit_log_dir={log_dir}", *MUST_GIVE, *overrides],
                          config_dir=NEMO_DIR, config_name="gpt_dpo")


def nemo_yaml_keys() -> dict[str, object]:
    tree = OmegaConf.to_container(OmegaConf.load(NEMO_YAML), resolve=False)
    tree.pop("defaults")
    return _key_paths(tree)


def test_nemo_aligner_yaml_runs_three_steps_in_bf16(dist_pool, tmp_path):
    overrides = [f"exp_manager.explicit_log_dir={tmp_path}", *MUST_GIVE, "trainer.dpo.max_steps=3",
                 "model.global_batch_size=4", "model.micro_batch_size=2", "trainer.dpo.val_check_interval=3",
                 "trainer.dpo.limit_val_batches=1", "model.data.seq_length=64",
                 "exp_manager.create_checkpoint_callback=False"]  # sizes for a test; not needed to run
    result = dist_pool.run(1, config_file_train_job, str(NEMO_DIR), "gpt_dpo", overrides)[0]
    assert len([r for r in result["metrics"] if "train/loss" in r]) == 3
    # trainer.precision: bf16, not an fp32 fallback.
    fp32 = {name for name, dtype in result["dtypes"].items() if dtype != "torch.bfloat16"}
    assert not fp32 and "torch.bfloat16" in result["dtypes"].values(), fp32
    warned = [m for m in result["warnings"] if "no effect in nemo-dpo" in m]
    assert warned and all("\n" not in m for m in result["warnings"])
    for key in ("model.mcore_gpt", "trainer.accelerator", "model.data.index_mapping_dir", "precision"):
        assert any(m.startswith(key + ":") or f", {key}:" in m for m in warned), key
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert saved.model.dpo.ref_policy_kl_penalty == 0.2 and saved.model.optim.name == "distributed_fused_adam"


def test_every_key_of_nemo_aligners_yaml_is_acted_on_warned_or_refused(caplog):
    keys = nemo_yaml_keys()
    with caplog.at_level(logging.WARNING, logger="nemo_dpo.training.config"):
        prepare_config(nemo_config())
    ours = _key_paths(OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{CONFIG_NAME}.yaml"), resolve=False))
    for key, value in keys.items():
        found = rule_for(key)
        if found is None:
            # Only parents (their leaves have rules) and our own keys may lack a rule.
            assert isinstance(value, dict) or key in ours, f"{key} is in no table"
            continue
        rule = found[1]
        assert rule.kind in (ACTED, WARNED, REFUSED) and rule.reason
        if rule.kind == WARNED:
            assert any(key in record.getMessage() for record in caplog.records), f"{key} was not warned about"
        if rule.kind == REFUSED:
            # NeMo's own value is the "off" one; any other stops the run naming the key.
            assert rule.problem(OmegaConf.select(nemo_config(), key), nemo_config()) is None
    assert all(len(r.getMessage().splitlines()) == 1 for r in caplog.records)


@pytest.mark.parametrize("override,message", [
    ("++exp_manager.create_mlflow_logger=True", "exp_manager.create_mlflow_logger=True: MLflow logging is not supported"),
    ("++exp_manager.wandb_logger_kwargs.log_model=True", "log_model=True: checkpoints are not uploaded to W&B"),
    ("model.peft.lora_tuning.weight_tying=True",
     "model.peft.lora_tuning.weight_tying=True: one adapter shared by every layer is not supported"),
    ("model.peft.lora_tuning.position_embedding_strategy=add",
     "model.peft.lora_tuning.position_embedding_strategy='add': only used with weight_tying"),
    ("model.peft.restore_from_ckpt.checkpoint_dir=/a",
     "restore_from_ckpt.checkpoint_dir='/a': resume a LoRA run with exp_manager.resume_from_checkpoint"),
    ("model.data.splits_string='900,50,50'", "model.data.splits_string='900,50,50': splitting one file"),
    ("exp_manager.checkpoint_callback_params.always_save_nemo=True", "writes no .nemo files"),
    ("++model.mcore_gpt=false", "model.mcore_gpt=False: the legacy (non-megatron-core) GPT model"),
    ("++model.fp8=true", "model.fp8=True: fp8 is not supported yet"),
    ("++model.fsdp=true", "torch FSDP is not supported"),
    ("++model.restore_from_path=/m.nemo", "set pretrained_checkpoint.restore_from_path"),
    ("++model.ffn_dropout=0.1", "dropout inside the MLP is not supported"),
    ("++model.expert_model_parallel_size=2", "mixture-of-experts models are not supported"),
    ("++precision=32", "precision=32: differs from trainer.precision"),
    ("++trainer.max_steps=7", "trainer.max_steps=7: differs from trainer.dpo.max_steps"),
    ("exp_manager.max_time_per_run=00:01:00:00", "differs from trainer.max_time"),
])
def test_refused_keys_say_why_on_one_line(override, message):
    with pytest.raises(ValueError, match="^refused config key") as raised:
        prepare_config(nemo_config(override))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_every_refused_key_of_the_table_refuses_something():
    refused = [pattern for pattern, rule in NEMO_KEYS.items() if rule.kind == REFUSED]
    assert len(refused) >= 20
    assert all(kind in (ACTED, WARNED, REFUSED) for _, kind, _ in key_table_rows())


@pytest.mark.parametrize("override,suggestion", [
    ("++model.dpo.betaa=0.1", "model.dpo.ref_policy_kl_penalty"),
    ("++model.dpo.beta=0.1", "model.dpo.ref_policy_kl_penalty"),
    ("++model.optim.learning_rate=1e-6", "model.optim.lr"),
    ("++model.lr=1e-6", "model.optim.lr"),
    ("++trainer.dpo.max_step=3", "trainer.dpo.max_steps"),
    ("++model.data.data_prefx=x", "model.data.data_prefix"),
])
def test_a_typo_fails_at_once_with_the_closest_key(override, suggestion):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"^unknown config key\(s\) ") as raised:
        prepare_config(nemo_config(override))
    assert time.perf_counter() - start < 10
    assert f"(did you mean {suggestion}?)" in str(raised.value) and "\n" not in str(raised.value)


def functional_test_overrides(data: Path, log_dir: Path) -> list[str]:
    """tests/functional/dpo.sh (with test_cases/dpo-llama3's extra key) applied literally; its defaults filled in."""
    return [
        "trainer.num_nodes=1", "trainer.devices=2", "++model.data.seq_length=128", "++model.global_batch_size=4",
        "++model.micro_batch_size=1", "++model.mcore_gpt=true", "++model.megatron_amp_O2=true",
        "++model.dpo.ref_policy_kl_penalty=0.1", "++model.dpo.log_prob_forward_micro_batch_size=1",
        "++model.dpo.average_log_probs=false", "++model.dpo.sft_loss_weight=0.1",
        "++model.dpo.preference_loss_weight=1.0", f"pretrained_checkpoint.restore_from_path={DEFAULT_MODEL_DIR}",
        f"model.data.data_prefix={{train: [{data}], validation: [{data}], test: [{data}]}}",
        "exp_manager.create_checkpoint_callback=False", "model.data.num_workers=2",
        "++model.tensor_model_parallel_size=1", "++model.pipeline_model_parallel_size=1",
        "trainer.dpo.max_steps=3", "trainer.dpo.val_check_interval=3", "trainer.dpo.limit_val_batches=8",
        "trainer.dpo.save_interval=0", f"exp_manager.explicit_log_dir={log_dir}",
        "++model.activations_checkpoint_granularity=full", "++model.activations_checkpoint_method=uniform",
        "++model.activations_checkpoint_num_layers=1", "++model.dist_ckpt_load_strictness=log_all",
        "++model.data.data_impl=jsonl",
    ]


def test_nemo_aligner_functional_test_overrides_train_three_steps(dist_pool, tmp_path):
    """Its torchrun of 2 processes, on NeMo Aligner-format JSONL given as {train: [path], ...}."""
    overrides = functional_test_overrides(NEMO_FORMAT_DATA, tmp_path)
    cfg = compose_config(overrides, config_dir=NEMO_DIR, config_name="gpt_dpo")
    prepare_config(cfg)
    # average_log_probs (read by NeMo Aligner neither) and dist_ckpt_* are warned about, then dropped.
    assert "average_log_probs" not in cfg.model.dpo and "dist_ckpt_load_strictness" not in cfg.model
    assert cfg.model.dpo.ref_policy_kl_penalty == 0.1 and cfg.model.activations_checkpoint_granularity == "full"
    assert cfg.model.precision == "bf16" and cfg.model.dpo.log_prob_chunk_size is None  # our default filled in
    result = dist_pool.run(2, config_file_train_job, str(NEMO_DIR), "gpt_dpo", overrides)[0]
    losses = [r["train/loss"] for r in result["metrics"] if "train/loss" in r]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert any("val/loss" in r for r in result["metrics"])


def test_ref_policy_kl_penalty_has_one_default():
    ours = OmegaConf.load(CONFIG_DIR / f"{CONFIG_NAME}.yaml").model.dpo.ref_policy_kl_penalty
    assert DPOSettings().ref_policy_kl_penalty == ours
