"""Preference losses (DPO, IPO, RPO) as pure functions of per-sequence log-probs.

The formulas follow NeMo Aligner's ``MegatronGPTDPOModel.loss_func``, which
``nemo_dpo``'s model assembles from these pieces. As there, a micro-batch holds
``B`` pairs as ``2B`` rows: every chosen response first, then every rejected one
in the same order, so row ``i`` and row ``B + i`` form pair ``i``.

Every loss is a function of the per-pair log-ratios
``log pi(y|x) - log pi_ref(y|x)`` of the chosen and rejected responses and
returns one value per pair (shape ``[B]``); the caller reduces it. All losses
share one signature so that a registry can dispatch on the config's name::

    loss(chosen_logratios, rejected_logratios, *, beta,
         gt_rewards_chosen=None, gt_rewards_rejected=None, gt_reward_scale=1.0)

``beta`` is NeMo Aligner's ``ref_policy_kl_penalty``; the ground-truth rewards
are only read by the RPO losses.

This is the interface ``MegatronGPTDPOModel`` calls today. The loss zoo
(``zoo.py``, ``mixture.py``) gives every loss the whole per-pair inputs
(``PreferenceLossInputs``); a loss registered here is usable there too.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

PreferenceLoss = Callable[..., Tensor]

PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {}


def register_preference_loss(name: str) -> Callable[[PreferenceLoss], PreferenceLoss]:
    """Decorator adding a loss with the module's shared signature under ``name``."""

    def register(fn: PreferenceLoss) -> PreferenceLoss:
        # Refuse to overwrite: silently replacing a built-in loss would change
        # what an existing config trains.
        if name in PREFERENCE_LOSSES:
            raise ValueError(f"preference loss {name!r} is already registered")
        PREFERENCE_LOSSES[name] = fn
        return fn

    return register


def get_preference_loss(name: str) -> PreferenceLoss:
    """The registered loss called ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return PREFERENCE_LOSSES[name]
    except KeyError:
        valid = ", ".join(sorted(PREFERENCE_LOSSES))
        raise ValueError(f"unknown preference_loss {name!r}; valid names: {valid}") from None


def masked_sequence_logprobs(token_logprobs: Tensor, loss_mask: Tensor, average: bool) -> Tensor:
    """fp32 ``[batch]`` log-prob of each sequence over its masked-in tokens: sum, or mean if ``average``."""
    mask = loss_mask.bool()
    # `where`, not a product: masked-out positions may hold -inf, and -inf * 0 is NaN.
    summed = torch.where(mask, token_logprobs.float(), 0.0).sum(-1)
    if not average:
        return summed
    # A sequence with no loss tokens averages to 0 rather than dividing by zero.
    return summed / mask.sum(-1).to(summed.dtype).clamp(min=1)


def split_chosen_rejected(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Split ``2B`` rows laid out [all chosen; all rejected] into the two halves."""
    if rows.shape[0] % 2:
        raise ValueError(f"expected an even number of rows (chosen then rejected), got {rows.shape[0]}")
    return rows.chunk(2, dim=0)


def _gt_margin(gt_rewards_chosen, gt_rewards_rejected, gt_reward_scale, loss_name) -> Tensor:
    if gt_rewards_chosen is None or gt_rewards_rejected is None:
        raise ValueError(f"preference_loss {loss_name!r} needs ground-truth rewards for chosen and rejected")
    return gt_reward_scale * (gt_rewards_chosen.float() - gt_rewards_rejected.float())


def _bernoulli_kl(p_logit: Tensor, q_logit: Tensor) -> Tensor:
    """KL(p || q) between Bernoullis given as logits, from log-sigmoids so it never takes log(0)."""
    log_p1, log_p0 = F.logsigmoid(p_logit), F.logsigmoid(-p_logit)
    log_q1, log_q0 = F.logsigmoid(q_logit), F.logsigmoid(-q_logit)
    return log_p1.exp() * (log_p1 - log_q1) + log_p0.exp() * (log_p0 - log_q0)


