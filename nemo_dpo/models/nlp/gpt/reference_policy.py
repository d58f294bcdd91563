"""The frozen reference policy: where its weights live and how they reach the policy's modules.

The reference is the policy's initial weights. Its log-probs come from the
policy's own modules with the reference tensors put in place of the policy's
(``param.data`` pointers are exchanged, and put back after), so both share one
code path and are bitwise equal at step 0. Where the reference tensors live is
``model.dpo.ref_policy_placement``:

- ``device``: a second set of tensors beside the policy's, same device and
  dtype; a reference pass exchanges pointers only, nothing is copied.
- ``cpu``: CPU memory (page-locked with an accelerator). During a forward,
  pre-hooks on the modules that own parameters (the embedding, each transformer
  layer, the final norm) put that module's reference tensors in, with the next
  module's host -> device copy already issued on a side stream; forward hooks
  put the policy's back and drop the staged copies. The output layer's weights
  (read by chunked log-probs outside its forward) and a weight tied to the
  embedding are staged once for the whole pass.
- ``auto``: ``device`` when it fits beside training, else ``cpu``.

With LoRA (:class:`AdaptersOffReference`) the reference is the frozen base
model itself: its log-probs come from the same modules with the adapters
switched off, and no reference tensor exists at all.

Nothing is ever copied back: the policy's tensors are never overwritten, only
set aside and restored, so a megatron DDP buffer they are views of stays theirs.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from nemo_dpo.models.nlp.gpt.lora import adapters_disabled, lora_of
from nemo_dpo.parallel.device import AheadCopier, free_accelerator_memory, host_staging_copy

log = logging.getLogger(__name__)

PLACEMENTS = ("auto", "device", "cpu")
# auto keeps the reference on the accelerator when free memory exceeds this many
# times its size plus a fixed headroom for activations and allocator slack.
DEVICE_MARGIN_FACTOR = 1.5
DEVICE_MARGIN_BYTES = 2 * 2**30


def check_placement(placement) -> None:
    """Refuse anything but the documented values, naming the key."""
    if placement not in PLACEMENTS:
        raise ValueError(
            f"model.dpo.ref_policy_placement={placement!r} is not valid; valid: {', '.join(PLACEMENTS)}"
        )


def choose_placement(requested: str, reference_bytes: int, free_bytes: int | None) -> tuple[str, str]:
    """(placement, why) for ``requested``; ``free_bytes`` is the accelerator's free memory, None without one."""
    check_placement(requested)
    if requested != "auto":
        return requested, "set by model.dpo.ref_policy_placement"
    if free_bytes is None:
        return "device", "no accelerator: the weights are in CPU memory either way"
    needed = DEVICE_MARGIN_FACTOR * reference_bytes + DEVICE_MARGIN_BYTES
    verdict = ">" if free_bytes > needed else "<="
    why = (f"accelerator free memory {free_bytes / 2**30:.2f} GiB {verdict} {DEVICE_MARGIN_FACTOR} x reference "
           f"{reference_bytes / 2**30:.2f} GiB + {DEVICE_MARGIN_BYTES / 2**30:.0f} GiB")
    return ("device" if free_bytes > needed else "cpu"), why


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside a megatron DDP wrapper (or the chunk itself)."""
    return getattr(chunk, "module", chunk)


def _contains_module_list(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.ModuleList) for m in module.modules())


def _forward_units(root: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that own parameters, in the order a GPT forward runs them.

    Containers holding a ``ModuleList`` (the model, the transformer block) are
    opened; each list item (a transformer layer) is one unit; any other child
    with parameters (embedding, final norm, output layer) is one unit.
    """
    units = []
    for child in root.children():
        if next(child.parameters(), None) is None:
            continue
        if isinstance(child, torch.nn.ModuleList):
            units.extend(item for item in child if next(item.parameters(), None) is not None)
        elif _contains_module_list(child):
            units.extend(_forward_units(child))
        else:
            units.append(child)
    return units


def _whole_pass_parameters(root: torch.nn.Module) -> set[int]:
    """ids of parameters read outside their own module's forward: staged for the whole pass.

    The output layer's weight is read by chunked log-probs in the loss function;
    a weight tied between embedding and output layer is used by both.
    """
    found = set()
    for module in root.modules():
        output_layer = getattr(module, "output_layer", None)
        if output_layer is None or not getattr(module, "post_process", False):
            continue
        found.update(id(p) for p in output_layer.parameters())
        if getattr(module, "share_embeddings_and_output_weights", False):
            found.add(id(module.shared_embedding_or_output_weight()))
    return found


def named_parameters_of_chunks(model_chunks) -> dict[str, torch.nn.Parameter]:
    """The parameters of ``model_chunks`` (DDP-wrapped or not) by ``<chunk>.<parameter name>``."""
    return {f"{index}.{name}": param for index, chunk in enumerate(model_chunks)
            for name, param in _unwrap(chunk).named_parameters()}


