"""LoRA adapters on megatron-core's tensor-parallel linear layers (``model.peft.peft_scheme: lora``).

An adapted linear layer computes ``W x + scaling * B A dropout(x)`` with
``scaling = alpha / adapter_dim``. The adapter follows its base layer's split:

- column-parallel (``linear_qkv``, ``linear_fc1``; output split over TP):
  ``A`` [r, in] is replicated, ``B`` [out/TP, r] is split like the base rows.
  The low-rank activation ``A x`` passes megatron's copy-to-TP region (identity
  forward, all-reduce backward), so every rank gets the whole gradient of ``A``;
  under sequence parallelism it is all-gathered over the sequence instead (the
  base gathers ``x``; gathering ``A x`` moves r instead of hidden values), and
  ``A``'s gradient, a partial sum over this rank's tokens, is tagged
  ``sequence_parallel`` so that ``finalize_model_grads`` sums it over TP.
- row-parallel (``linear_proj``, ``linear_fc2``; input split over TP): ``A``
  [r, in/TP] is split like the base columns, ``B`` [out, r] is replicated. The
  partial ``A x`` is all-reduced over TP (one extra all-reduce of r values per
  token, beside the base's of ``out``), or reduce-scattered over the sequence
  under sequence parallelism (``B`` then tagged ``sequence_parallel``).

The fused QKV layout (query groups interleaved, GQA included) and the fused
[gate; up] rows of ``linear_fc1`` need nothing special: ``B``'s rows are the
base weight's rows. One ``A`` serves q, k and v (as NeMo's ``lora_kqv_adapter``);
in PEFT's per-projection format it is the same ``A`` for each.

The adapters of a chunk live in one :class:`LoRAAdapters` child of the
``GPTModel`` (``gpt.lora``), which contributes nothing to the model's sharded
state dict: base checkpoints and exports stay those of the base model. Adapter
checkpoints use :func:`adapter_sharded_state_dict` (megatron sharded tensors in
a layout-independent global form, so they reshard like the base weights).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import asdict, dataclass

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from nemo_dpo.models.nlp.gpt.init import iter_sharded_tensors

# NeMo's target names -> megatron-core module paths inside a transformer layer.
MODULE_PATHS = {
    "attention_qkv": ("self_attention.linear_qkv",),
    "attention_dense": ("self_attention.linear_proj",),
    "mlp_fc1": ("mlp.linear_fc1",),
    "mlp_fc2": ("mlp.linear_fc2",),
}
TARGET_MODULES = {
    **MODULE_PATHS,
    "attention": MODULE_PATHS["attention_qkv"] + MODULE_PATHS["attention_dense"],
    "mlp": MODULE_PATHS["mlp_fc1"] + MODULE_PATHS["mlp_fc2"],
    "all": tuple(path for paths in MODULE_PATHS.values() for path in paths),
}
INIT_METHODS = ("xavier", "zero", "normal")
# NeMo's LoRA "normal" initialisation draws with this standard deviation.
NORMAL_INIT_STD = 0.2
PEFT_SCHEMES = ("none", "lora")
LORA_KEYS = ("adapter_dim", "alpha", "adapter_dropout", "target_modules", "column_init_method",
             "row_init_method", "layer_selection", "weight_tying", "position_embedding_strategy")


@dataclass(frozen=True)
class LoRASettings:
    """``model.peft.lora_tuning``, NeMo's keys and defaults.

    ``alpha`` None: ``adapter_dim`` (scaling 1). ``column_init_method`` draws
    ``A`` (NeMo's ``linear_in``), ``row_init_method`` draws ``B``
    (``linear_out``): with ``B`` zero the adapted model starts equal to the base.
    ``layer_selection``: 1-based layer numbers that get adapters (None: all).
    """

    adapter_dim: int = 32
    alpha: float | None = None
    adapter_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("attention_qkv",)
    column_init_method: str = "xavier"
    row_init_method: str = "zero"
    layer_selection: tuple[int, ...] | None = None

    def __post_init__(self):
        where = "model.peft.lora_tuning"
        if isinstance(self.adapter_dim, bool) or not isinstance(self.adapter_dim, int) or self.adapter_dim < 1:
            raise ValueError(f"{where}.adapter_dim={self.adapter_dim!r} must be a positive integer")
        if self.alpha is None:
            object.__setattr__(self, "alpha", self.adapter_dim)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f"{where}.alpha={self.alpha!r} must be a finite number")
        if isinstance(self.adapter_dropout, bool) or not (0.0 <= float(self.adapter_dropout) < 1.0):
            raise ValueError(f"{where}.adapter_dropout={self.adapter_dropout!r} must be in [0, 1)")
        targets = (self.target_modules,) if isinstance(self.target_modules, str) else tuple(self.target_modules)
        unknown = [t for t in targets if t not in TARGET_MODULES]
        if unknown or not targets:
            raise ValueError(f"{where}.target_modules={list(targets)}: valid names are {', '.join(TARGET_MODULES)}")
        object.__setattr__(self, "target_modules", targets)
        for key in ("column_init_method", "row_init_method"):
            if getattr(self, key) not in INIT_METHODS:
                raise ValueError(f"{where}.{key}={getattr(self, key)!r}; valid: {', '.join(INIT_METHODS)}")
        if self.layer_selection is not None:
            layers = tuple(self.layer_selection)
            if not layers or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in layers):
                raise ValueError(f"{where}.layer_selection={list(layers)} must be null or a list of layer "
                                 "numbers starting at 1")
            object.__setattr__(self, "layer_selection", tuple(sorted(set(layers))))

    @property
    def scaling(self) -> float:
        return self.alpha / self.adapter_dim

    @property
    def module_paths(self) -> tuple[str, ...]:
        """Adapted module paths inside a layer, each once, in megatron's forward order."""
        wanted = {path for target in self.target_modules for path in TARGET_MODULES[target]}
        return tuple(path for path in TARGET_MODULES["all"] if path in wanted)

    def selected_layers(self, num_layers: int) -> tuple[int, ...]:
        """1-based numbers of the layers with adapters; a number past the model is refused."""
        if self.layer_selection is None:
            return tuple(range(1, num_layers + 1))
        beyond = [n for n in self.layer_selection if n > num_layers]
        if beyond:
            raise ValueError(f"model.peft.lora_tuning.layer_selection: layers {beyond} do not exist "
                             f"(the model has {num_layers}, numbered from 1)")
        return self.layer_selection

    def to_dict(self) -> dict:
        return {**asdict(self), "target_modules": list(self.target_modules),
                "layer_selection": None if self.layer_selection is None else list(self.layer_selection)}

    @classmethod
    def from_config(cls, model_cfg) -> "LoRASettings | None":
        """The settings of ``model.peft`` (None for ``peft_scheme: none`` or no ``peft`` block).

        Keys NeMo has but nemo-dpo cannot honour are refused with the reason.
        """
        peft = model_cfg.get("peft") or {}
        scheme = peft.get("peft_scheme") or "none"
        if scheme not in PEFT_SCHEMES:
            raise ValueError(f"model.peft.peft_scheme={scheme!r}; valid: {', '.join(PEFT_SCHEMES)}")
        if scheme == "none":
            return None
        tuning = dict(peft.get("lora_tuning") or {})
        unknown = sorted(set(tuning) - set(LORA_KEYS))
        if unknown:
            raise ValueError(f"model.peft.lora_tuning: unknown key(s) {', '.join(unknown)}; "
                             f"valid: {', '.join(LORA_KEYS)}")
        if tuning.pop("weight_tying", False):
            raise NotImplementedError(
                "model.peft.lora_tuning.weight_tying=true (one adapter shared by every layer) is not supported; "
                "set it false (each layer gets its own adapter)")
        strategy = tuning.pop("position_embedding_strategy", None)
        if strategy is not None:
            raise ValueError(f"model.peft.lora_tuning.position_embedding_strategy={strategy!r} only applies with "
                             "weight_tying=true, which is not supported; set it null")
        return cls(**tuning)


class LoRAAdapter(torch.nn.Module):
    """``scaling * B A dropout(x)`` for one megatron parallel linear layer (see the module docstring).

    ``linear_in`` is ``A`` [r, in of this rank], ``linear_out`` is ``B`` [out of this rank, r].
    """

    def __init__(self, base: torch.nn.Module, settings: LoRASettings):
        super().__init__()
        if not isinstance(base, (ColumnParallelLinear, RowParallelLinear)):
            raise TypeError(f"LoRA adapts megatron-core's Column/RowParallelLinear, not {type(base).__name__} "
                            "(transformer-engine layers are not supported: set model.transformer_engine=false)")
        self.column_parallel = isinstance(base, ColumnParallelLinear)
        self.sequence_parallel = base.sequence_parallel
        self.scaling = settings.scaling
        self.dropout = torch.nn.Dropout(settings.adapter_dropout)
        out_features, in_features = base.weight.shape
        rank, like = settings.adapter_dim, dict(dtype=base.weight.dtype, device=base.weight.device)
        self.linear_in = torch.nn.Parameter(torch.zeros(rank, in_features, **like))
        self.linear_out = torch.nn.Parameter(torch.zeros(out_features, rank, **like))
        if self.column_parallel:
            split, replicated, split_dim = self.linear_out, self.linear_in, 0
        else:
            split, replicated, split_dim = self.linear_in, self.linear_out, 1
        # megatron's tags: gradient norms count a split tensor on every TP rank, a replicated one once.
        split.tensor_model_parallel, split.partition_dim, split.partition_stride = True, split_dim, 1
        replicated.sequence_parallel = self.sequence_parallel

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        # A replicated input needs the same mask on every TP rank (the default generator, seeded
        # alike); a split one (row-parallel, or sequence-parallel) its own, from megatron's TP tracker.
        if self.dropout.p == 0 or not self.training:
            return x
        if self.column_parallel and not self.sequence_parallel:
            return self.dropout(x)
        with get_cuda_rng_tracker().fork():
            return self.dropout(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = torch.nn.functional.linear(self._dropout(x), self.linear_in)
        if self.column_parallel:
            low = (gather_from_sequence_parallel_region(low, tensor_parallel_output_grad=True)
                   if self.sequence_parallel else copy_to_tensor_model_parallel_region(low))
        else:
            low = (reduce_scatter_to_sequence_parallel_region(low)
                   if self.sequence_parallel else reduce_from_tensor_model_parallel_region(low))
        return torch.nn.functional.linear(low, self.linear_out) * self.scaling

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Base-model state dicts (checkpoints, .nemo, HF imports) hold no adapters: keep them as drawn.
        if any(key.startswith(prefix) for key in state_dict):
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)


class LoRAAdapters(torch.nn.Module):
    """The adapters of one model chunk, by ``<layer number>/<module path>``, and the switch that disables them.

    Not part of the chunk's sharded state dict (that stays the base model's).
    """

    def __init__(self, settings: LoRASettings, num_layers: int):
        super().__init__()
        self.settings = settings
        self.selected_layers = settings.selected_layers(num_layers)
        self.adapters = torch.nn.ModuleDict()
        self.enabled = True
        self._handles = []

    @staticmethod
    def name(layer_number: int, path: str) -> str:
        return f"{layer_number}/{path}".replace(".", "/")

    def attach(self, layer_number: int, path: str, base: torch.nn.Module) -> LoRAAdapter:
        adapter = LoRAAdapter(base, self.settings)
        self.adapters[self.name(layer_number, path)] = adapter

        def add_adapter_output(module, args, output):
            if not self.enabled:
                return None
            out, bias = output
            return out + adapter(args[0]), bias

        self._handles.append(base.register_forward_hook(add_adapter_output))
        return adapter

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None) -> dict:
        """Nothing: the model's sharded state dict is the base model's (see :func:`adapter_sharded_state_dict`)."""
        return {}


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)


