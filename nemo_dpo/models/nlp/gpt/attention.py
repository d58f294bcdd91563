"""Core attention on torch ``scaled_dot_product_attention`` for megatron-core layer specs.

megatron-core's own ``DotProductAttention`` draws its score buffer from a CUDA
memory pool, so it cannot run on CPU; this module is a drop-in ``core_attention``
for ``SelfAttentionSubmodules`` that runs on any device and lets torch pick the
fused kernel (flash / memory-efficient) on GPU.

Packed rows (``nemo_dpo.data.packing``) come with their pair blocks in place of a
mask, and attention runs block by block: each block's scores only, with the
causal kernel where a block part is one sequence, instead of the row's whole
``T x T`` scores under a dense mask (which also keeps torch off its fused kernels).
megatron-core's packed path (``PackedSeqParams``, THD layout) needs
transformer-engine, which this attention does not use.
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
    """Causal, block-packed or explicitly masked attention over one tensor-parallel shard of heads.

    ``attention_mask``: None (causal); a CPU int64 ``[N, 5]`` tensor of pair
    blocks ``(row, start, shared, first, second)`` (``PackedMicroBatch.blocks``:
    ``shared + first`` tokens causal among themselves, ``second`` tokens attending
    to the ``shared`` ones and causally to themselves, 0 out of every block); or a
    boolean mask in megatron's convention, broadcastable to ``[batch, heads,
    q_len, k_len]`` with ``True`` where attention is NOT allowed, used as is
    (it must encode causality itself).
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
            raise ValueError("SDPACoreAttention takes packed sequences as pair blocks in attention_mask")
        q_len, batch = query.shape[0], query.shape[1]
        # SDPA wants [b, heads, s, d].
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if attention_mask is not None and attention_mask.dtype == torch.int64:
            context = self._blockwise(q, k, v, attention_mask)
        else:
            context = self._attend(q, k, v, None if attention_mask is None else ~attention_mask)
        return context.permute(2, 0, 1, 3).reshape(q_len, batch, -1)

    def _attend(self, q, k, v, allowed: torch.Tensor | None) -> torch.Tensor:
        """SDPA where ``allowed`` (True: may attend) is given, else causal."""
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=allowed,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=allowed is None,
            scale=self.softmax_scale,
            enable_gqa=self.groups_per_partition != self.heads_per_partition,
        )

    def _blockwise(self, q, k, v, blocks: torch.Tensor) -> torch.Tensor:
        """Attention of ``[b, heads, s, d]`` packed rows block by block (see the class docstring)."""
        if blocks.device.type != "cpu" or blocks.dim() != 2 or blocks.shape[1] != 5:
            raise ValueError("SDPACoreAttention: an integer attention_mask must be a CPU [N, 5] tensor of pair blocks")
        batch, heads, length, _ = q.shape
        by_row: list[list[list[int]]] = [[] for _ in range(batch)]
        for row, *block in blocks.tolist():
            if not 0 <= row < batch:
                raise ValueError(f"SDPACoreAttention: a pair block names row {row} of a batch of {batch}")
            by_row[row].append(block)

        def padding(count: int) -> torch.Tensor:
            # Padding attends to nothing: its context is 0, finite, and reaches no real token.
            return q.new_zeros(1, heads, count, v.shape[-1])

        rows = []
        for row, row_blocks in enumerate(by_row):
            qr, kr, vr = q[row:row + 1], k[row:row + 1], v[row:row + 1]
            pieces, end = [], 0
            for start, shared, first, second in sorted(row_blocks):
                head, tail = start + shared + first, start + shared + first + second
                if start < end or tail > length:
                    raise ValueError(f"SDPACoreAttention: pair block {(row, start, shared, first, second)} "
                                     f"overlaps another or passes the row's {length} tokens")
                if start > end:
                    pieces.append(padding(start - end))
                pieces.append(self._attend(qr[:, :, start:head], kr[:, :, start:head], vr[:, :, start:head], None))
                if second and shared:
                    # The second part sees the shared tokens and itself (causally), never the first part.
                    keys, values = (torch.cat([t[:, :, start:start + shared], t[:, :, head:tail]], dim=2)
                                    for t in (kr, vr))
                    allowed = torch.ones(second, shared + second, dtype=torch.bool, device=q.device).tril(shared)
                    pieces.append(self._attend(qr[:, :, head:tail], keys, values, allowed))
                elif second:
                    pieces.append(self._attend(qr[:, :, head:tail], kr[:, :, head:tail], vr[:, :, head:tail], None))
                end = tail
            if end < length:
                pieces.append(padding(length - end))
            rows.append(torch.cat(pieces, dim=2))
        return torch.cat(rows, dim=0)
