"""Selecting losses by config: one name or a weighted list, plus the settings that act on every term.

``build_preference_loss(model.dpo.preference_loss, model.dpo.preference_loss_weights,
settings)`` checks everything at start-up (unknown or unimportable names, settings
no selected loss uses, combinations that make no sense) and returns a
``PreferenceLossMixture``. Calling it on a ``PreferenceLossInputs`` gives the
weighted per-pair sum and each term on its own (one metric per term).

Settings applied around every term, as TRL does:

- ``ld_alpha`` (LD-DPO, Liu et al. 2024): each sequence's log-prob becomes
  ``shared + ld_alpha * (full - shared)`` for policy and reference before any term sees it.
- ``use_weighting`` (WPO, Zhou et al. 2024): every term is multiplied per pair by
  ``exp(w_chosen / |y_chosen|) * exp(w_rejected / |y_rejected|)`` from the
  ``*_weighting_logps`` inputs (no gradient flows through the weight).
- ``rpo_alpha``: adds the term ``rpo_nll`` (the chosen per-token NLL) with that weight.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from nemo_dpo.losses.inputs import PreferenceLossInputs, PreferenceLossSettings
from nemo_dpo.losses.zoo import EXP_CAP, LOSS_ZOO, LossSpec, resolve_loss, sft

# Settings every mixture reads itself, whatever its terms.
MIXTURE_SETTINGS = frozenset({"ld_alpha", "use_weighting", "rpo_alpha"})
RPO_TERM = "rpo_nll"


@dataclass(frozen=True)
class PreferenceLossOutput:
    """``loss``: ``sum_i weight_i * terms[name_i]``, per pair; ``terms``: each term per pair, unweighted."""

    loss: Tensor
    terms: dict[str, Tensor]


class PreferenceLossMixture:
    """A weighted sum of zoo losses; a single loss is a mixture of one with weight 1."""

    def __init__(self, specs: list[LossSpec], weights: list[float], settings: PreferenceLossSettings):
        self.specs, self.weights, self.settings = tuple(specs), tuple(weights), settings
        # Stateful losses are classes: one instance per mixture, so each run has its own state.
        self._losses = {spec.name: spec.loss() if isinstance(spec.loss, type) else spec.loss for spec in specs}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.specs)

    @property
    def reference_free(self) -> bool:
        """True when no term reads the reference: the model must then skip the reference pass."""
        return all(spec.reference_free for spec in self.specs)

    def __call__(self, inputs: PreferenceLossInputs) -> PreferenceLossOutput:
        settings = self.settings
        if not self.reference_free and not inputs.has_reference:
            needing = [spec.name for spec in self.specs if not spec.reference_free]
            raise ValueError(f"preference_loss {needing} need reference log-probs, which were not provided")
        if settings.ld_alpha is not None:
            inputs = length_desensitised(inputs, settings.ld_alpha)
        weight = wpo_weights(inputs) if settings.use_weighting else None
        terms = {}
        for spec in self.specs:
            value = self._losses[spec.name](inputs, settings)
            terms[spec.name] = value if weight is None else value * weight
        pairs = [(terms[spec.name], w) for spec, w in zip(self.specs, self.weights)]
        if settings.rpo_alpha is not None:
            terms[RPO_TERM] = sft(inputs, settings)
            pairs.append((terms[RPO_TERM], settings.rpo_alpha))
        loss = sum(w * value for value, w in pairs)
        return PreferenceLossOutput(loss, terms)

    def state_dict(self) -> dict[str, dict]:
        """State of the stateful terms by name (``bco_pair``'s running mean); empty when none has state."""
        return {name: loss.state_dict() for name, loss in self._losses.items() if hasattr(loss, "state_dict")}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"preference loss state has terms {sorted(state)}, expected {sorted(expected)}")
        for name, value in state.items():
            self._losses[name].load_state_dict(value)


def build_preference_loss(preference_loss, preference_loss_weights=None,
                          settings: PreferenceLossSettings | None = None) -> PreferenceLossMixture:
    """The mixture a config selects, checked up front.

    ``preference_loss``: a name, an alias, ``package.module:function``, or a list
    of them; ``preference_loss_weights``: one float per name (default all 1).
    """
    settings = settings or PreferenceLossSettings()
    names = [preference_loss] if isinstance(preference_loss, str) else list(preference_loss)
    if not names:
        raise ValueError("model.dpo.preference_loss names no loss")
    weights = [1.0] * len(names) if preference_loss_weights is None else [float(w) for w in preference_loss_weights]
    if len(weights) != len(names):
        raise ValueError(
            f"model.dpo.preference_loss_weights has {len(weights)} entries for {len(names)} losses {names}"
        )
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"model.dpo.preference_loss_weights must be finite, got {weights}")
    specs = [resolve_loss(name) for name in names]
    canonical = [spec.name for spec in specs]
    if len(set(canonical)) != len(canonical) or RPO_TERM in canonical:
        raise ValueError(f"model.dpo.preference_loss lists a loss twice (or {RPO_TERM!r}): {names}")
    for spec in specs:
        if spec.check is not None:
            spec.check(settings)
    _check_settings_are_used(specs, settings)
    return PreferenceLossMixture(specs, weights, settings)


def _check_settings_are_used(specs: list[LossSpec], settings: PreferenceLossSettings) -> None:
    if settings.f_divergence_type != "reverse_kl":
        for spec in specs:
            if not spec.reference_free and "f_divergence_type" not in spec.reads:
                raise ValueError(
                    f"preference_loss {spec.name!r} does not support f_divergence_type={settings.f_divergence_type!r}"
                )
    builtin = all(LOSS_ZOO.get(spec.name) is spec for spec in specs)
    changed = settings.non_defaults() - MIXTURE_SETTINGS
    if settings.f_divergence_type != "alpha_divergence":
        changed.discard("f_alpha_divergence_coef")  # only read with alpha_divergence
    if builtin:
        for key in sorted(changed):
            if not any(key in spec.reads for spec in specs):
                raise ValueError(
                    f"model.dpo.{key} is set, but no selected preference_loss ({', '.join(s.name for s in specs)}) uses it"
                )
    if settings.use_weighting and any(spec.name in ("aot", "aot_unpaired") for spec in specs):
        raise ValueError("use_weighting cannot be combined with preference_loss aot or aot_unpaired "
                         "(they pair sorted values across the batch, so per-pair weights have no pair)")


def length_desensitised(inputs: PreferenceLossInputs, ld_alpha: float) -> PreferenceLossInputs:
    """LD-DPO: every log-prob becomes ``shared + ld_alpha * (full - shared)``."""
    inputs.require("ld_alpha", "policy_chosen_shared_logps")
    changes = {}
    sides = ["policy"] + (["reference"] if inputs.has_reference else [])
    if inputs.has_reference:
        inputs.require("ld_alpha", "reference_chosen_shared_logps")
    for side in sides:
        for which in ("chosen", "rejected"):
            full = getattr(inputs, f"{side}_{which}_logps")
            shared = getattr(inputs, f"{side}_{which}_shared_logps")
            changes[f"{side}_{which}_logps"] = shared + ld_alpha * (full - shared)
    return dataclasses.replace(inputs, **changes)


def wpo_weights(inputs: PreferenceLossInputs) -> Tensor:
    """WPO's per-pair weight ``exp(mean aligned logp of chosen) * exp(mean aligned logp of rejected)``, detached."""
    inputs.require("use_weighting", "chosen_weighting_logps")
    chosen_len, rejected_len = inputs.lengths("use_weighting")
    with torch.no_grad():
        log_weight = inputs.chosen_weighting_logps / chosen_len + inputs.rejected_weighting_logps / rejected_len
        return torch.exp(log_weight.float().clamp(max=EXP_CAP))


@torch.no_grad()
def logps_metrics(inputs: PreferenceLossInputs) -> dict[str, Tensor]:
    """TRL's log-prob metrics under our names: mean summed policy log-probs; reward margin when there is a reference."""
    metrics = {
        "logps_chosen_mean": inputs.policy_chosen_logps.float().mean(),
        "logps_rejected_mean": inputs.policy_rejected_logps.float().mean(),
    }
    if inputs.has_reference:
        chosen, rejected = inputs.logratios("metrics")
        metrics["rewards_margin_mean"] = (inputs.beta * (chosen - rejected)).float().mean()
    return metrics
