"""``config.json`` of Llama-like Hugging Face models <-> our NeMo-named architecture keys."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from nemo_dpo.interop.hf.families import family_for_architecture, family_of_config
from nemo_dpo.models.nlp.gpt.architecture import HF_DTYPE_NAMES, GPTArchitecture

# The source model's config.json, kept beside the tokenizer so an export can
# restore everything that is not architecture (model_type, special token ids,
# sliding window, ...).
SOURCE_CONFIG_NAME = "hf_config.json"
# megatron-core's llama3 scaling takes only the factor and hard-codes these.
LLAMA3_FIXED = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
SCALED_ROPE_TYPES = ("linear", "llama3")


def read_hf_config(folder: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a Hugging Face model folder."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder: config.json is missing")
    return json.loads(path.read_text(encoding="utf-8"))


def _rope_settings(config: dict) -> tuple[float, dict | None]:
    # transformers < 5 writes rope_theta / rope_scaling; 5.x writes rope_parameters.
    parameters = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", parameters.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if scaling is None and parameters.get("rope_type", "default") != "default":
        scaling = parameters
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta), scaling


def _scaling_keys(name: str, scaling: dict | None) -> dict:
    """Our RoPE-scaling keys for an HF ``rope_scaling`` / ``rope_parameters`` dict (``None``: unscaled)."""
    if scaling is None:
        return {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return dict(seq_len_interpolation_factor=float(scaling["factor"]))
    if kind == "llama3":
        given = {key: scaling.get(key) for key in LLAMA3_FIXED}
        if given != LLAMA3_FIXED:
            raise ValueError(
                f"{name} uses RoPE scaling 'llama3' with "
                f"{', '.join(f'{key}={value!r}' for key, value in given.items())}; megatron-core implements it "
                f"only with {', '.join(f'{key}={value!r}' for key, value in LLAMA3_FIXED.items())}"
            )
        return dict(scale_positional_embedding=True, rope_scaling_factor=float(scaling["factor"]))
    raise ValueError(f"{name} uses RoPE scaling {kind!r}, which nemo-dpo does not implement; supported rope_type: "
                     f"{', '.join(map(repr, ('default', *SCALED_ROPE_TYPES)))}")


def _hf_scaling(arch: GPTArchitecture) -> dict:
    """The HF rope type and parameters (less rope_theta) of ``arch``'s RoPE scaling."""
    if arch.scale_positional_embedding and arch.seq_len_interpolation_factor is not None:
        raise ValueError("model.scale_positional_embedding with model.seq_len_interpolation_factor has no "
                         "Hugging Face equivalent; set one of them")
    if arch.scale_positional_embedding:
        return dict(rope_type="llama3", factor=float(arch.rope_scaling_factor), **LLAMA3_FIXED)
    if arch.seq_len_interpolation_factor is not None:
        return dict(rope_type="linear", factor=float(arch.seq_len_interpolation_factor))
    return dict(rope_type="default")


def architecture_from_hf_config(config: dict) -> dict:
    """Our NeMo-named architecture keys for the ``config.json`` of a supported family."""
    family = family_of_config(config)
    name = family.architecture
    if config.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"{name} with hidden_act={config['hidden_act']!r} is not supported (only silu)")
    theta, scaling = _rope_settings(config)
    scaling_keys = _scaling_keys(name, scaling)
    if family.refused_sliding_window and config.get(family.refused_sliding_window, False):
        raise ValueError(
            f"{name} with {family.refused_sliding_window}=true is not supported (full causal attention only)"
        )
    bias, qkv_bias = family.biases(config)
    window = config.get(family.warned_sliding_window) if family.warned_sliding_window else None
    if window is not None:
        warnings.warn(
            f"{name} has sliding_window={window}; nemo-dpo attends over the full causal context, "
            f"which is exact for sequences of up to {window} tokens",
            stacklevel=2,
        )
    arch = GPTArchitecture(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=config["num_attention_heads"],
        num_query_groups=config.get("num_key_value_heads"),
        kv_channels=config.get("head_dim"),
        normalization="rmsnorm",
        activation="swiglu",
        position_embedding_type="rope",
        rotary_base=theta,
        rotary_percentage=float(config.get("partial_rotary_factor", 1.0)),
        share_embeddings_and_output_weights=bool(config.get("tie_word_embeddings", False)),
        bias=bias,
        qkv_bias=qkv_bias,
        qk_layernorm=family.qk_norm,
        layernorm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=config.get("max_position_embeddings"),
        **scaling_keys,
    )
    return arch.to_dict()


def hf_config_from_architecture(
    architecture: dict,
    vocab_size: int,
    dtype: torch.dtype,
    template: dict | None = None,
    special_token_ids: dict | None = None,
) -> dict:
    """A ``config.json`` for ``architecture``.

    ``template`` (the source model's own config.json) keeps everything that is
    not architecture, e.g. its ``model_type`` (Mistral stays Mistral), special
    token ids and sliding window; without one the first family of the table
    that expresses the architecture is used.
    """
    arch = GPTArchitecture.from_config(architecture)
    family = family_for_architecture(arch)
    if template is not None:
        source = family_of_config(template)
        if not source.expresses(arch):
            raise ValueError(
                f"the source config is {source.architecture}, but the model's biases and norms make it a "
                f"{family.model_type} model"
            )
        family = source
        config = json.loads(json.dumps(template))
    else:
        config = {"architectures": [family.architecture], "model_type": family.model_type, **(special_token_ids or {})}
    theta = float(arch.rotary_base)
    config.update(
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        head_dim=arch.kv_channels,
        hidden_act="silu",
        rms_norm_eps=float(arch.layernorm_epsilon),
        max_position_embeddings=arch.max_sequence_length,
        tie_word_embeddings=arch.share_embeddings_and_output_weights,
        rope_theta=theta,
        torch_dtype=HF_DTYPE_NAMES[dtype],
    )
    scaling = _hf_scaling(arch)
    # Written in the template's spelling: transformers 5.x rope_parameters, else < 5 rope_scaling.
    parameters = config.get("rope_parameters")
    if isinstance(parameters, dict):
        # Other keys the template keeps there (e.g. partial_rotary_factor) stay.
        for key in ("factor", *LLAMA3_FIXED):
            parameters.pop(key, None)
        parameters.update(scaling, rope_theta=theta)
    elif scaling["rope_type"] != "default":
        config["rope_scaling"] = scaling
    elif "rope_scaling" in config:
        config["rope_scaling"] = None
    config.pop("dtype", None)
    forced, defaults = family.export_settings(arch)
    config.update(forced)
    for key, value in defaults.items():
        config.setdefault(key, value)
    return config
