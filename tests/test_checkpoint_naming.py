"""Checkpoint folder names from exp_manager's filename pattern (Lightning's format)."""

from nemo_dpo.checkpoint.callback import format_checkpoint_name
from nemo_dpo.training import compose_config

PATTERN = "megatron_gpt--{val_loss:.3f}-{step}-{consumed_samples}-{epoch}"


def test_fields_become_name_equals_value():
    values = {"val_loss": 0.6931472, "step": 3, "consumed_samples": 96, "epoch": 0}
    assert format_checkpoint_name(PATTERN, values) == "megatron_gpt--val_loss=0.693-step=3-consumed_samples=96-epoch=0"


def test_missing_value_shows_as_nan():
    values = {"step": 120, "consumed_samples": 3840, "epoch": 1}
    assert format_checkpoint_name(PATTERN, values) == "megatron_gpt--val_loss=nan-step=120-consumed_samples=3840-epoch=1"


def test_format_spec_applies_to_ints_as_floats_and_text_stays():
    assert format_checkpoint_name("e{epoch:.1f}_{step}.ckpt", {"epoch": 2, "step": 7}) == "eepoch=2.0_step=7.ckpt"


def test_default_config_pattern_is_the_monitor_interpolated():
    params = compose_config().exp_manager.checkpoint_callback_params
    assert params.filename == PATTERN
    assert format_checkpoint_name(params.filename, {"val_loss": 0.5, "step": 1, "consumed_samples": 32, "epoch": 0}) == (
        "megatron_gpt--val_loss=0.500-step=1-consumed_samples=32-epoch=0"
    )