class ReferencePolicy:
    """The initial weights of ``model_chunks``, frozen, and a context that runs the chunks with them.

    Args:
        model_chunks: the policy's chunks (megatron DDP-wrapped or not); the
            reference is a copy of their parameters now.
        placement: ``auto``, ``device`` or ``cpu`` (``model.dpo.ref_policy_placement``).
    """

    def __init__(self, model_chunks, placement: str = "auto"):
        check_placement(placement)
        self._roots = [_unwrap(chunk) for chunk in model_chunks]
        named = named_parameters_of_chunks(model_chunks)
        self._names, self._params = list(named), list(named.values())
        reference_bytes = sum(p.numel() * p.element_size() for p in self._params)
        free = free_accelerator_memory() if placement == "auto" else None
        self.placement, why = choose_placement(placement, reference_bytes, free)
        log.info("reference policy (%.1f MiB) placed on %s: %s", reference_bytes / 2**20, self.placement, why)

        with torch.no_grad():
            if self.placement == "device":
                self._tensors = [p.detach().clone(memory_format=torch.preserve_format) for p in self._params]
            else:
                self._tensors = [host_staging_copy(p) for p in self._params]

        position = {id(p): i for i, p in enumerate(self._params)}
        # Device placement: every parameter is exchanged for the whole pass, no hooks.
        self._units: list[tuple[torch.nn.Module, list[int]]] = []
        if self.placement == "cpu":
            whole = set()
            for root in self._roots:
                whole |= _whole_pass_parameters(root)
                for module in _forward_units(root):
                    owned = [position[id(p)] for p in module.parameters() if id(p) not in whole]
                    if owned:
                        self._units.append((module, owned))
            in_units = {i for _, owned in self._units for i in owned}
            self._whole_pass = [i for i in range(len(self._params)) if i not in in_units]
        else:
            self._whole_pass = list(range(len(self._params)))
        # Only cpu placement copies (and, with an accelerator, owns a side stream).
        self._copier = None
        if self.placement == "cpu":
            self._copier = AheadCopier(self._params[0].device if self._params else torch.device("cpu"))
        self._staged: dict[int, tuple] = {}  # unit -> ticket of copies issued ahead
        self._set_aside: dict[int, list[torch.Tensor]] = {}  # unit -> the policy tensors it replaced

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The reference tensors by ``<chunk>.<parameter name>`` (where they live, not copies)."""
        return dict(zip(self._names, self._tensors))

    @torch.no_grad()
    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        """Make ``weights`` (keyed as :meth:`state_dict`) the reference, copied into where it lives."""
        if set(weights) != set(self._names):
            differing = sorted(set(weights) ^ set(self._names))
            raise KeyError(f"reference weights do not match the model's parameters: {differing[:5]}")
        for name, tensor in zip(self._names, self._tensors):
            tensor.copy_(weights[name])

    # --------------------------------------------------------------- exchanging
    def _put_in(self, indices: list[int], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        policy = []
        for i, tensor in zip(indices, tensors):
            policy.append(self._params[i].data)
            self._params[i].data = tensor
        return policy

    def _put_back(self, indices: list[int], policy: list[torch.Tensor]) -> None:
        for i, tensor in zip(indices, policy):
            self._params[i].data = tensor

    def _stage(self, indices: list[int]):
        return self._copier.start([self._tensors[i] for i in indices])

    def _pre_hook(self, unit: int):
        def hook(module, args):
            if unit in self._set_aside:  # already in (a module run twice): nothing to do
                return
            indices = self._units[unit][1]
            ticket = self._staged.pop(unit, None) or self._stage(indices)
            self._set_aside[unit] = self._put_in(indices, self._copier.finish(ticket))
            following = (unit + 1) % len(self._units)
            if following not in self._staged and following not in self._set_aside:
                self._staged[following] = self._stage(self._units[following][1])
        return hook

    def _post_hook(self, unit: int):
        def hook(module, args, output):
            policy = self._set_aside.pop(unit, None)
            if policy is not None:
                self._put_back(self._units[unit][1], policy)
        return hook

    @contextlib.contextmanager
    def active(self):
        """Within: the chunks compute with the reference weights. After: the policy's exact tensors again."""
        whole_policy = None
        handles = []
        try:
            whole = self._whole_pass
            tensors = ([self._tensors[i] for i in whole] if self._copier is None
                       else self._copier.finish(self._stage(whole)))
            whole_policy = self._put_in(whole, tensors)
            if self._units:  # the first module's copy, ahead of the first forward
                self._staged[0] = self._stage(self._units[0][1])
            for unit, (module, _) in enumerate(self._units):
                handles.append(module.register_forward_pre_hook(self._pre_hook(unit)))
                handles.append(module.register_forward_hook(self._post_hook(unit), always_call=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for unit, policy in list(self._set_aside.items()):
                self._put_back(self._units[unit][1], policy)
            if whole_policy is not None:
                self._put_back(self._whole_pass, whole_policy)
            self._set_aside.clear()
            self._staged.clear()


class AdaptersOffReference:
    """The reference of a LoRA model: the policy's own modules with the adapters disabled.

    The base weights are frozen, so the reference stays the model training
    started from without a copy; at step 0 (``B = 0``) policy and reference run
    the same operations and their log-probs are bitwise equal.
    """

    placement = "none (LoRA: the frozen base model with adapters off)"

    def __init__(self, model_chunks, placement: str = "auto"):
        check_placement(placement)
        if placement != "auto":
            log.warning("model.dpo.ref_policy_placement=%s has no effect with LoRA: the reference is the base "
                        "model with adapters off, no copy to place", placement)
        self._chunks = list(model_chunks)

    def active(self):
        """Within: the chunks compute as the base model."""
        return adapters_disabled(self._chunks)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The base weights by ``<chunk>.<parameter name>`` (the frozen parameters themselves)."""
        adapters = {id(p) for chunk in self._chunks for p in lora_of(chunk).parameters()}
        return {name: p.detach() for name, p in named_parameters_of_chunks(self._chunks).items()
                if id(p) not in adapters}

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        raise ValueError("with LoRA (model.peft.peft_scheme=lora) the reference policy is the frozen base model "
                         "with adapters off; it cannot be set separately")
