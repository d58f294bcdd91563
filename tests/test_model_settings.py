"""model.dpo settings and model.optim keys: one default each, unknown or unhonoured keys answered."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from nemo_dpo.models.nlp.gpt.architecture import precision_dtype
from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import DPOSettings
from nemo_dpo.optim.settings import OptimizerSettings

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


def test_optimizer_names_and_nemo_ddp_keys_map_onto_megatron():
    def settings(**optim):
        return OptimizerSettings.from_config(OmegaConf.create({"lr": 1e-3, **optim}), precision_dtype("bf16-mixed"))

    sharded = settings(name="distributed_fused_adam", bucket_cap_mb=2, overlap_grad_sync=True, grad_sync_dtype="bf16")
    ddp, megatron = sharded.ddp_config(), sharded.megatron_config()
    assert ddp.use_distributed_optimizer and megatron.use_distributed_optimizer and megatron.bf16
    assert megatron.params_dtype is torch.bfloat16 and megatron.main_params_dtype is torch.float32
    assert ddp.bucket_size == 2 * 1024 * 1024 // 4 and ddp.overlap_grad_reduce and not ddp.grad_reduce_in_fp32
    assert not settings(name="distributed_fused_adam", use_distributed_optimizer=False).use_distributed_optimizer
    assert settings(name="fused_adam", use_distributed_optimizer=True).use_distributed_optimizer
    plain = settings(name="adamw")
    assert not plain.use_distributed_optimizer and plain.ddp_config().grad_reduce_in_fp32
    assert plain.ddp_config().bucket_size is None
    for optim, message in [
        ({"name": "sgd"}, r"model.optim.name='sgd' is not supported; valid: \['adamw'"),
        ({"contiguous_grad_buffer": False}, "model.optim.contiguous_grad_buffer=False is not supported"),
        ({"overlap_param_sync": True}, "model.optim.overlap_param_sync=True is not supported"),
        ({"grad_sync_dtype": "fp16"}, "model.optim.grad_sync_dtype='fp16' is not supported"),
        ({"bucket_cap_mb": 0}, "model.optim.bucket_cap_mb=0 must be a number > 0 or null"),
        ({"use_distributed_optimizer": "yes"}, "model.optim.use_distributed_optimizer='yes' must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            settings(**optim)
    with pytest.raises(ValueError, match=r"model.precision: fp16 \(with a loss scaler\) is not supported; use bf16 or 32"):
        OptimizerSettings.from_config(OmegaConf.create({"lr": 1e-3}), precision_dtype(16))
