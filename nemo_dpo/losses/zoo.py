"""The loss zoo: every published preference loss as ``loss(inputs, settings) -> [pairs]``.

A loss takes a ``PreferenceLossInputs`` (the micro-batch's per-pair sums) and a
``PreferenceLossSettings`` and returns one value per pair; the caller reduces.
A loss with state (``bco_pair``) is a class: the mixture makes one instance per
run, calls it like a function and saves it with ``state_dict()``.

Names follow NeMo Aligner where it has one; TRL's ``loss_type`` names are
accepted too (``sigmoid`` is ``dpo``). docs/losses.md tables every loss.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from nemo_dpo.losses.inputs import PreferenceLossInputs, PreferenceLossSettings
from nemo_dpo.losses.preference import PREFERENCE_LOSSES, ipo_loss, rpo_bwd_kl_loss, rpo_fwd_kl_loss, rpo_sq_loss

# exp() arguments are capped here so that a score or a weight stays finite in fp32
# (exp(80) ~ 5.5e34); past the cap the value stops growing and its gradient is 0.
EXP_CAP = 80.0
# f-divergence scores are capped lower so that their squares (sppo_hard) stay finite as well.
SCORE_EXP_CAP = 40.0


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: the callable (or class, if stateful) and what it declares.

    ``reads``: the settings it uses (a setting changed from its default that no
    selected loss reads is refused). ``check``: validates the settings for this
    loss at build time.
    """

    name: str
    loss: Callable
    reference_free: bool = False
    reads: frozenset[str] = frozenset()
    check: Callable[[PreferenceLossSettings], None] | None = None
    aliases: tuple[str, ...] = ()


LOSS_ZOO: dict[str, LossSpec] = {}
LOSS_ALIASES: dict[str, str] = {}


def register_loss(name: str, *, aliases=(), reference_free=False, reads=(), check=None):
    """Decorator adding a loss with the zoo interface ``loss(inputs, settings) -> [pairs]``."""

    def register(loss):
        for key in (name, *aliases):
            if key in LOSS_ZOO or key in LOSS_ALIASES:
                raise ValueError(f"preference loss {key!r} is already registered")
        LOSS_ZOO[name] = LossSpec(name, loss, reference_free, frozenset(reads), check, tuple(aliases))
        LOSS_ALIASES.update((alias, name) for alias in aliases)
        return loss

    return register


def valid_loss_names() -> list[str]:
    """Every name a config may use: NeMo Aligner's (``register_preference_loss``) first, then the zoo's."""
    nemo = sorted(PREFERENCE_LOSSES)
    return nemo + sorted({*LOSS_ZOO, *LOSS_ALIASES} - set(nemo))


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown preference_loss {name!r}; valid names: {', '.join(valid_loss_names())}")


def _from_logratios(name: str, fn: Callable) -> Callable:
    """A function of log-ratios (``register_preference_loss``'s signature) as a zoo loss."""

    def adapted(inputs: PreferenceLossInputs, settings: PreferenceLossSettings) -> Tensor:
        chosen, rejected = inputs.logratios(name)
        return fn(chosen, rejected, beta=inputs.beta, gt_rewards_chosen=inputs.gt_rewards_chosen,
                  gt_rewards_rejected=inputs.gt_rewards_rejected, gt_reward_scale=inputs.gt_reward_scale)

    adapted.__doc__ = fn.__doc__
    return adapted


def _imported(path: str) -> LossSpec:
    """``package.module:attribute``; the attribute may set ``reference_free`` / ``reads`` like a registered loss."""
    module_name, _, attribute = path.partition(":")
    try:
        loss = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(
            f"preference_loss {path!r} cannot be imported ({type(err).__name__}: {err}); "
            f"valid names: {', '.join(valid_loss_names())}"
        ) from None
    if not callable(loss):
        raise ValueError(f"preference_loss {path!r} is not callable; valid names: {', '.join(valid_loss_names())}")
    return LossSpec(path, loss, bool(getattr(loss, "reference_free", False)), frozenset(getattr(loss, "reads", ())))


