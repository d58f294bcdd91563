"""LoRA adapter folders: the adapters and a reference to the base model, never the base weights.

Layout (a training checkpoint of a LoRA run is this plus the optimizer and state files)::

    <folder>/lora.json            the LoRA settings and the base checkpoint the adapters were trained on
    <folder>/adapters/            megatron-core distributed checkpoint of the adapters (any TP/PP)
    <folder>/model_config.yaml    the base model's architecture (what the adapters fit)
    <folder>/tokenizer/

``model.peft.restore_from_path`` points at such a folder to start from its
adapters; ``nemo-dpo-export-hf`` merges them into the base or writes them in
PEFT's format.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from nemo_dpo.checkpoint.dist_ckpt import KEY_PREFIX, atomic_checkpoint_dir
from nemo_dpo.checkpoint.integrity import CheckpointError, reading
from nemo_dpo.checkpoint.pretrained import write_architecture_and_tokenizer
from nemo_dpo.checkpoint.safe_load import check_dist_checkpoint_files
from nemo_dpo.models.nlp.gpt.lora import adapter_sharded_state_dict, lora_of
from nemo_dpo.parallel.collectives import barrier, is_rank0

ADAPTERS_DIR = "adapters"
LORA_CONFIG = "lora.json"


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / LORA_CONFIG).is_file()


def adapter_settings(model_chunks) -> dict:
    """The chunks' LoRA settings as written to ``lora.json``."""
    return lora_of(model_chunks[0]).settings.to_dict()


def write_adapter_folder(staging: Path, model_chunks, model_cfg, tokenizer_dir: str | Path,
                         base_checkpoint: str | None) -> None:
    """Write the adapter folder's files into the (existing) folder ``staging`` (collective)."""
    if is_rank0():
        write_architecture_and_tokenizer(staging, model_cfg, tokenizer_dir)
        record = {"base_checkpoint": base_checkpoint, "lora_tuning": adapter_settings(model_chunks)}
        (staging / LORA_CONFIG).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        (staging / ADAPTERS_DIR).mkdir()
    barrier()
    dist_checkpointing.save(adapter_sharded_state_dict(model_chunks, KEY_PREFIX), str(staging / ADAPTERS_DIR))


def save_adapters(model_chunks, model_cfg, tokenizer_dir: str | Path, folder: str | Path,
                  base_checkpoint: str | None) -> Path:
    """Write an adapter folder atomically from the live model (collective: call on every rank)."""
    with atomic_checkpoint_dir(folder) as staging:
        write_adapter_folder(staging, model_chunks, model_cfg, tokenizer_dir, base_checkpoint)
    return Path(folder)


def read_lora_config(folder: str | Path) -> dict:
    """``lora.json`` of an adapter folder: ``base_checkpoint`` and ``lora_tuning``."""
    folder = Path(folder)
    if not is_adapter_folder(folder):
        raise FileNotFoundError(f"{folder} is not a LoRA adapter folder: {LORA_CONFIG} is missing")
    with reading(folder, LORA_CONFIG):
        record = json.loads((folder / LORA_CONFIG).read_text())
    if not isinstance(record, dict) or not isinstance(record.get("lora_tuning"), dict):
        raise CheckpointError(f"checkpoint {folder}: {LORA_CONFIG} must be an object with a lora_tuning object")
    return record


@torch.no_grad()
def load_adapters(model_chunks, folder: str | Path) -> None:
    """Load the adapters of ``folder`` (saved at any TP/PP layout) into the chunks' adapters (collective).

    The folder's LoRA settings must be the model's: adapters of another rank,
    targets or layers do not fit and are refused naming the difference.
    """
    folder = Path(folder)
    saved = read_lora_config(folder)["lora_tuning"]
    current = adapter_settings(model_chunks)
    differing = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
    # Dropout and the initialisation do not change what the adapters hold.
    differing = [key for key in differing if key not in ("adapter_dropout", "column_init_method", "row_init_method")]
    if differing:
        raise ValueError(f"the adapters in {folder} were trained with model.peft.lora_tuning "
                         f"{ {k: saved.get(k) for k in differing} }, the model has "
                         f"{ {k: current.get(k) for k in differing} }")
    sharded = adapter_sharded_state_dict(model_chunks, KEY_PREFIX)
    params = {key: value.data for key, value in sharded.items()}
    with reading(folder, f"{ADAPTERS_DIR}/", (ADAPTERS_DIR,)):
        check_dist_checkpoint_files(folder / ADAPTERS_DIR)
        loaded = dist_checkpointing.load(sharded, str(folder / ADAPTERS_DIR))
    for key, param in params.items():
        param.copy_(loaded[key])
