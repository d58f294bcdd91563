"""Weight initialisation that does not depend on the parallel layout.

Each parameter is drawn in full from a generator seeded by ``(seed, global
checkpoint key)`` and this rank keeps its shard, as located by megatron-core's
sharded state dict. Layer keys there are global (``decoder.layers.<global
index>``) and TP shards carry their offsets, so (TP, PP, DP) = (1,1,1) and
(2,2,1) start from exactly the same model. Drawing full tensors costs time on big
models, which come from checkpoints anyway; this is for training from scratch.
"""

from __future__ import annotations

import math
import zlib
from typing import Iterator

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.transformer.transformer_config import TransformerConfig

# Weights feeding the residual stream get a depth-scaled std, as in GPT-2/megatron.
_OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")
_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def iter_sharded_tensors(sharded_state_dict) -> Iterator[ShardedTensor]:
    """Every ShardedTensor in a (nested) sharded state dict, factories expanded."""
    if isinstance(sharded_state_dict, dict):
        values = sharded_state_dict.values()
    elif isinstance(sharded_state_dict, (list, tuple)):
        values = sharded_state_dict
    else:
        values = [sharded_state_dict]
    for value in values:
        if isinstance(value, ShardedTensorFactory):
            yield from iter_sharded_tensors(value.build())
        elif isinstance(value, ShardedTensor):
            yield value
        elif isinstance(value, (dict, list, tuple)):
            yield from iter_sharded_tensors(value)


def _is_norm(key: str) -> bool:
    leaf = key.rsplit(".", 2)
    return "norm" in leaf[-2] or "layer_norm" in leaf[-1]


def _draw_full(key: str, shape, config: TransformerConfig, vocab_size: int, seed: int):
    if key.endswith("bias") or key.endswith("layer_norm_bias"):
        return torch.zeros(shape)
    if _is_norm(key):
        return torch.ones(shape)
    std = config.init_method_std
    if key.endswith(_OUTPUT_PROJECTIONS):
        std /= math.sqrt(2.0 * config.num_layers)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
    if key in _VOCAB_KEYS:
        # Padded vocab rows stay zero: real rows do not depend on the TP padding.
        full = torch.zeros(shape)
        full[:vocab_size].normal_(0.0, std, generator=generator)
        return full
    return torch.empty(shape).normal_(0.0, std, generator=generator)


@torch.no_grad()
def initialize_weights(model_chunks, config: TransformerConfig, vocab_size: int, seed: int) -> None:
    """Overwrite every parameter of ``model_chunks`` with its layout-independent draw."""
    for chunk in model_chunks:
        for sharded in iter_sharded_tensors(chunk.sharded_state_dict()):
            if sharded.data is None or sharded.key.endswith("_extra_state"):
                continue
            full = _draw_full(sharded.key, sharded.global_shape, config, vocab_size, seed)
            skip = sharded.prepend_axis_num
            index = tuple(
                slice(offset, offset + size)
                for offset, size in zip(sharded.global_offset[skip:], sharded.data.shape)
            )
            local = full[(*sharded.global_offset[:skip], *index)]
            sharded.data.copy_(local.to(sharded.data.dtype))
