"""A NeMo 1.0 GPT ``model_config.yaml`` -> our architecture keys.

The config already uses our key names, so the architecture is mostly a copy,
with NeMo spellings normalised (``fast-swiglu`` -> ``swiglu``) and every setting
our builder cannot honour refused by name.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from nemo_dpo.models.nlp.gpt.architecture import GPTArchitecture, unsupported

_ACTIVATIONS = {
    "gelu": "gelu", "swiglu": "swiglu", "fast-swiglu": "swiglu", "geglu": "geglu",
    "fast-geglu": "geglu", "squared-relu": "squared-relu",
}
# NeMo settings our model cannot reproduce, with the value that is harmless.
_MUST_BE_DEFAULT = {
    "num_moe_experts": (None, 0, 1),
    "rotary_interleaved": (None, False),
    "transformer_block_type": (None, "pre_ln"),
    "layernorm_zero_centered_gamma": (None, False),
    "apply_residual_connection_post_layernorm": (None, False),
    "normalize_attention_scores": (None, True),
    "headscale": (None, False),
    "window_size": (None,),
    "context_parallel_size": (None, 1),
}


def config_value(config: DictConfig, key: str, default=None):
    """``config.<key>`` (a dotted path), or ``default`` when absent, null or unresolvable."""
    value = OmegaConf.select(config, key, default=default, throw_on_resolution_failure=False)
    return default if value is None else value


def architecture_from_nemo_config(config: DictConfig) -> dict:
    """Our architecture keys from a NeMo 1.0 GPT ``model_config.yaml``; unsupported settings raise."""
    target = str(config_value(config, "target", ""))
    if target and "GPT" not in target:
        raise ValueError(f"{target} is not a GPT model; only megatron-core GPT .nemo checkpoints are supported")
    if not config_value(config, "mcore_gpt", False):
        raise ValueError(
            "this .nemo holds a legacy (mcore_gpt: false) NeMo GPT model, whose weight names differ; "
            "only megatron-core GPT checkpoints (mcore_gpt: true) are supported"
        )
    for key, harmless in _MUST_BE_DEFAULT.items():
        value = config_value(config, key)
        if value not in harmless:
            raise ValueError(f"model_config.yaml sets {key}={value!r}, which nemo-dpo does not support")
    activation = config_value(config, "activation", "gelu")
    if activation not in _ACTIVATIONS:
        raise unsupported("activation", activation, _ACTIVATIONS)
    groups = 1 if config_value(config, "multi_query_attention", False) else config_value(config, "num_query_groups")
    architecture = dict(
        num_layers=config_value(config, "num_layers"),
        hidden_size=config_value(config, "hidden_size"),
        ffn_hidden_size=config_value(config, "ffn_hidden_size"),
        num_attention_heads=config_value(config, "num_attention_heads"),
        num_query_groups=groups,
        kv_channels=config_value(config, "kv_channels"),
        normalization=config_value(config, "normalization", "layernorm"),
        activation=_ACTIVATIONS[activation],
        position_embedding_type=config_value(config, "position_embedding_type", "learned_absolute"),
        rotary_base=config_value(config, "rotary_base", 10000),
        rotary_percentage=float(config_value(config, "rotary_percentage", 1.0)),
        # Absent booleans take GPTArchitecture's defaults (NeMo's too).
        share_embeddings_and_output_weights=config_value(config, "share_embeddings_and_output_weights"),
        bias=config_value(config, "bias"),
        qkv_bias=config_value(config, "qkv_bias"),
        qk_layernorm=config_value(config, "qk_layernorm"),
        layernorm_epsilon=float(config_value(config, "layernorm_epsilon", 1e-5)),
        encoder_seq_length=config_value(config, "encoder_seq_length"),
        max_position_embeddings=config_value(config, "max_position_embeddings"),
        scale_positional_embedding=config_value(config, "scale_positional_embedding"),
        rope_scaling_factor=config_value(config, "rope_scaling_factor"),
        seq_len_interpolation_factor=config_value(config, "seq_len_interpolation_factor"),
        # NeMo's default: the padding the checkpoint's embedding was built with.
        make_vocab_size_divisible_by=config_value(config, "make_vocab_size_divisible_by", 128),
    )
    missing = [key for key in ("num_layers", "hidden_size", "num_attention_heads") if architecture[key] is None]
    if missing:
        raise ValueError(f"model_config.yaml lacks {', '.join(missing)}")
    return GPTArchitecture.from_config(architecture).to_dict()
