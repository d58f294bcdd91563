"""Core attention on torch ``scaled_dot_product_attention`` for megatron-core layer specs.

megatron-core's own ``DotProductAttention`` draws its score buffer from a CUDA
memory pool, so it cannot run on CPU; this module is a drop-in ``core_attention``
for ``SelfAttentionSubmodules`` that runs on any device and lets torch pick the
fused kernel (flash / memory-efficient) on GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPACoreAttention(MegatronModule):
    """Causal (or explicitly masked) attention over one tensor-parallel shard of heads.

    Mask convention is megatron's: ``attention_mask`` is boolean, broadcastable to
    ``[batch, heads, q_len, k_len]``, and ``True`` marks positions that must NOT be
    attended. With no mask the attention is causal; a given mask is used as is
    and must encode causality itself (packed sequences pass a block-diagonal one).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
        tp_size = (
            pg_collection.tp.size()
            if pg_collection is not None
            else config.tensor_model_parallel_size
        )
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups, tp_size)
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """[s, b, heads, head_dim] query/key/value -> [s, b, heads * head_dim] context."""
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPACoreAttention takes packed sequences as a boolean attention_mask")
        q_len, batch = query.shape[0], query.shape[1]
        # SDPA wants [b, heads, s, d].
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None if attention_mask is None else ~attention_mask
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=mask is None,
            scale=self.softmax_scale,
            enable_gqa=self.groups_per_partition != self.heads_per_partition,
        )
        return context.permute(2, 0, 1, 3).reshape(q_len, batch, -1)