def resolve_loss(name: str) -> LossSpec:
    """The loss a config names: a zoo name or alias, a ``register_preference_loss`` name, or ``module:function``."""
    if not isinstance(name, str):
        raise _unknown(name)
    if ":" in name:
        return _imported(name)
    name = LOSS_ALIASES.get(name, name)
    if name in LOSS_ZOO:
        return LOSS_ZOO[name]
    if name in PREFERENCE_LOSSES:
        return LossSpec(name, _from_logratios(name, PREFERENCE_LOSSES[name]))
    raise _unknown(name)


# ---------------------------------------------------------------------------------------------
# Shared pieces


def f_divergence_scores(inputs: PreferenceLossInputs, settings: PreferenceLossSettings, name: str):
    """Chosen and rejected scores ``f'(pi / pi_ref)`` (constants dropped) of the f-divergence DPO family.

    reverse_kl: ``u = log-ratio`` (DPO); forward_kl: ``-exp(-u)``; js_divergence:
    ``log sigmoid(u)``; alpha_divergence (TRL's parametrisation, a = coef):
    ``exp((a - 1) u) / (a - 1)``, which is reverse_kl at a = 1 and forward_kl at a = 0.
    exp() arguments are capped at ``SCORE_EXP_CAP``.
    """
    chosen, rejected = inputs.logratios(name)
    kind = settings.f_divergence_type
    if kind == "forward_kl":
        return -torch.exp((-chosen).clamp(max=SCORE_EXP_CAP)), -torch.exp((-rejected).clamp(max=SCORE_EXP_CAP))
    if kind == "js_divergence":
        return F.logsigmoid(chosen), F.logsigmoid(rejected)
    if kind == "alpha_divergence" and abs(settings.f_alpha_divergence_coef - 1.0) > 1e-6:
        a1 = settings.f_alpha_divergence_coef - 1.0
        return (torch.exp((a1 * chosen).clamp(max=SCORE_EXP_CAP)) / a1,
                torch.exp((a1 * rejected).clamp(max=SCORE_EXP_CAP)) / a1)
    return chosen, rejected


F_DIVERGENCE = ("f_divergence_type", "f_alpha_divergence_coef")


def _flip_smoothed(logits: Tensor, epsilon: float) -> Tensor:
    """``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)``: the logistic loss when labels flip with probability eps."""
    loss = -F.logsigmoid(logits)
    if epsilon:
        loss = (1.0 - epsilon) * loss - epsilon * F.logsigmoid(-logits)
    return loss


def _length_means(inputs: PreferenceLossInputs, name: str) -> tuple[Tensor, Tensor]:
    chosen_len, rejected_len = inputs.lengths(name)
    return inputs.policy_chosen_logps / chosen_len, inputs.policy_rejected_logps / rejected_len


def _log1m_exp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends; ``x`` is capped just below 0 (probability 1)."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# ---------------------------------------------------------------------------------------------
# Losses on policy-vs-reference log-ratios


@register_loss("dpo", aliases=("sigmoid",), reads=("label_smoothing", *F_DIVERGENCE))
def dpo(inputs, settings):
    """DPO (Rafailov et al. 2023), conservative DPO when ``label_smoothing > 0`` (Mitchell 2023)."""
    chosen, rejected = f_divergence_scores(inputs, settings, "dpo")
    return _flip_smoothed(inputs.beta * (chosen - rejected), settings.label_smoothing)


@register_loss("hinge", reads=F_DIVERGENCE)
def hinge(inputs, settings):
    """SLiC's hinge (Zhao et al. 2023): ``max(0, 1 - beta * margin)``."""
    chosen, rejected = f_divergence_scores(inputs, settings, "hinge")
    return torch.relu(1.0 - inputs.beta * (chosen - rejected))


def _robust_check(settings):
    if not settings.label_smoothing < 0.5:
        raise ValueError(f"preference_loss 'robust' needs label_smoothing < 0.5, got {settings.label_smoothing}")


