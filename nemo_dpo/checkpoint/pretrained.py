"""nemo-dpo model folders: architecture, tokenizer and reshardable weights in one place.

Layout::

    <folder>/model_config.yaml   architecture keys of ``model.*`` (NeMo names)
    <folder>/tokenizer/          tokenizer.json, tokenizer_config.json
    <folder>/weights/            megatron-core distributed checkpoint (any TP/PP)

``pretrained_checkpoint.restore_from_path`` points at such a folder; the
architecture it records overrides the run config's, as NeMo Aligner's
``load_and_override_model_config`` does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import OmegaConf

from nemo_dpo.checkpoint.dist_ckpt import atomic_checkpoint_dir, is_complete, load_model_weights, save_model_weights
from nemo_dpo.parallel.collectives import barrier, is_rank0

ARCHITECTURE_KEYS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "normalization", "activation", "position_embedding_type", "rotary_base",
    "rotary_percentage", "share_embeddings_and_output_weights", "bias", "qkv_bias",
    "layernorm_epsilon", "encoder_seq_length", "max_position_embeddings", "make_vocab_size_divisible_by",
    "vocab_size",
)
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_model"


def architecture_of(model_cfg) -> dict:
    """The keys of ``model_cfg`` that define the network's shape."""
    return {key: model_cfg[key] for key in ARCHITECTURE_KEYS if model_cfg.get(key) is not None}


def read_model_config(folder: str | Path) -> dict:
    """Architecture recorded in a model folder; clear errors for a wrong path."""
    folder = Path(folder)
    config = folder / "model_config.yaml"
    if not config.is_file():
        raise FileNotFoundError(
            f"{folder} is not a nemo-dpo model folder: {config.name} is missing"
        )
    return OmegaConf.to_container(OmegaConf.load(config))


def save_pretrained(model_chunks, model_cfg, tokenizer_dir: str | Path, folder: str | Path,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write a model folder atomically from the live model (collective: call on every rank).

    ``extra_files`` maps file names to text written beside the weights (e.g. trainer state).
    """
    with atomic_checkpoint_dir(folder) as staging:
        if is_rank0():
            OmegaConf.save(OmegaConf.create(architecture_of(model_cfg)), staging / "model_config.yaml")
            shutil.copytree(tokenizer_dir, staging / "tokenizer")
            for name, text in (extra_files or {}).items():
                (staging / name).write_text(text, encoding="utf-8")
            (staging / "weights").mkdir()
        barrier()
        save_model_weights(model_chunks, staging / "weights")
    return Path(folder)


def load_pretrained_weights(model_chunks, folder: str | Path) -> None:
    """Load a model folder's weights into chunks of any TP/PP layout (collective)."""
    if not is_complete(folder):
        raise ValueError(f"checkpoint {folder} is incomplete (no completion marker): its save did not finish")
    load_model_weights(model_chunks, Path(folder) / "weights")