def lora_of(chunk: torch.nn.Module) -> LoRAAdapters | None:
    """The chunk's adapters (None without LoRA); DDP wrappers are looked through."""
    return getattr(_unwrap(chunk), "lora", None)


def has_lora(model_chunks) -> bool:
    return any(lora_of(chunk) is not None for chunk in model_chunks)


def _layer_adapters(chunk):
    """``(layer number, module path, base module, adapter)`` of every adapter of ``chunk``."""
    lora = lora_of(chunk)
    if lora is None:
        return
    for layer in _unwrap(chunk).decoder.layers:
        for path in lora.settings.module_paths:
            name = LoRAAdapters.name(layer.layer_number, path)
            if name in lora.adapters:
                yield layer.layer_number, path, layer.get_submodule(path), lora.adapters[name]


def attach_lora(model_chunks, settings: LoRASettings, seed: int) -> None:
    """Add adapters to ``model_chunks`` (bare ``GPTModel``s), draw them, and freeze every base parameter."""
    for chunk in model_chunks:
        gpt = _unwrap(chunk)
        for param in gpt.parameters():
            param.requires_grad_(False)
        lora = LoRAAdapters(settings, gpt.config.num_layers)
        for layer in gpt.decoder.layers:
            if layer.layer_number in lora.selected_layers:
                for path in settings.module_paths:
                    lora.attach(layer.layer_number, path, layer.get_submodule(path))
        gpt.lora = lora
    initialize_adapters(model_chunks, seed)