@register_preference_loss("dpo")
def dpo_loss(chosen_logratios, rejected_logratios, *, beta,
             gt_rewards_chosen=None, gt_rewards_rejected=None, gt_reward_scale=1.0) -> Tensor:
    """DPO: ``-log sigmoid(beta * (chosen - rejected))``."""
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


@register_preference_loss("ipo")
def ipo_loss(chosen_logratios, rejected_logratios, *, beta,
             gt_rewards_chosen=None, gt_rewards_rejected=None, gt_reward_scale=1.0) -> Tensor:
    """IPO: ``(chosen - rejected - 1 / (2 beta))**2``; the margin is not scaled by beta."""
    return (chosen_logratios - rejected_logratios - 1.0 / (2.0 * beta)) ** 2


@register_preference_loss("rpo_sq")
def rpo_sq_loss(chosen_logratios, rejected_logratios, *, beta,
                gt_rewards_chosen=None, gt_rewards_rejected=None, gt_reward_scale=1.0) -> Tensor:
    """RPO, squared distance: ``(beta * (chosen - rejected) - scale * (gt_chosen - gt_rejected))**2``."""
    gt_margin = _gt_margin(gt_rewards_chosen, gt_rewards_rejected, gt_reward_scale, "rpo_sq")
    return (beta * (chosen_logratios - rejected_logratios) - gt_margin) ** 2


@register_preference_loss("rpo_bwd_kl")
def rpo_bwd_kl_loss(chosen_logratios, rejected_logratios, *, beta,
                    gt_rewards_chosen=None, gt_rewards_rejected=None, gt_reward_scale=1.0) -> Tensor:
    """RPO, backward KL: ``KL(Bern(sigmoid(gt margin)) || Bern(sigmoid(beta * margin)))``."""
    gt_margin = _gt_margin(gt_rewards_chosen, gt_rewards_rejected, gt_reward_scale, "rpo_bwd_kl")
    return _bernoulli_kl(gt_margin, beta * (chosen_logratios - rejected_logratios))


@register_preference_loss("rpo_fwd_kl")
def rpo_fwd_kl_loss(chosen_logratios, rejected_logratios, *, beta,
                    gt_rewards_chosen=None, gt_rewards_rejected=None, gt_reward_scale=1.0) -> Tensor:
    """RPO, forward KL: ``KL(Bern(sigmoid(beta * margin)) || Bern(sigmoid(gt margin)))``."""
    gt_margin = _gt_margin(gt_rewards_chosen, gt_rewards_rejected, gt_reward_scale, "rpo_fwd_kl")
    return _bernoulli_kl(beta * (chosen_logratios - rejected_logratios), gt_margin)


@torch.no_grad()
def preference_accuracy(chosen_logratios: Tensor, rejected_logratios: Tensor) -> Tensor:
    """Fraction of pairs whose chosen log-ratio exceeds the rejected one (ties count as wrong).

    Compares the unscaled log-ratios, as NeMo Aligner does, so it does not depend
    on the sign or size of beta.
    """
    return (chosen_logratios > rejected_logratios).float().mean()


@torch.no_grad()
def reward_metrics(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> dict[str, Tensor]:
    """Implicit-reward statistics of a set of pairs (e.g. a gathered global batch); rewards are ``beta * logratio``."""
    rewards_chosen, rewards_rejected = beta * chosen_logratios.float(), beta * rejected_logratios.float()
    rewards_all = torch.cat((rewards_chosen, rewards_rejected))
    return {
        "rewards_chosen_mean": rewards_chosen.mean(),
        "rewards_rejected_mean": rewards_rejected.mean(),
        "rewards_all_mean": rewards_all.mean(),
        "rewards_all_std": rewards_all.std(),  # unbiased, like torch.std in NeMo Aligner
    }
