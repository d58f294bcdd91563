"""Preference losses: NeMo Aligner's log-ratio functions and the loss zoo (docs/losses.md)."""

from nemo_dpo.losses.inputs import F_DIVERGENCE_TYPES, PreferenceLossInputs, PreferenceLossSettings
from nemo_dpo.losses.mixture import (
    PreferenceLossMixture,
    PreferenceLossOutput,
    build_preference_loss,
    logps_metrics,
)

from nemo_dpo.losses.preference import (
    PREFERENCE_LOSSES,
    PreferenceLoss,
    dpo_loss,
    get_preference_loss,
    ipo_loss,
    masked_sequence_logprobs,
    preference_accuracy,
    register_preference_loss,
    reward_metrics,
    rpo_bwd_kl_loss,
    rpo_fwd_kl_loss,
    rpo_sq_loss,
    split_chosen_rejected,
)
from nemo_dpo.losses.zoo import LOSS_ALIASES, LOSS_ZOO, LossSpec, register_loss, resolve_loss, valid_loss_names

__all__ = [
    "F_DIVERGENCE_TYPES",
    "LOSS_ALIASES",
    "LOSS_ZOO",
    "LossSpec",
    "PreferenceLossInputs",
    "PreferenceLossMixture",
    "PreferenceLossOutput",
    "PreferenceLossSettings",
    "build_preference_loss",
    "logps_metrics",
    "register_loss",
    "resolve_loss",
    "valid_loss_names",
    "PREFERENCE_LOSSES",
    "PreferenceLoss",
    "dpo_loss",
    "get_preference_loss",
    "ipo_loss",
    "masked_sequence_logprobs",
    "preference_accuracy",
    "register_preference_loss",
    "reward_metrics",
    "rpo_bwd_kl_loss",
    "rpo_fwd_kl_loss",
    "rpo_sq_loss",
    "split_chosen_rejected",
]
