"""Builds megatron-core ``GPTModel`` chunks from a NeMo-style ``model`` config."""

from __future__ import annotations

import warnings

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_dpo.models.nlp.gpt.architecture import NORMALIZATIONS, GPTArchitecture, precision_dtype
from nemo_dpo.models.nlp.gpt.init import initialize_weights
from nemo_dpo.models.nlp.gpt.layer_specs import gpt_block_spec, gpt_layer_spec
from nemo_dpo.models.nlp.gpt.lora import LoRASettings, attach_lora
from nemo_dpo.parallel.cpu_compat import transformer_config_overrides
from nemo_dpo.parallel.device import accelerator_device


def transformer_config_from_cfg(cfg) -> TransformerConfig:
    """megatron-core ``TransformerConfig`` for the model config and the live parallel layout."""
    arch = GPTArchitecture.from_config(cfg)
    dtype = precision_dtype(cfg.get("precision", 32))
    gated = arch.gated_linear_unit
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    settings = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        normalization=NORMALIZATIONS[arch.normalization],
        layernorm_epsilon=arch.layernorm_epsilon,
        activation_func=arch.activation_func,
        gated_linear_unit=gated,
        add_bias_linear=arch.bias,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=cfg.get("hidden_dropout", 0.0),
        attention_dropout=cfg.get("attention_dropout", 0.0),
        init_method_std=cfg.get("init_method_std", 0.02),
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        sequence_parallel=sequence_parallel_setting(cfg, tp_size),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        # Weights are drawn by initialize_weights, layout-independently.
        use_cpu_initialization=True,
        perform_initialization=False,
        bias_activation_fusion=arch.bias and not gated,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        **recompute_settings(cfg),
    )
    settings.update(transformer_config_overrides())
    return TransformerConfig(**settings)


def sequence_parallel_setting(cfg, tp_size: int) -> bool:
    """``model.sequence_parallel``, turned off with a warning without tensor parallelism (as NeMo does).

    Sequence parallelism splits, over the TP ranks, the activations that tensor
    parallelism replicates (norms, dropout, residuals); with one TP rank there is
    nothing to split, and megatron refuses the setting.
    """
    value = cfg.get("sequence_parallel", False)
    if not isinstance(value, bool):
        raise ValueError(f"model.sequence_parallel must be true or false, got {value!r}")
    if value and tp_size == 1:
        warnings.warn("model.sequence_parallel=True needs tensor_model_parallel_size >= 2; turned off")
        return False
    return value


RECOMPUTE_GRANULARITIES = ("selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")


def recompute_settings(cfg) -> dict:
    """megatron's recompute settings from NeMo's ``activations_checkpoint_*`` keys; empty when off."""
    granularity = cfg.get("activations_checkpoint_granularity")
    method = cfg.get("activations_checkpoint_method")
    num_layers = cfg.get("activations_checkpoint_num_layers")
    if granularity is None:
        return {}
    if granularity not in RECOMPUTE_GRANULARITIES:
        raise ValueError(
            f"model.activations_checkpoint_granularity must be null or one of {RECOMPUTE_GRANULARITIES}, "
            f"got {granularity!r}"
        )
    if granularity == "selective":
        # megatron recomputes the core attention of every layer; method and count do not apply.
        if method is not None:
            raise ValueError(
                f"model.activations_checkpoint_method must be null with selective granularity, got {method!r}"
            )
        if num_layers is not None:
            raise ValueError(
                f"model.activations_checkpoint_num_layers must be null with selective granularity, got {num_layers!r}"
            )
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    if method not in RECOMPUTE_METHODS:
        raise ValueError(
            f"model.activations_checkpoint_method must be one of {RECOMPUTE_METHODS} with full granularity, "
            f"got {method!r}"
        )
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(
            f"model.activations_checkpoint_num_layers must be a positive integer with full granularity, "
            f"got {num_layers!r}"
        )
    return dict(recompute_granularity="full", recompute_method=method, recompute_num_layers=num_layers)


def build_gpt_model(cfg, vocab_size: int, seed: int | None = None) -> list[GPTModel]:
    """The model chunks this rank holds (one, or one per virtual pipeline stage).

    ``vocab_size`` is the tokenizer's; the embedding is padded to
    ``make_vocab_size_divisible_by`` x TP. Weights are initialised with
    :func:`initialize_weights`, so every parallel layout starts from the same
    model for the same ``seed`` (default ``cfg.seed``). With ``model.peft.peft_scheme:
    lora`` the chunks carry LoRA adapters, drawn from ``seed`` too, and their base
    weights are frozen (``lora.py``).
    """
    arch = GPTArchitecture.from_config(cfg)
    lora = LoRASettings.from_config(cfg)
    use_transformer_engine = cfg.get("transformer_engine")
    # Adapters hook megatron-core's own parallel linear layers (see lora.py); packed pair
    # blocks need our SDPA core attention: both take the local layers.
    needs_local_layers = {"model.peft.peft_scheme=lora: the adapters need": lora is not None,
                          "model.data.packing=true: packed pair blocks need": (cfg.get("data") or {}).get("packing")}
    for why in (why for why, on in needs_local_layers.items() if on):
        if use_transformer_engine:
            raise ValueError(f"model.transformer_engine=true with {why} megatron-core's local layers; "
                             "set transformer_engine to null or false")
        use_transformer_engine = False
    config = transformer_config_from_cfg(cfg)
    padded = arch.padded_vocab_size(config.tensor_model_parallel_size, vocab_size)
    layer_spec = gpt_layer_spec(config.normalization, use_transformer_engine, arch.qk_layernorm)
    vp_size = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=gpt_block_spec(layer_spec, config, stage),
            vocab_size=padded,
            max_sequence_length=arch.max_sequence_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=arch.share_embeddings_and_output_weights,
            position_embedding_type=arch.position_embedding_type,
            rotary_percent=arch.rotary_percentage,
            rotary_base=arch.rotary_base,
            seq_len_interpolation_factor=arch.seq_len_interpolation_factor,
            rope_scaling=bool(arch.scale_positional_embedding),
            # Read only when rope_scaling is on, and then GPTArchitecture has set it.
            rope_scaling_factor=arch.rope_scaling_factor,
            vp_stage=stage,
        )
        model.true_vocab_size = vocab_size
        _mark_tensor_parallel_weights(model)
        chunks.append(model.to(accelerator_device()))
    seed = cfg.get("seed", 1234) if seed is None else seed
    initialize_weights(chunks, config, vocab_size, seed)
    if lora is not None:
        attach_lora(chunks, lora, seed)
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
