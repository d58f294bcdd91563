"""Builds megatron-core ``GPTModel`` chunks from a NeMo-style ``model`` config."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_dpo.models.nlp.gpt.init import initialize_weights
from nemo_dpo.parallel.cpu_compat import transformer_config_overrides
from nemo_dpo.parallel.device import accelerator_device
from nemo_dpo.models.nlp.gpt.layer_specs import gpt_layer_spec

_NORMALIZATIONS = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}
# (activation function, gated linear unit)
_ACTIVATIONS = {
    "gelu": (F.gelu, False),
    "squared-relu": (lambda x: torch.pow(F.relu(x), 2), False),
    "swiglu": (F.silu, True),
    "fast-swiglu": (F.silu, True),
    "geglu": (F.gelu, True),
}
_POSITION_EMBEDDINGS = ("learned_absolute", "rope")
_DTYPES = {32: torch.float32, "32": torch.float32, "fp32": torch.float32,
           "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16,
           16: torch.float16, "16": torch.float16, "16-mixed": torch.float16}


def _choice(cfg, key: str, default, valid):
    value = cfg.get(key, default)
    if value not in valid:
        raise ValueError(f"model.{key}={value!r} is not supported; valid: {sorted(map(str, valid))}")
    return value


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Vocab rounded up so each tensor-parallel shard is a multiple of ``divisible_by``."""
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


def transformer_config_from_cfg(cfg) -> TransformerConfig:
    """megatron-core ``TransformerConfig`` for the model config and the live parallel layout."""
    normalization = _NORMALIZATIONS[_choice(cfg, "normalization", "layernorm", _NORMALIZATIONS)]
    activation, gated = _ACTIVATIONS[_choice(cfg, "activation", "gelu", _ACTIVATIONS)]
    dtype = _DTYPES[_choice(cfg, "precision", 32, _DTYPES)]
    bias = bool(cfg.get("bias", True))
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    settings = dict(
        num_layers=cfg.num_layers,
        hidden_size=hidden,
        ffn_hidden_size=cfg.get("ffn_hidden_size") or 4 * hidden,
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_query_groups") or heads,
        kv_channels=cfg.get("kv_channels") or hidden // heads,
        normalization=normalization,
        layernorm_epsilon=cfg.get("layernorm_epsilon", 1e-5),
        activation_func=activation,
        gated_linear_unit=gated,
        add_bias_linear=bias,
        add_qkv_bias=bool(cfg.get("qkv_bias", bias)),
        hidden_dropout=cfg.get("hidden_dropout", 0.0),
        attention_dropout=cfg.get("attention_dropout", 0.0),
        init_method_std=cfg.get("init_method_std", 0.02),
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        sequence_parallel=bool(cfg.get("sequence_parallel", False)),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        # Weights are drawn by initialize_weights, layout-independently.
        use_cpu_initialization=True,
        perform_initialization=False,
        bias_activation_fusion=bias and not gated,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
    )
    settings.update(transformer_config_overrides())
    return TransformerConfig(**settings)


def build_gpt_model(cfg, vocab_size: int, seed: int | None = None) -> list[GPTModel]:
    """The model chunks this rank holds (one, or one per virtual pipeline stage).

    ``vocab_size`` is the tokenizer's; the embedding is padded to
    ``make_vocab_size_divisible_by`` x TP. Weights are initialised with
    :func:`initialize_weights`, so every parallel layout starts from the same
    model for the same ``seed`` (default ``cfg.seed``).
    """
    config = transformer_config_from_cfg(cfg)
    position_embedding_type = _choice(
        cfg, "position_embedding_type", "learned_absolute", _POSITION_EMBEDDINGS
    )
    padded = padded_vocab_size(
        vocab_size,
        cfg.get("make_vocab_size_divisible_by", 128),
        config.tensor_model_parallel_size,
    )
    layer_spec = gpt_layer_spec(config.normalization, cfg.get("transformer_engine"))
    vp_size = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec,
            vocab_size=padded,
            max_sequence_length=cfg.get("max_position_embeddings") or cfg.encoder_seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=bool(
                cfg.get("share_embeddings_and_output_weights", True)
            ),
            position_embedding_type=position_embedding_type,
            rotary_percent=cfg.get("rotary_percentage", 1.0),
            rotary_base=cfg.get("rotary_base", 10000),
            vp_stage=stage,
        )
        model.true_vocab_size = vocab_size
        _mark_tensor_parallel_weights(model)
        chunks.append(model.to(accelerator_device()))
    initialize_weights(chunks, config, vocab_size, cfg.get("seed", 1234) if seed is None else seed)
    return chunks


def _mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Tag TP-sharded weights the way megatron's own initialisers would.

    megatron-core only sets ``tensor_model_parallel`` on weights inside its
    initialisers, which ``perform_initialization=False`` skips; gradient-norm and
    DDP code rely on the tag to count each weight once.
    """
    partition_dims = {VocabParallelEmbedding: 0, ColumnParallelLinear: 0, RowParallelLinear: 1}
    for module in model.modules():
        for kind, dim in partition_dims.items():
            weight = getattr(module, "weight", None)
            if isinstance(module, kind) and weight is not None:
                set_tensor_model_parallel_attributes(weight, True, dim, 1)