@contextlib.contextmanager
def adapters_disabled(model_chunks):
    """Within: the chunks compute as the base model (the adapters' hooks change nothing)."""
    adapters = [lora_of(chunk) for chunk in model_chunks if lora_of(chunk) is not None]
    previous = [lora.enabled for lora in adapters]
    for lora in adapters:
        lora.enabled = False
    try:
        yield
    finally:
        for lora, state in zip(adapters, previous):
            lora.enabled = state


# Checkpoint keys of the adapters, under the layer's module path (NeMo names A linear_in, B linear_out).
ADAPTER_KEY = "decoder.layers.{path}.lora.{name}"


def adapter_sharded_state_dict(model_chunks, prefix: str = "") -> dict:
    """The adapters of this rank as megatron sharded tensors in a layout-independent global form.

    Key ``decoder.layers.<path>.lora.linear_in``/``linear_out`` with a leading
    axis over the adapted layers (the i-th of ``layer_selection``); the other
    axes are the full adapter's, split as its base layer is. ``linear_fc1``'s
    ``B`` of a gated MLP is [gate rows; up rows], as megatron's own weight key.
    """
    tp_group = parallel_state.get_tensor_model_parallel_group()
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    result = {}
    for chunk in model_chunks:
        lora = lora_of(chunk)
        config = _unwrap(chunk).config
        for layer_number, path, base, adapter in _layer_adapters(chunk):
            offsets = ((0, lora.selected_layers.index(layer_number), len(lora.selected_layers)),)
            split = {"linear_out": 0} if adapter.column_parallel else {"linear_in": 1}
            sharded = make_sharded_tensors_for_checkpoint(
                {"linear_in": adapter.linear_in, "linear_out": adapter.linear_out},
                f"{prefix}decoder.layers.{path}.lora.", split, offsets, tp_group=tp_group, dp_cp_group=dp_group)
            key_b = f"{prefix}decoder.layers.{path}.lora.linear_out"
            if path == "mlp.linear_fc1" and config.gated_linear_unit:
                sharded[key_b] = apply_swiglu_sharded_factory(sharded[key_b], offsets)
            # Distinct names per layer: the layer is an axis of the key, not part of it.
            result.update({f"{key}/{layer_number}": value for key, value in sharded.items()})
    return result


