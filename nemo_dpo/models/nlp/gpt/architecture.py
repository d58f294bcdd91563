"""The shape of a GPT network, typed and validated once: :class:`GPTArchitecture`.

Field names are the NeMo ``model.*`` config keys, so a model config, a
``model_config.yaml`` and an imported checkpoint's translation all describe a
network the same way. Every default that depends on other keys (FFN width, query
groups, head size, q/k/v bias) is derived here and nowhere else. Precision
names and dtypes have their one table here too.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

NORMALIZATIONS = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}
# name -> (activation function, gated linear unit)
ACTIVATIONS = {
    "gelu": (F.gelu, False),
    "squared-relu": (lambda x: torch.pow(F.relu(x), 2), False),
    "swiglu": (F.silu, True),
    "fast-swiglu": (F.silu, True),
    "geglu": (F.gelu, True),
}
POSITION_EMBEDDINGS = ("learned_absolute", "rope")

# Canonical dtype names, with the spellings ``model.precision`` accepts for each.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = {32: "fp32", "32": "fp32", "fp32": "fp32", "bf16": "bf16", "bf16-mixed": "bf16",
              16: "fp16", "16": "fp16", "16-mixed": "fp16", "fp16": "fp16"}
# torch dtype -> the name Hugging Face writes in config.json
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def unsupported(key: str, value: Any, valid) -> ValueError:
    """The error for a config value outside ``valid``, listing the valid ones."""
    return ValueError(f"model.{key}={value!r} is not supported; valid: {sorted(map(str, valid))}")


def precision_dtype(precision) -> torch.dtype:
    """The torch dtype of a ``model.precision`` value (32, "bf16", "16-mixed", ...)."""
    if precision not in PRECISIONS:
        raise unsupported("precision", precision, PRECISIONS)
    return DTYPES[PRECISIONS[precision]]


@dataclass(frozen=True)
class GPTArchitecture:
    """Everything that fixes a GPT network's parameters and what it computes.

    ``None`` for ``ffn_hidden_size``, ``num_query_groups``, ``kv_channels`` and
    ``qkv_bias`` means the usual default (4 x hidden, one group per head,
    hidden / heads, ``bias``), filled in on construction. ``None`` for the
    sequence lengths, ``make_vocab_size_divisible_by`` (128) and ``vocab_size``
    means the checkpoint does not fix them: they stay out of :meth:`to_dict`, so
    merging the dict into a run config keeps the run's values.

    RoPE scaling, as NeMo names it: ``scale_positional_embedding`` turns on
    Llama 3.1-style frequency scaling by ``rope_scaling_factor`` (default 8);
    ``seq_len_interpolation_factor`` divides positions (linear scaling). ``None``
    means unscaled, and keeps the keys out of :meth:`to_dict`.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int | None = None
    num_query_groups: int | None = None
    kv_channels: int | None = None
    normalization: str = "layernorm"
    activation: str = "gelu"
    position_embedding_type: str = "learned_absolute"
    rotary_base: float = 10000
    rotary_percentage: float = 1.0
    share_embeddings_and_output_weights: bool = True
    bias: bool = True
    qkv_bias: bool | None = None
    qk_layernorm: bool = False
    layernorm_epsilon: float = 1e-5
    encoder_seq_length: int | None = None
    max_position_embeddings: int | None = None
    make_vocab_size_divisible_by: int | None = None
    vocab_size: int | None = None
    scale_positional_embedding: bool | None = None
    rope_scaling_factor: float | None = None
    seq_len_interpolation_factor: float | None = None

    def __post_init__(self):
        for key in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "num_query_groups",
                    "kv_channels", "encoder_seq_length", "max_position_embeddings",
                    "make_vocab_size_divisible_by", "vocab_size"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"model.{key}={value!r} must be a positive integer")
        if self.normalization not in NORMALIZATIONS:
            raise unsupported("normalization", self.normalization, NORMALIZATIONS)
        if self.activation not in ACTIVATIONS:
            raise unsupported("activation", self.activation, ACTIVATIONS)
        if self.position_embedding_type not in POSITION_EMBEDDINGS:
            raise unsupported("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDINGS)
        self._check_rope_scaling()
        hidden, heads = self.hidden_size, self.num_attention_heads
        if self.kv_channels is None and hidden % heads:
            raise ValueError(
                f"model.hidden_size={hidden} is not divisible by model.num_attention_heads={heads}; "
                "set model.kv_channels (the size of one head) explicitly"
            )
        derived = dict(
            ffn_hidden_size=self.ffn_hidden_size or 4 * hidden,
            num_query_groups=self.num_query_groups or heads,
            kv_channels=self.kv_channels or hidden // heads,
            qkv_bias=self.bias if self.qkv_bias is None else self.qkv_bias,
        )
        if self.scale_positional_embedding and self.rope_scaling_factor is None:
            derived["rope_scaling_factor"] = 8.0  # NeMo's and megatron-core's default
        for key, value in derived.items():
            object.__setattr__(self, key, value)
        if heads % self.num_query_groups:
            raise ValueError(
                f"model.num_attention_heads={heads} is not a multiple of "
                f"model.num_query_groups={self.num_query_groups}"
            )

    def _check_rope_scaling(self):
        for key in ("rope_scaling_factor", "seq_len_interpolation_factor"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ValueError(f"model.{key}={value!r} must be a positive finite number")
        if self.rope_scaling_factor is not None and not self.scale_positional_embedding:
            raise ValueError(f"model.rope_scaling_factor={self.rope_scaling_factor!r} needs "
                             "model.scale_positional_embedding=true")
        scaling = "scale_positional_embedding" if self.scale_positional_embedding else (
            "seq_len_interpolation_factor" if self.seq_len_interpolation_factor is not None else None)
        if scaling and self.position_embedding_type != "rope":
            raise ValueError(f"model.{scaling} needs model.position_embedding_type='rope', "
                             f"not {self.position_embedding_type!r}")

    @classmethod
    def from_config(cls, cfg) -> GPTArchitecture:
        """The architecture keys of a model config (DictConfig or dict); other keys are ignored."""
        values = {field.name: cfg.get(field.name) for field in dataclasses.fields(cls)}
        missing = [key for key in ("num_layers", "hidden_size", "num_attention_heads") if values[key] is None]
        if missing:
            raise ValueError(f"the model config lacks {', '.join('model.' + key for key in missing)}")
        for key in ("share_embeddings_and_output_weights", "bias", "qkv_bias", "qk_layernorm",
                    "scale_positional_embedding"):
            if values[key] is not None:
                values[key] = bool(values[key])
        return cls(**{key: value for key, value in values.items() if value is not None})

    def to_dict(self) -> dict:
        """The keys for ``model_config.yaml`` / a model config (unset optional keys left out)."""
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}

    @property
    def activation_func(self):
        return ACTIVATIONS[self.activation][0]

    @property
    def gated_linear_unit(self) -> bool:
        return ACTIVATIONS[self.activation][1]

    @property
    def max_sequence_length(self) -> int | None:
        """Positions the model can embed: ``max_position_embeddings``, else ``encoder_seq_length``."""
        return self.max_position_embeddings or self.encoder_seq_length

    def check_sequence_length(self, seq_length: int) -> str | None:
        """Refuse ``seq_length`` beyond learned position embeddings; a warning text beyond RoPE's trained length.

        Learned positions have one embedding row per position, so a longer
        sequence cannot run at all. RoPE runs at any length but was trained up to
        ``max_position_embeddings`` (or ``encoder_seq_length``); beyond it quality is unknown.
        """
        limit = self.max_sequence_length
        if limit is None or seq_length <= limit:
            return None
        if self.position_embedding_type == "learned_absolute":
            raise ValueError(
                f"model.data.seq_length={seq_length} exceeds the {limit} positions this model's learned "
                "position embeddings hold"
            )
        return (f"model.data.seq_length={seq_length} is beyond the {limit} positions this RoPE model was "
                "trained for: it runs, but quality past that length is unknown")

    def padded_vocab_size(self, tensor_parallel_size: int, vocab_size: int | None = None) -> int:
        """Embedding rows to build: the vocabulary rounded up so each TP shard is a multiple of
        ``make_vocab_size_divisible_by`` (default 128)."""
        vocab_size = self.vocab_size if vocab_size is None else vocab_size
        if vocab_size is None:
            raise ValueError("the vocabulary size is not known: pass vocab_size")
        multiple = (self.make_vocab_size_divisible_by or 128) * tensor_parallel_size
        return -(-vocab_size // multiple) * multiple
