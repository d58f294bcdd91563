"""Which Hugging Face tensors make up each megatron-core checkpoint tensor.

Name map, per layer ``i`` (HF ``model.layers.i.`` -> megatron ``decoder.layers.i.``):

=================================  =============================================
``input_layernorm.weight``         ``self_attention.linear_qkv.layer_norm_weight``
``self_attn.{q,k,v}_proj.*``       ``self_attention.linear_qkv.*``: per query
                                   group g, [q heads of g; k_g; v_g]
``self_attn.o_proj.*``             ``self_attention.linear_proj.*``
``post_attention_layernorm.weight``  ``mlp.linear_fc1.layer_norm_weight``
``mlp.{gate,up}_proj.*``           ``mlp.linear_fc1.*`` = [gate; up] (megatron's
                                   gated unit applies the activation to the
                                   first half)
``mlp.down_proj.*``                ``mlp.linear_fc2.*``
``self_attn.{q,k}_norm.weight``    ``self_attention.{q,k}_layernorm.weight``
                                   (Qwen3's per-head query/key norms)
=================================  =============================================

plus ``model.embed_tokens.weight`` / ``embedding.word_embeddings.weight``,
``model.norm.weight`` / ``decoder.final_layernorm.weight`` and ``lm_head.weight``
/ ``output_layer.weight`` (absent when the embeddings are tied). The megatron
names are checkpoint keys (transformer-engine spelling), which the local layer
spec maps onto its own modules.

Both directions go through one table (:meth:`HFTensorMap.segments`): each megatron
tensor is a stack of row ranges of HF tensors, so an import followed by an
export gives back the original tensors bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from nemo_dpo.interop.weight_transfer import EMBEDDING_KEY, LAYER_PREFIX, OUTPUT_LAYER_KEY, Slot
from nemo_dpo.models.nlp.gpt.architecture import GPTArchitecture


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, start + length)`` of HF tensor ``name`` (``None``: vocab padding, zeros)."""

    name: str | None
    start: int
    length: int