def _draw_full(key: str, shape, method: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
    full = torch.empty(shape)
    if method == "zero":
        return full.zero_()
    if method == "normal":
        return full.normal_(0.0, NORMAL_INIT_STD, generator=generator)
    return torch.nn.init.xavier_normal_(full, generator=generator)


@torch.no_grad()
def initialize_adapters(model_chunks, seed: int) -> None:
    """Draw every adapter in full from ``(seed, key, layer)`` and keep this rank's part (layout-independent)."""
    for chunk in model_chunks:
        lora = lora_of(chunk)
        if lora is None:
            continue
        methods = {"linear_in": lora.settings.column_init_method, "linear_out": lora.settings.row_init_method}
        for sharded in iter_sharded_tensors(adapter_sharded_state_dict([chunk])):
            skip = sharded.prepend_axis_num
            name = f"{sharded.key}@{sharded.global_offset[0]}"
            full = _draw_full(name, sharded.global_shape[skip:], methods[sharded.key.rsplit(".", 1)[-1]], seed)
            index = tuple(slice(o, o + s) for o, s in zip(sharded.global_offset[skip:], sharded.data.shape))
            sharded.data.copy_(full[index].to(sharded.data.dtype))


@torch.no_grad()
def merge_adapters(model_chunks) -> None:
    """Fold every adapter into its base weight (``W += scaling * B A``, per rank) and remove the adapters."""
    for chunk in model_chunks:
        for _, _, base, adapter in _layer_adapters(chunk):
            delta = adapter.linear_out.float() @ adapter.linear_in.float()
            base.weight.add_((delta * adapter.scaling).to(base.weight.dtype))
        lora = lora_of(chunk)
        if lora is not None:
            for handle in lora._handles:
                handle.remove()
            del _unwrap(chunk).lora
