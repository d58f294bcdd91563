"""Bad config values are refused before training, each with one line naming the key."""

import logging
import re

import pytest
import torch
from omegaconf import OmegaConf

from nemo_dpo.models.nlp.gpt.architecture import GPTArchitecture
from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import DPOSettings
from nemo_dpo.optim.settings import OptimizerSettings
from nemo_dpo.optim.scheduler import build_scheduler
from nemo_dpo.training.config import CONFIG_DIR, CONFIG_NAME, check_config_keys, compose_config, validate_config
from test_train_gpt_dpo import run_in_pool
from training_workers import poisoned_train_job


@pytest.mark.parametrize("settings,message", [
    ({"ref_policy_kl_penalty": -0.1}, r"model.dpo.ref_policy_kl_penalty=-0.1 must be a finite number > 0"),
    ({"ref_policy_kl_penalty": 0.0}, r"model.dpo.ref_policy_kl_penalty=0.0 must be a finite number > 0"),
    ({"ref_policy_kl_penalty": float("nan")}, r"model.dpo.ref_policy_kl_penalty=nan must be"),
    ({"gt_reward_scale": float("inf")}, r"model.dpo.gt_reward_scale=inf must be a finite number$"),
    ({"sft_loss_weight": -1.0}, r"model.dpo.sft_loss_weight=-1.0 must be a finite number >= 0"),
    ({"log_prob_forward_micro_batch_size": 0}, r"log_prob_forward_micro_batch_size=0 must be a positive integer"),
])
def test_dpo_settings_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        DPOSettings.from_config(settings)


def _optimizer():
    """A torch optimizer with a decayed and an undecayed group, as the training optimizer has."""
    layer = torch.nn.Linear(3, 2)
    return torch.optim.AdamW([{"params": [layer.weight]}, {"params": [layer.bias], "weight_decay": 0.0}], lr=1e-3)


@pytest.mark.parametrize("optim,message", [
    ({"lr": -1e-3}, r"model.optim.lr=-0.001 must be a finite number > 0"),
    ({"lr": 0.0}, r"model.optim.lr=0.0 must be a finite number > 0"),
    ({"lr": float("nan")}, r"model.optim.lr=nan must be a finite number > 0"),
    ({"weight_decay": -0.1}, r"model.optim.weight_decay=-0.1 must be a finite number >= 0"),
    ({"betas": [0.9, 1.0]}, r"model.optim.betas=\[0.9, 1.0\] must be two numbers in \[0, 1\)"),
    ({"eps": 0}, r"model.optim.eps=0 must be a finite number > 0"),
])
def test_optimizer_values_refused(optim, message):
    with pytest.raises(ValueError, match=message):
        OptimizerSettings.from_config(OmegaConf.create({"name": "adamw", "lr": 1e-3, **optim}))


@pytest.mark.parametrize("sched,message", [
    ({"min_lr": 2e-3}, r"model.optim.sched.min_lr=0.002 must be a finite number in \[0, model.optim.lr=0.001\]"),
    ({"min_lr": -1e-5}, r"model.optim.sched.min_lr=-1e-05 must be"),
    ({"warmup_steps": -1}, r"model.optim.sched.warmup_steps=-1 must be an integer >= 0"),
    ({"constant_steps": 1.5}, r"model.optim.sched.constant_steps=1.5 must be an integer >= 0"),
])
def test_schedule_values_refused(sched, message):
    with pytest.raises(ValueError, match=message):
        build_scheduler(_optimizer(), OmegaConf.create({"name": "CosineAnnealing", **sched}), max_steps=10)


def test_warmup_past_the_run_warns_and_still_builds(caplog):
    with caplog.at_level(logging.WARNING, logger="nemo_dpo.optim.scheduler"):
        scheduler = build_scheduler(_optimizer(), OmegaConf.create({"name": "CosineAnnealing", "warmup_steps": 8,
                                                                   "constant_steps": 4}), max_steps=10)
    assert "warmup_steps (8) + constant_steps (4) exceed the run's 10 steps" in caplog.text
    assert scheduler.get_last_lr() == pytest.approx([1e-3 / 9] * 2)  # decayed and undecayed groups


