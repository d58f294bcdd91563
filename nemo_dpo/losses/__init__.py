"""Preference losses (DPO, IPO, RPO) and their registry."""

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

__all__ = [
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
