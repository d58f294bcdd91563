"""What a loss of the zoo is given: the micro-batch's per-pair values and the loss settings.

Every tensor is ``[pairs]``, one value per preference pair of the micro-batch, in
the pairs' order (row ``i`` of the model's chosen half with row ``B + i`` of its
rejected half). A loss sees the whole micro-batch at once, so batch-level losses
(``aot``, ``bco_pair``) sort or average within it.

Log-probs are sums over the response tokens (the positions the loss mask keeps),
never averages: a loss that normalises by length divides by ``chosen_lengths`` /
``rejected_lengths`` itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor

F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# Optional inputs: what the model must compute for each, documented on the dataclass below.
_OPTIONAL_PAIRS = (
    ("reference_chosen_logps", "reference_rejected_logps"),
    ("chosen_lengths", "rejected_lengths"),
    ("gt_rewards_chosen", "gt_rewards_rejected"),
    ("policy_chosen_shared_logps", "policy_rejected_shared_logps"),
    ("reference_chosen_shared_logps", "reference_rejected_shared_logps"),
    ("chosen_weighting_logps", "rejected_weighting_logps"),
)


@dataclass(frozen=True)
class PreferenceLossInputs:
    """Per-pair inputs of a preference loss; all tensors 1-D with one entry per pair.

    Always given:

    - ``policy_chosen_logps`` / ``policy_rejected_logps``: sum over the response's
      tokens of the policy's fp32 log-prob of each token (with gradient).
    - ``beta``: NeMo Aligner's ``ref_policy_kl_penalty`` (TRL's ``beta``; ORPO's lambda).

    Optional, ``None`` when not computed; a loss that needs one refuses to run without it:

    - ``reference_chosen_logps`` / ``reference_rejected_logps``: the same sums under
      the frozen reference (no gradient). ``None`` for reference-free losses, whose
      reference pass is never run.
    - ``chosen_lengths`` / ``rejected_lengths``: number of response tokens of each
      sequence (the loss mask's count). Needed by the length-normalised losses
      (``sigmoid_norm``, ``simpo``, ``orpo``, ``sft``) and by WPO weighting.
    - ``gt_rewards_chosen`` / ``gt_rewards_rejected`` and ``gt_reward_scale``: the
      dataset's ground-truth rewards (the ``rpo_*`` losses).
    - ``policy_chosen_shared_logps`` / ``policy_rejected_shared_logps`` and the
      ``reference_*_shared_logps``: for LD-DPO (``ld_alpha``). With ``n = min(chosen
      length, rejected length)`` of the pair, the sum of the log-probs of each
      sequence's *first n* response tokens only (both sequences of a pair use the
      same ``n``). It cannot be recovered from the full sums; the model computes it
      from the per-token log-probs with a mask of each row's first ``n`` response
      positions. The rest of the sum (``full - shared``) is the tail that
      ``ld_alpha`` down-weights.
    - ``chosen_weighting_logps`` / ``rejected_weighting_logps``: for WPO weighting
      (``use_weighting``), computed without gradient: the sum over response tokens
      ``t`` of ``log p_t(y_t) - log sum_v p_t(v)**2``, where ``p_t`` is the policy's
      next-token distribution at position ``t`` (``log sum_v p_t(v)**2 =
      logsumexp(2 z) - 2 logsumexp(z)`` of the logits ``z``; with tensor
      parallelism both logsumexps reduce over the vocab shards).

    ``update_state``: whether stateful losses (``bco_pair``'s running reward mean)
    take this batch into their state; the model passes ``False`` in validation.
    """

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    beta: float
    reference_chosen_logps: Tensor | None = None
    reference_rejected_logps: Tensor | None = None
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    gt_rewards_chosen: Tensor | None = None
    gt_rewards_rejected: Tensor | None = None
    gt_reward_scale: float = 1.0
    policy_chosen_shared_logps: Tensor | None = None
    policy_rejected_shared_logps: Tensor | None = None
    reference_chosen_shared_logps: Tensor | None = None
    reference_rejected_shared_logps: Tensor | None = None
    chosen_weighting_logps: Tensor | None = None
    rejected_weighting_logps: Tensor | None = None
    update_state: bool = True

    def __post_init__(self):
        shape = self.policy_chosen_logps.shape
        if len(shape) != 1:
            raise ValueError(f"preference loss inputs must be [pairs] tensors, got policy_chosen_logps of shape {tuple(shape)}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Tensor) and value.shape != shape:
                raise ValueError(
                    f"preference loss input {field.name} has shape {tuple(value.shape)}, expected {tuple(shape)}"
                )
        for first, second in _OPTIONAL_PAIRS:
            if (getattr(self, first) is None) != (getattr(self, second) is None):
                raise ValueError(f"preference loss inputs {first} and {second} must be given together")

    @property
    def num_pairs(self) -> int:
        return self.policy_chosen_logps.shape[0]

    @property
    def has_reference(self) -> bool:
        return self.reference_chosen_logps is not None

    def require(self, loss_name: str, *names: str) -> None:
        """Refuse, naming the loss and the field, when an optional input it needs is missing."""
        for name in names:
            if getattr(self, name) is None:
                raise ValueError(f"preference_loss {loss_name!r} needs the input {name}, which was not provided")

    def logratios(self, loss_name: str) -> tuple[Tensor, Tensor]:
        """Per-pair ``log pi - log pi_ref`` of chosen and rejected, in the policy log-probs' dtype.

        (The model may give the reference in float64 as ``policy - logratio``, so
        that this difference is exactly its fp32 log-ratio.)
        """
        self.require(loss_name, "reference_chosen_logps")
        dtype = self.policy_chosen_logps.dtype
        return ((self.policy_chosen_logps - self.reference_chosen_logps).to(dtype),
                (self.policy_rejected_logps - self.reference_rejected_logps).to(dtype))

    def lengths(self, loss_name: str) -> tuple[Tensor, Tensor]:
        """Response lengths as floats; an empty response is refused (a length-normalised loss divides by it)."""
        self.require(loss_name, "chosen_lengths")
        chosen, rejected = self.chosen_lengths.float(), self.rejected_lengths.float()
        if bool((chosen < 1).any() | (rejected < 1).any()):
            empty = ((chosen < 1) | (rejected < 1)).nonzero().flatten().tolist()
            raise ValueError(
                f"preference_loss {loss_name!r} normalises by response length, but pair(s) {empty} "
                "have a zero-length chosen or rejected response"
            )
        return chosen, rejected


@dataclass(frozen=True)
class PreferenceLossSettings:
    """The zoo's hyperparameters, named as in TRL's ``DPOConfig`` (``model.dpo`` keys).

    - ``label_smoothing``: conservative DPO's / robust DPO's / ``aot``'s flip
      probability, EXO's epsilon; in ``[0, 1)`` (``robust`` needs ``< 0.5``,
      ``exo_pair`` needs ``> 0``).
    - ``simpo_gamma``: SimPO's target reward margin.
    - ``discopop_tau``: DiscoPOP's temperature (``> 0``).
    - ``f_divergence_type``: ``reverse_kl`` (plain DPO), ``forward_kl``,
      ``js_divergence`` or ``alpha_divergence`` with ``f_alpha_divergence_coef``.
    - ``ld_alpha``: LD-DPO's weight of the tokens past the shared length, in
      ``[0, 1]``; ``None`` disables it.
    - ``use_weighting``: WPO's per-pair weights.
    - ``rpo_alpha``: weight of the chosen responses' per-token NLL added to the loss
      (TRL's ``rpo_alpha``, Pang et al. 2024); ``None`` disables it.
    """

    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 1.0
    ld_alpha: float | None = None
    use_weighting: bool = False
    rpo_alpha: float | None = None

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"model.dpo.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not self.discopop_tau > 0:
            raise ValueError(f"model.dpo.discopop_tau must be > 0, got {self.discopop_tau}")
        if self.f_divergence_type not in F_DIVERGENCE_TYPES:
            raise ValueError(
                f"model.dpo.f_divergence_type must be one of {', '.join(F_DIVERGENCE_TYPES)}, "
                f"got {self.f_divergence_type!r}"
            )
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"model.dpo.ld_alpha must be in [0, 1] or null, got {self.ld_alpha}")
        if self.rpo_alpha is not None and self.rpo_alpha < 0:
            raise ValueError(f"model.dpo.rpo_alpha must be >= 0 or null, got {self.rpo_alpha}")

    def non_defaults(self) -> set[str]:
        """Names of the settings that differ from their defaults."""
        return {f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}