@register_loss("robust", reads=("label_smoothing", *F_DIVERGENCE), check=_robust_check)
def robust(inputs, settings):
    """Robust DPO (Chowdhury et al. 2024): unbiased under label flips with probability ``label_smoothing``."""
    chosen, rejected = f_divergence_scores(inputs, settings, "robust")
    z, eps = inputs.beta * (chosen - rejected), settings.label_smoothing
    return ((1.0 - eps) * -F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def _exo_check(settings):
    if not settings.label_smoothing > 0:
        raise ValueError("preference_loss 'exo_pair' needs label_smoothing > 0 (its epsilon; 1e-3 in the paper)")


@register_loss("exo_pair", reads=("label_smoothing", *F_DIVERGENCE), check=_exo_check)
def exo_pair(inputs, settings):
    """EXO (Ji et al. 2024, eq. 16): ``KL(softmax(beta * scores) || [1 - eps, eps])`` over the pair."""
    chosen, rejected = f_divergence_scores(inputs, settings, "exo_pair")
    z, eps = inputs.beta * (chosen - rejected), settings.label_smoothing
    log_q_win, log_q_lose = F.logsigmoid(z), F.logsigmoid(-z)
    return log_q_win.exp() * (log_q_win - math.log1p(-eps)) + log_q_lose.exp() * (log_q_lose - math.log(eps))


@register_loss("nca_pair", reads=F_DIVERGENCE)
def nca_pair(inputs, settings):
    """NCA (Chen et al. 2024), pairwise: absolute rewards, so the chosen likelihood is pushed up."""
    chosen, rejected = f_divergence_scores(inputs, settings, "nca_pair")
    r_chosen, r_rejected = inputs.beta * chosen, inputs.beta * rejected
    return -F.logsigmoid(r_chosen) - 0.5 * F.logsigmoid(-r_chosen) - 0.5 * F.logsigmoid(-r_rejected)


@register_loss("bco_pair", reads=F_DIVERGENCE)
class BCOPairLoss:
    """BCO (Jung et al. 2024), paired: classify chosen/rejected rewards around a running reward mean.

    State: the running mean ``delta`` of the micro-batches' mean reward (each batch
    counts once, as in TRL); each training call first adds its batch, then uses
    the updated mean. ``state_dict()`` / ``load_state_dict()`` carry it in checkpoints.
    """

    def __init__(self):
        self.mean = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.int64)

    def __call__(self, inputs, settings):
        chosen, rejected = f_divergence_scores(inputs, settings, "bco_pair")
        r_chosen, r_rejected = inputs.beta * chosen, inputs.beta * rejected
        # The state follows the rewards' device, so updating it never waits for the GPU.
        self.mean, self.count = self.mean.to(r_chosen.device), self.count.to(r_chosen.device)
        if inputs.update_state:
            batch_mean = torch.cat((r_chosen, r_rejected)).detach().double().mean()
            self.count = self.count + 1
            self.mean = self.mean + (batch_mean - self.mean) / self.count
        delta = self.mean.to(r_chosen.dtype)
        return -F.logsigmoid(r_chosen - delta) - F.logsigmoid(-(r_rejected - delta))

    def state_dict(self) -> dict[str, Tensor]:
        return {"running_mean": self.mean.detach().cpu().clone(), "count": self.count.cpu().clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.mean = torch.as_tensor(state["running_mean"], dtype=torch.float64).clone()
        self.count = torch.as_tensor(state["count"], dtype=torch.int64).clone()


@register_loss("sppo_hard", reads=F_DIVERGENCE)
def sppo_hard(inputs, settings):
    """SPPO (Wu et al. 2024) with hard win probabilities: chosen score to ``1/(2 beta)``, rejected to ``-1/(2 beta)``."""
    chosen, rejected = f_divergence_scores(inputs, settings, "sppo_hard")
    half = 0.5 / inputs.beta
    return (chosen - half) ** 2 + (rejected + half) ** 2


@register_loss("aot", reads=("label_smoothing",))
def aot(inputs, settings):
    """AOT (Melnyk et al. 2024), paired: DPO on the sorted policy and sorted reference margins of the batch."""
    inputs.require("aot", "reference_chosen_logps")
    policy = torch.sort(inputs.policy_chosen_logps - inputs.policy_rejected_logps).values
    reference = torch.sort(inputs.reference_chosen_logps - inputs.reference_rejected_logps).values
    return _flip_smoothed(inputs.beta * (policy - reference), settings.label_smoothing)


@register_loss("aot_unpaired", reads=("label_smoothing",))
def aot_unpaired(inputs, settings):
    """AOT, unpaired: DPO on the batch's sorted chosen log-ratios against its sorted rejected ones."""
    chosen, rejected = inputs.logratios("aot_unpaired")
    return _flip_smoothed(inputs.beta * (torch.sort(chosen).values - torch.sort(rejected).values),
                          settings.label_smoothing)


@register_loss("apo_zero")
def apo_zero(inputs, settings):
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): raise the chosen likelihood, lower the rejected one."""
    chosen, rejected = inputs.logratios("apo_zero")
    return (1.0 - torch.sigmoid(inputs.beta * chosen)) + torch.sigmoid(inputs.beta * rejected)


@register_loss("apo_down", reads=F_DIVERGENCE)
def apo_down(inputs, settings):
    """APO-down (eq. 8): lower the chosen likelihood and the rejected one more."""
    chosen_lr, _ = inputs.logratios("apo_down")
    chosen, rejected = f_divergence_scores(inputs, settings, "apo_down")
    return torch.sigmoid(inputs.beta * chosen_lr) + (1.0 - torch.sigmoid(inputs.beta * (chosen - rejected)))


@register_loss("discopop", reads=("discopop_tau", *F_DIVERGENCE))
def discopop(inputs, settings):
    """DiscoPOP (Chris Lu et al. 2024, eq. 5): logistic and exponential losses mixed by ``sigmoid(z / tau)``."""
    chosen, rejected = f_divergence_scores(inputs, settings, "discopop")
    z, tau = inputs.beta * (chosen - rejected), settings.discopop_tau
    mix = torch.sigmoid(z / tau)
    # exp(-z) * mix in log space: exp(-z) overflows exactly where mix underflows.
    exponential = torch.exp((-z + F.logsigmoid(z / tau)).clamp(max=EXP_CAP))
    return (1.0 - mix) * -F.logsigmoid(z) + exponential


@register_loss("sigmoid_norm", reads=F_DIVERGENCE)
def sigmoid_norm(inputs, settings):
    """DPO on per-token (length-normalised) scores: ``-log sigmoid(beta (s_w/|y_w| - s_l/|y_l|))``."""
    chosen, rejected = f_divergence_scores(inputs, settings, "sigmoid_norm")
    chosen_len, rejected_len = inputs.lengths("sigmoid_norm")
    return -F.logsigmoid(inputs.beta * (chosen / chosen_len - rejected / rejected_len))


# NeMo Aligner's IPO and RPO losses, functions of log-ratios in preference.py, under the zoo interface.
ipo = register_loss("ipo")(_from_logratios("ipo", ipo_loss))
rpo_sq = register_loss("rpo_sq")(_from_logratios("rpo_sq", rpo_sq_loss))
rpo_bwd_kl = register_loss("rpo_bwd_kl")(_from_logratios("rpo_bwd_kl", rpo_bwd_kl_loss))
rpo_fwd_kl = register_loss("rpo_fwd_kl")(_from_logratios("rpo_fwd_kl", rpo_fwd_kl_loss))


# ---------------------------------------------------------------------------------------------
# Reference-free losses: never read reference_*; their reference pass is never run.


@register_loss("simpo", reference_free=True, reads=("simpo_gamma", "label_smoothing"))
def simpo(inputs, settings):
    """SimPO (Meng et al. 2024): ``-log sigmoid(beta (mean logp_w - mean logp_l) - simpo_gamma)``."""
    chosen, rejected = _length_means(inputs, "simpo")
    return _flip_smoothed(inputs.beta * (chosen - rejected) - settings.simpo_gamma, settings.label_smoothing)


@register_loss("orpo", reference_free=True)
def orpo(inputs, settings):
    """ORPO (Hong et al. 2024): chosen per-token NLL ``- beta * log sigmoid(log odds ratio)``.

    Uses the per-token means ``logps / lengths`` of both responses; ``beta`` is the paper's lambda.
    """
    chosen, rejected = _length_means(inputs, "orpo")
    log_odds = (chosen - rejected) - (_log1m_exp(chosen) - _log1m_exp(rejected))
    return -chosen - inputs.beta * F.logsigmoid(log_odds)


@register_loss("sft", reference_free=True)
def sft(inputs, settings):
    """Negative log-likelihood of the chosen response per token: ``-logp_w / |y_w|``."""
    chosen, _ = _length_means(inputs, "sft")
    return -chosen
