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


def architecture_from_hf_config(config: dict) -> dict:
    """Our NeMo-named architecture keys for the ``config.json`` of a supported family."""
    family = family_of_config(config)
    name = family.architecture
    if config.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"{name} with hidden_act={config['hidden_act']!r} is not supported (only silu)")
    theta, scaling = _rope_settings(config)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        raise ValueError(
            f"{name} uses RoPE scaling {kind!r} (e.g. Llama 3.1+), which the nemo-dpo model builder "
            "does not implement yet; only unscaled RoPE (rope_type 'default') is supported"
        )
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
    if isinstance(config.get("rope_parameters"), dict):
        config["rope_parameters"]["rope_theta"] = theta
    config.pop("dtype", None)
    forced, defaults = family.export_settings(arch)
    config.update(forced)
    for key, value in defaults.items():
        config.setdefault(key, value)
    return config
