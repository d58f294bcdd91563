"""Model weights through megatron-core distributed checkpointing: save at one layout, load at any.

Checkpoint folders are written under a temporary name and renamed into place
only once every rank has finished (:func:`atomic_checkpoint_dir`), so a crash
mid-save never leaves a folder that looks complete, and never touches an
existing checkpoint of the same name. Each gets a manifest of its files
(:mod:`nemo_dpo.checkpoint.integrity`) just before its completion marker.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from megatron.core import dist_checkpointing

from nemo_dpo.checkpoint.integrity import COMPLETE_MARKER, write_manifest
from nemo_dpo.checkpoint.safe_load import check_dist_checkpoint_files
from nemo_dpo.parallel.collectives import barrier, is_rank0

__all__ = ["COMPLETE_MARKER", "KEY_PREFIX", "atomic_checkpoint_dir", "is_complete", "load_model_weights",
           "model_sharded_state_dict", "save_model_weights"]
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


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a checkpoint whose save finished."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def atomic_checkpoint_dir(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder; on success it becomes ``folder``, marked complete (collective).

    An existing ``folder`` is replaced only after the new one is fully written.
    """
    final = Path(folder)
    staging = final.with_name(final.name + ".tmp")
    if is_rank0():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    yield staging
    barrier()
    if is_rank0():
        write_manifest(staging)
        (staging / COMPLETE_MARKER).touch()
        _fsync_dir(staging)
        retired = final.with_name(final.name + ".old")
        if final.exists():
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(final, retired)
        os.replace(staging, final)
        _fsync_dir(final.parent)
        shutil.rmtree(retired, ignore_errors=True)
    barrier()


def save_model_weights(model_chunks, directory: str | os.PathLike) -> None:
    """Write the weights into the existing folder ``directory`` (collective)."""
    dist_checkpointing.save(model_sharded_state_dict(model_chunks), str(directory))


def load_model_weights(model_chunks, directory: str | os.PathLike) -> None:
    """Load weights saved at any TP/PP layout into this layout's chunks (collective)."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    check_dist_checkpoint_files(path)
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
