"""model.dpo settings and model.optim names: one default each, unknown or unhonoured keys answered."""

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import DPOSettings
from nemo_dpo.optim.optimizer import ReplicatedAdamW, build_optimizer

CONFIG = Path(__file__).resolve().parent.parent / "conf" / "gpt_dpo.yaml"


def test_yaml_states_the_code_defaults():
    cfg = OmegaConf.load(CONFIG)
    dpo = OmegaConf.to_container(cfg.model.dpo, resolve=False)
    # Interpolations in the YAML stand for the code's "follow the other key" defaults (None).
    assert dpo.pop("sft_average_log_probs") == "${.preference_average_log_probs}"
    assert dpo.pop("log_prob_forward_micro_batch_size") == "${model.micro_batch_size}"
    defaults = DPOSettings()
    assert dpo == {key: getattr(defaults, key) for key in dpo}
    assert defaults.sft_average_log_probs == defaults.preference_average_log_probs
    assert DPOSettings(preference_average_log_probs=True).sft_average_log_probs is True
    assert defaults.log_prob_forward_micro_batch_size is None


def test_unknown_and_impossible_settings_are_refused():
    with pytest.raises(ValueError, match=r"model.dpo: unknown key\(s\) beta; valid: ref_policy_kl_penalty"):
        DPOSettings.from_config({"beta": 0.1})
    with pytest.raises(ValueError, match="unknown preference_loss 'dpoo'"):
        DPOSettings.from_config({"preference_loss": "dpoo"})
    with pytest.raises(ValueError, match="cannot both be 0"):
        DPOSettings.from_config({"preference_loss_weight": 0, "sft_loss_weight": 0})
    assert DPOSettings.from_config(None) == DPOSettings()


def _chunk():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def test_sharded_optimizer_name_warns_that_state_is_replicated(caplog):
    cfg = OmegaConf.create({"name": "distributed_fused_adam", "lr": 1e-3})
    with caplog.at_level(logging.WARNING, logger="nemo_dpo.optim.optimizer"):
        optimizer = build_optimizer([_chunk()], cfg)
    assert isinstance(optimizer, ReplicatedAdamW)
    assert "distributed_fused_adam: the optimizer state is not sharded yet" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nemo_dpo.optim.optimizer"):
        build_optimizer([_chunk()], OmegaConf.create({"name": "fused_adam", "lr": 1e-3}))
    assert caplog.text == ""
    with pytest.raises(ValueError, match=r"model.optim.name='sgd' is not supported; valid: \['adamw'"):
        build_optimizer([_chunk()], OmegaConf.create({"name": "sgd", "lr": 1e-3}))
