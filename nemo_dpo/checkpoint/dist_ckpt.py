"""Model weights through megatron-core distributed checkpointing: save at one layout, load at any.

A checkpoint folder is written under a temporary name and renamed into place
only once every rank has finished, so a crash mid-save never leaves a folder
that looks complete, and never touches an existing checkpoint of the same name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing

COMPLETE_MARKER = ".complete"


# Checkpoint keys carry NeMo's "model." prefix so NeMo 1.0 mcore checkpoints line up.
KEY_PREFIX = "model."


def _chunk_names(model_chunks) -> list[str]:
    # megatron's convention: "model" for one chunk, "model<i>" per virtual stage.
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def model_sharded_state_dict(model_chunks) -> dict:
    """Sharded state dicts of the chunks this rank holds, keyed by chunk name."""
    return {
        name: getattr(chunk, "module", chunk).sharded_state_dict(prefix=KEY_PREFIX)
        for name, chunk in zip(_chunk_names(model_chunks), model_chunks)
    }


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_model_weights(model_chunks, checkpoint_dir: str | os.PathLike) -> Path:
    """Write the model's weights to ``checkpoint_dir`` (collective: call on every rank)."""
    final = Path(checkpoint_dir)
    staging = final.with_name(final.name + ".tmp")
    if _is_rank0():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(model_sharded_state_dict(model_chunks), str(staging))
    _barrier()
    if _is_rank0():
        (staging / COMPLETE_MARKER).touch()
        _fsync_dir(staging)
        if final.exists():
            # Keep the old one until the new one is in place.
            retired = final.with_name(final.name + ".old")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(final, retired)
            os.replace(staging, final)
            shutil.rmtree(retired)
        else:
            os.replace(staging, final)
        _fsync_dir(final.parent)
    _barrier()
    return final


def load_model_weights(model_chunks, checkpoint_dir: str | os.PathLike) -> None:
    """Load weights saved at any TP/PP layout into this layout's chunks (collective)."""
    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    if not (path / COMPLETE_MARKER).exists():
        raise ValueError(f"checkpoint {path} is incomplete (no {COMPLETE_MARKER} marker): its save did not finish")
    loaded = dist_checkpointing.load(model_sharded_state_dict(model_chunks), str(path))
    for name, chunk in zip(_chunk_names(model_chunks), model_chunks):
        state = {key.removeprefix(KEY_PREFIX): value for key, value in loaded[name].items()}
        getattr(chunk, "module", chunk).load_state_dict(state, strict=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