class HFTensorMap:
    """Which HF tensors make up each megatron checkpoint tensor, for one architecture."""

    def __init__(self, architecture: GPTArchitecture, vocab_size: int):
        a = architecture
        self.hidden, self.heads, self.groups = a.hidden_size, a.num_attention_heads, a.num_query_groups
        self.head_dim, self.ffn, self.num_layers = a.kv_channels, a.ffn_hidden_size, a.num_layers
        self.tied = a.share_embeddings_and_output_weights
        self.bias, self.qkv_bias, self.qk_norm = a.bias, a.qkv_bias, a.qk_layernorm
        self.vocab_size = vocab_size

    @cached_property
    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor an HF checkpoint of this architecture holds, with its shape."""
        h, d = self.hidden, self.head_dim
        q, kv = self.heads * d, self.groups * d
        shapes = {"model.embed_tokens.weight": (self.vocab_size, h), "model.norm.weight": (h,)}
        if not self.tied:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (self.ffn, h),
                p + "mlp.up_proj.weight": (self.ffn, h),
                p + "mlp.down_proj.weight": (h, self.ffn),
            })
            if self.qk_norm:
                shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
            if self.qkv_bias:
                shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                               p + "self_attn.v_proj.bias": (kv,)})
            if self.bias:
                shapes.update({p + "self_attn.o_proj.bias": (h,), p + "mlp.gate_proj.bias": (self.ffn,),
                               p + "mlp.up_proj.bias": (self.ffn,), p + "mlp.down_proj.bias": (h,)})
        return shapes

    def segments(self, key: str, layer: int | None, rows: int) -> list[Segment]:
        """The megatron tensor ``key`` (of ``layer``, ``rows`` rows) as a stack of HF row ranges."""
        if key in (EMBEDDING_KEY, OUTPUT_LAYER_KEY):
            name = "model.embed_tokens.weight" if key == EMBEDDING_KEY or self.tied else "lm_head.weight"
            if rows < self.vocab_size:
                raise ValueError(f"{key} has {rows} rows, fewer than the vocabulary ({self.vocab_size})")
            return [Segment(name, 0, self.vocab_size), Segment(None, 0, rows - self.vocab_size)]
        if key == "decoder.final_layernorm.weight":
            return [Segment("model.norm.weight", 0, self.hidden)]
        if layer is None or not key.startswith(LAYER_PREFIX):
            raise ValueError(f"{key} has no Hugging Face counterpart")
        suffix = key[len(LAYER_PREFIX):]
        p = f"model.layers.{layer}."
        kind = suffix.rsplit(".", 1)[-1]
        if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            d, per_group = self.head_dim, self.heads // self.groups
            stack = []
            for g in range(self.groups):
                stack += [Segment(p + f"self_attn.q_proj.{kind}", g * per_group * d, per_group * d),
                          Segment(p + f"self_attn.k_proj.{kind}", g * d, d),
                          Segment(p + f"self_attn.v_proj.{kind}", g * d, d)]
            return stack
        if suffix in ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias"):
            return [Segment(p + f"mlp.gate_proj.{kind}", 0, self.ffn), Segment(p + f"mlp.up_proj.{kind}", 0, self.ffn)]
        single = {
            "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight", self.hidden),
            "mlp.linear_fc1.layer_norm_weight": ("post_attention_layernorm.weight", self.hidden),
            "self_attention.linear_proj.weight": ("self_attn.o_proj.weight", self.hidden),
            "self_attention.linear_proj.bias": ("self_attn.o_proj.bias", self.hidden),
            "mlp.linear_fc2.weight": ("mlp.down_proj.weight", self.hidden),
            "mlp.linear_fc2.bias": ("mlp.down_proj.bias", self.hidden),
            "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight", self.head_dim),
            "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight", self.head_dim),
        }
        if suffix not in single:
            raise ValueError(f"{key} has no Hugging Face counterpart")
        name, length = single[suffix]
        return [Segment(p + name, 0, length)]

    def to_hf(self, key: str, layer: int | None, full: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a full megatron tensor into its HF tensors (vocab padding dropped)."""
        pieces: dict[str, list[torch.Tensor]] = {}
        row = 0
        for seg in self._checked(key, layer, full.shape[0]):
            if seg.name is not None:
                pieces.setdefault(seg.name, []).append(full[row:row + seg.length])
            row += seg.length
        return {name: torch.cat(parts).contiguous() for name, parts in pieces.items()}

    def check_model_tensor(self, key: str, layer: int | None, shape: tuple[int, ...]) -> None:
        """Raise unless the model's full tensor ``key`` is what this architecture makes of HF tensors."""
        hf_shapes = self.hf_shapes
        for seg in self._checked(key, layer, shape[0]):
            if seg.name is not None and hf_shapes[seg.name][1:] != tuple(shape[1:]):
                raise ValueError(
                    f"{key} (layer {layer}): the model's tensor has shape {tuple(shape)}, which does not "
                    f"match {seg.name} {hf_shapes[seg.name]}; build the model from the checkpoint's architecture"
                )

    def _checked(self, key: str, layer: int | None, rows: int) -> list[Segment]:
        stack = self.segments(key, layer, rows)
        total = sum(seg.length for seg in stack)
        if total != rows:
            where = key if layer is None else f"{key} (layer {layer})"
            raise ValueError(
                f"{where}: the model's tensor has {rows} rows but the checkpoint's architecture gives "
                f"{total}; build the model from the checkpoint's architecture"
            )
        return stack

    def read_piece(self, slot: Slot, read_rows) -> torch.Tensor:
        """This slot's values, from ``read_rows(name, start, stop, column_index)`` calls."""
        rows, columns = slot.index[0], slot.index[1:]
        parts, base = [], 0
        for seg in self._checked(slot.key, slot.layer, slot.shape[0]):
            lo, hi = max(rows.start, base), min(rows.stop, base + seg.length)
            if lo < hi:
                if seg.name is None:
                    width = [c.stop - c.start for c in columns]
                    parts.append(torch.zeros([hi - lo, *width], dtype=slot.data.dtype))
                else:
                    start = seg.start + lo - base
                    parts.append(read_rows(seg.name, start, start + hi - lo, columns))
            base += seg.length
        return torch.cat([p.to(slot.data.dtype) for p in parts])
