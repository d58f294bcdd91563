"""Transformer layer specs: transformer-engine where it can run, megatron-core local modules elsewhere."""

from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec

from nemo_dpo.models.nlp.gpt.attention import SDPACoreAttention
from nemo_dpo.parallel.device import transformer_engine_usable


def gpt_layer_spec(
    normalization: str, use_transformer_engine: bool | None = None, qk_layernorm: bool = False
) -> ModuleSpec:
    """The layer spec for a GPT decoder layer.

    ``use_transformer_engine=None`` picks transformer-engine when it is usable.
    The local spec swaps megatron's CUDA-only ``DotProductAttention`` for
    :class:`SDPACoreAttention` so the same spec runs on CPU and GPU.
    ``qk_layernorm`` adds a norm (of ``normalization``'s kind) over each query
    and key head before rotary embeddings, as in Qwen3.
    """
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_usable()
    if use_transformer_engine:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm))
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec
