"""nemo-dpo model folders: architecture, tokenizer and reshardable weights in one place.

Layout::

    <folder>/model_config.yaml   architecture keys of ``model.*`` (NeMo names, defaults resolved)
    <folder>/tokenizer/          tokenizer.json, tokenizer_config.json
    <folder>/weights/            megatron-core distributed checkpoint (any TP/PP)
    <folder>/manifest.json       size and checksum of every file above

``pretrained_checkpoint.restore_from_path`` points at such a folder; the
architecture it records overrides the run config's, as NeMo Aligner's
``load_and_override_model_config`` does. Training checkpoints are model
folders with more beside them (:mod:`nemo_dpo.checkpoint.training_checkpoint`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import OmegaConf

from nemo_dpo.checkpoint.dist_ckpt import atomic_checkpoint_dir, is_complete, load_model_weights, save_model_weights
from nemo_dpo.checkpoint.integrity import CheckpointError, folder_problem, reading
from nemo_dpo.models.nlp.gpt.architecture import GPTArchitecture
from nemo_dpo.parallel.collectives import barrier, broadcast_object, is_rank0

MODEL_CONFIG = "model_config.yaml"
TOKENIZER_DIR = "tokenizer"
WEIGHTS_DIR = "weights"
# The small trained model the example starts from when no checkpoint is given.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_model"


def read_model_config(folder: str | Path) -> dict:
    """Architecture recorded in a model folder (checked); clear errors for a wrong path."""
    folder = Path(folder)
    config = folder / MODEL_CONFIG
    if not config.is_file():
        raise FileNotFoundError(
            f"{folder} is not a nemo-dpo model folder: {config.name} is missing"
        )
    with reading(folder, MODEL_CONFIG):
        architecture = OmegaConf.to_container(OmegaConf.load(config))
    GPTArchitecture.from_config(architecture)
    return architecture


def write_architecture_and_tokenizer(staging: Path, model_cfg, tokenizer_dir: str | Path) -> None:
    """``model_config.yaml`` and ``tokenizer/`` into ``staging`` (rank 0 only): what the weights fit."""
    architecture = GPTArchitecture.from_config(model_cfg).to_dict()
    OmegaConf.save(OmegaConf.create(architecture), staging / MODEL_CONFIG)
    shutil.copytree(tokenizer_dir, staging / TOKENIZER_DIR)


def write_model_folder(staging: Path, model_chunks, model_cfg, tokenizer_dir: str | Path) -> None:
    """Write the model folder's files into the (existing) folder ``staging`` (collective).

    The one writer of model folders: :func:`save_pretrained` and training
    checkpoints both call it inside their atomic save.
    """
    if is_rank0():
        write_architecture_and_tokenizer(staging, model_cfg, tokenizer_dir)
        (staging / WEIGHTS_DIR).mkdir()
    barrier()
    save_model_weights(model_chunks, staging / WEIGHTS_DIR)


def save_pretrained(model_chunks, model_cfg, tokenizer_dir: str | Path, folder: str | Path) -> Path:
    """Write a model folder atomically from the live model (collective: call on every rank)."""
    with atomic_checkpoint_dir(folder) as staging:
        write_model_folder(staging, model_chunks, model_cfg, tokenizer_dir)
    return Path(folder)


def check_model_folder(folder: str | Path) -> None:
    """Raise a :class:`CheckpointError` naming the file if ``folder`` is incomplete or damaged (collective).

    The files are checked against the folder's manifest on rank 0, once.
    """
    if not is_complete(folder):
        raise ValueError(f"checkpoint {folder} is incomplete (no completion marker): its save did not finish")
    problem = broadcast_object(folder_problem(folder, (WEIGHTS_DIR,)) if is_rank0() else None)
    if problem:
        raise CheckpointError(f"cannot read checkpoint {folder}: {problem}")


def load_pretrained_weights(model_chunks, folder: str | Path) -> None:
    """Load a model folder's weights into chunks of any TP/PP layout (collective).

    A read failure raises a :class:`CheckpointError` naming the file; call
    :func:`check_model_folder` first to check every file against the manifest.
    """
    if not is_complete(folder):
        raise ValueError(f"checkpoint {folder} is incomplete (no completion marker): its save did not finish")
    with reading(folder, f"{WEIGHTS_DIR}/", (WEIGHTS_DIR,)):
        load_model_weights(model_chunks, Path(folder) / WEIGHTS_DIR)