def test_sequence_length_against_positions():
    learned = GPTArchitecture(2, 64, 4, position_embedding_type="learned_absolute", encoder_seq_length=32)
    assert learned.check_sequence_length(32) is None
    with pytest.raises(ValueError, match="seq_length=33 exceeds the 32 positions this model's learned position"):
        learned.check_sequence_length(33)
    rope = GPTArchitecture(2, 64, 4, position_embedding_type="rope", max_position_embeddings=32, encoder_seq_length=64)
    assert "seq_length=64 is beyond the 32 positions this RoPE model was trained for" in rope.check_sequence_length(64)
    assert rope.check_sequence_length(32) is None


def test_unknown_keys_in_a_yaml_file_are_refused_like_command_line_ones(tmp_path):
    config = OmegaConf.load(CONFIG_DIR / f"{CONFIG_NAME}.yaml")
    config.model.optim.foo_decay = 0.1
    config.exp_manager.create_mlflow_logger = True
    OmegaConf.save(config, tmp_path / "mine.yaml")
    cfg = compose_config([], config_dir=tmp_path, config_name="mine")
    with pytest.raises(ValueError, match=r"^unknown config key\(s\) model.optim.foo_decay \(did you mean "
                                         r"model.optim.weight_decay\?\): nemo-dpo does not act on them"):
        check_config_keys(cfg)
    del config.model.optim.foo_decay
    OmegaConf.save(config, tmp_path / "mine.yaml")
    cfg = compose_config([], config_dir=tmp_path, config_name="mine")
    with pytest.raises(ValueError, match=r"exp_manager.create_mlflow_logger=True: MLflow logging is not supported"):
        check_config_keys(cfg)
    # Keys the code reads beyond the YAML (architecture, builder settings) are known.
    check_config_keys(compose_config(["++model.num_layers=2", "++model.init_method_std=0.01"]))


def test_precision_outside_trainer_and_model_never_leaves_a_run_in_fp32_silently(caplog):
    # A root-level precision is not where NeMo reads it: refused unless it equals trainer.precision.
    with pytest.raises(ValueError, match=r"precision='bf16': differs from trainer.precision"):
        validate_config(compose_config(["+precision=bf16"]))
    bf16 = compose_config(["trainer.precision=bf16-mixed"])
    assert bf16.model.precision == "bf16-mixed"
    with caplog.at_level(logging.WARNING, logger="nemo_dpo.training.config"):
        validate_config(compose_config(["trainer.precision=bf16", "model.megatron_amp_O2=False"]))
    assert "model.megatron_amp_O2=False: bf16 runs use O2 here" in caplog.text
    with pytest.raises(ValueError, match="model.precision: fp16 .* is not supported; use bf16 or 32"):
        validate_config(compose_config(["trainer.precision=16"]))


@pytest.mark.parametrize("override,message", [
    ("++model.dropout=0.1", r"unknown config key\(s\) model.dropout"),
    ("model.dpo.ref_policy_kl_penalty=-1", r"model.dpo.ref_policy_kl_penalty=-1 must be a finite number > 0"),
    ("model.optim.sched.min_lr=1", r"model.optim.sched.min_lr=1 must be a finite number in \[0, model.optim.lr="),
    ("model.optim.lr=-1", r"model.optim.lr=-1 must be a finite number > 0"),
])
def test_a_run_with_a_bad_value_stops_naming_it(dist_pool, tmp_path, override, message):
    with pytest.raises(RuntimeError, match=message):
        run_in_pool(dist_pool, tmp_path, "trainer.dpo.max_steps=1", override)
    assert not (tmp_path / "metrics.jsonl").exists()  # no step ran


def test_non_finite_loss_names_step_samples_and_checkpoint_state(dist_pool, tmp_path):
    """With no checkpoint yet, the error says so and lists the global batch's dataset indices."""
    with pytest.raises(RuntimeError, match=r"NonFiniteLossError: step 1: non-finite loss \(nan\)") as raised:
        dist_pool.run(2, poisoned_train_job, str(tmp_path), ["trainer.dpo.max_steps=2", "model.global_batch_size=8",
                                                             "model.micro_batch_size=2"])
    message = raised.value.args[0].strip().splitlines()[-1]
    samples = [int(i) for i in re.search(r"on training samples \[([0-9, ]+)\]", message).group(1).split(",")]
    assert len(samples) == 8 and len(set(samples)) == 8 and samples == sorted(samples)  # both DP ranks' pairs
    assert "no checkpoint of this run exists yet" in message
