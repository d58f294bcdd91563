"""Transformer layer specs: transformer-engine where it can run, megatron-core local modules elsewhere."""

from __future__ import annotations

import copy

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import transformer_block
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_dpo.models.nlp.gpt.attention import SDPACoreAttention
from nemo_dpo.parallel.device import transformer_engine_usable

_TORCH_NORMS = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}


class TorchNorm:
    """torch ``LayerNorm``/``RMSNorm`` for megatron specs, usable with sequence parallelism.

    Stands in for megatron's ``WrappedTorchNorm`` (its fallback without apex and
    transformer-engine), which refuses ``sequence_parallel``. Under sequence
    parallelism each tensor-parallel rank normalises its own slice of the
    sequence, so the weight gradients are partial sums; the ``sequence_parallel``
    tag makes megatron's ``finalize_model_grads`` sum them over TP, as it does
    for its own norms. The module is a plain torch norm: parameter names and
    checkpoints are those of ``WrappedTorchNorm``.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centred gamma is not supported by the torch norms")
        if config.normalization not in _TORCH_NORMS:
            raise ValueError(f"normalization {config.normalization!r} is not one of {sorted(_TORCH_NORMS)}")
        # In the model's dtype: an fp32 gain would make every bf16 norm keep fp32 activations
        # and miss torch's fused kernel (megatron's own fallback leaves it fp32).
        norm = _TORCH_NORMS[config.normalization](hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _sequence_parallel_capable(norm):
    return TorchNorm if norm is WrappedTorchNorm else norm


def gpt_layer_spec(
    normalization: str, use_transformer_engine: bool | None = None, qk_layernorm: bool = False
) -> ModuleSpec:
    """The layer spec for a GPT decoder layer.

    ``use_transformer_engine=None`` picks transformer-engine when it is usable.
    The local spec swaps megatron's CUDA-only ``DotProductAttention`` for
    :class:`SDPACoreAttention` so the same spec runs on CPU and GPU, and its
    torch-norm fallback for :class:`TorchNorm`. ``qk_layernorm`` adds a norm
    (of ``normalization``'s kind) over each query and key head before rotary
    embeddings, as in Qwen3.
    """
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_usable()
    if use_transformer_engine:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm))
    layer, attention = spec.submodules, spec.submodules.self_attention.submodules
    attention.core_attention = SDPACoreAttention
    layer.input_layernorm = _sequence_parallel_capable(layer.input_layernorm)
    layer.pre_mlp_layernorm = _sequence_parallel_capable(layer.pre_mlp_layernorm)
    attention.q_layernorm = _sequence_parallel_capable(attention.q_layernorm)
    attention.k_layernorm = _sequence_parallel_capable(attention.k_layernorm)
    return spec


def gpt_block_spec(layer_spec: ModuleSpec, config: TransformerConfig, vp_stage: int | None) -> TransformerBlockSubmodules:
    """The decoder of one pipeline (virtual) stage: ``layer_spec`` layers and the final norm.

    megatron builds the final norm from its own module-wide default, which is
    ``WrappedTorchNorm`` without apex and transformer-engine; :class:`TorchNorm`
    replaces it there.
    """
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
        # The module-wide default of the megatron this runs on (TENorm, apex or torch).
        layer_norm=_sequence_parallel_capable(getattr(transformer_block, "LayerNormImpl", WrappedTorchNorm)),
    )
