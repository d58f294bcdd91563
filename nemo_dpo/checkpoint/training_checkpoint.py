"""Full training checkpoints: everything needed to continue a run exactly, at any layout.

A training checkpoint is a model folder (see :mod:`nemo_dpo.checkpoint.pretrained`)
plus::

    optimizer/            Adam moments as a megatron distributed checkpoint (reshardable)
    training_state.pt     LR scheduler, RNG states of every rank
    trainer_state.json    step, consumed_samples, epoch, metrics at save time

It is written atomically; :func:`find_resume_checkpoint` only ever picks a
folder whose save completed and whose files are all there.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint import FileSystemReader

from nemo_dpo.checkpoint.dist_ckpt import (
    atomic_checkpoint_dir,
    is_complete,
    load_model_weights,
    model_sharded_state_dict,
)
from nemo_dpo.checkpoint.pretrained import MODEL_CONFIG, WEIGHTS_DIR, write_model_folder
from nemo_dpo.parallel.collectives import broadcast_object, gather_objects_to_rank0, is_rank0, rank, world_size
from nemo_dpo.parallel.device import accelerator_rng_state, set_accelerator_rng_state

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
TRAINING_STATE = "training_state.pt"
OPTIMIZER_DIR = "optimizer"
_DIST_FOLDERS = (WEIGHTS_DIR, OPTIMIZER_DIR)


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": accelerator_rng_state(),
    }


def _all_rng_states() -> list[dict] | None:
    """Every rank's RNG state, on rank 0 (None elsewhere)."""
    return gather_objects_to_rank0(_rng_state())


def save_training_checkpoint(folder: str | Path, model, optimizer, scheduler, trainer_state: dict,
                             model_cfg, tokenizer_dir: str | Path) -> Path:
    """Write a training checkpoint atomically (collective: call on every rank)."""
    rng_states = _all_rng_states()
    with atomic_checkpoint_dir(folder) as staging:
        if is_rank0():
            (staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True) + "\n")
            torch.save({"scheduler": scheduler.state_dict(), "rng": rng_states}, staging / TRAINING_STATE)
            (staging / OPTIMIZER_DIR).mkdir()
        write_model_folder(staging, model.model, model_cfg, tokenizer_dir)
        sharded = optimizer.sharded_state_dict(model_sharded_state_dict(model.model))
        dist_checkpointing.save({"optimizer": sharded}, str(staging / OPTIMIZER_DIR))
    return Path(folder)


def read_trainer_state(folder: str | Path) -> dict:
    """``trainer_state.json`` of a checkpoint (step, consumed_samples, epoch, metrics)."""
    return json.loads((Path(folder) / TRAINER_STATE).read_text())


def load_training_checkpoint(folder: str | Path, model, optimizer, scheduler) -> dict:
    """Restore policy weights, optimizer, scheduler and RNG from ``folder`` (collective).

    The reference policy is left alone: it stays the pretrained model the run
    started from. Returns the trainer state. RNG states are restored when the
    world size matches the saving run's; otherwise ranks keep their fresh seeds.
    """
    folder = Path(folder)
    load_model_weights(model.model, folder / WEIGHTS_DIR)
    sharded = optimizer.sharded_state_dict(model_sharded_state_dict(model.model), is_loading=True)
    loaded = dist_checkpointing.load({"optimizer": sharded}, str(folder / OPTIMIZER_DIR))
    optimizer.load_sharded_state_dict(loaded["optimizer"])
    training_state = torch.load(folder / TRAINING_STATE, weights_only=False)
    scheduler.load_state_dict(training_state["scheduler"])
    rng = training_state["rng"]
    world = world_size()
    if len(rng) == world:
        state = rng[rank()]
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        set_accelerator_rng_state(state["cuda"])
    elif is_rank0():
        log.warning("%s was saved by %d ranks, resuming on %d: RNG states are not restored", folder, len(rng), world)
    return read_trainer_state(folder)


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why ``folder`` cannot be resumed from (incomplete, missing or truncated files), or None."""
    folder = Path(folder)
    if not is_complete(folder):
        return "its save did not finish (no completion marker)"
    for name in (TRAINER_STATE, TRAINING_STATE, MODEL_CONFIG):
        if not (folder / name).is_file():
            return f"{name} is missing"
    for name in _DIST_FOLDERS:
        try:
            metadata = FileSystemReader(str(folder / name)).read_metadata()
        except Exception as err:  # any unreadable metadata means a damaged checkpoint
            return f"{name}/ metadata cannot be read ({type(err).__name__}: {err})"
        needed: dict[str, int] = {}
        for info in metadata.storage_data.values():
            end = info.offset + info.length
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
        for relative, size in needed.items():
            path = folder / name / relative
            if not path.is_file():
                return f"{name}/{relative} is missing"
            if path.stat().st_size < size:
                return f"{name}/{relative} is truncated ({path.stat().st_size} of {size} bytes)"
    return None


def find_resume_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest resumable checkpoint under ``checkpoint_dir``, skipping damaged ones (rank 0 decides)."""
    choice: list = [None]
    if is_rank0():
        root = Path(checkpoint_dir)
        candidates = []
        for folder in sorted(root.iterdir()) if root.is_dir() else []:
            if not folder.is_dir() or folder.name.endswith((".tmp", ".old")) or not (folder / TRAINER_STATE).exists():
                if folder.name.endswith(".tmp"):
                    log.warning("ignoring %s: an interrupted save", folder)
                continue
            try:
                candidates.append((int(read_trainer_state(folder)["step"]), folder))
            except (ValueError, KeyError) as err:
                log.warning("ignoring %s: unreadable %s (%s)", folder, TRAINER_STATE, err)
        for _, folder in sorted(candidates, reverse=True):
            problem = checkpoint_problem(folder)
            if problem is None:
                choice[0] = str(folder)
                break
            log.warning("cannot resume from %s: %s; trying an older checkpoint", folder, problem)
    chosen = broadcast_object(choice[0])
    return Path(chosen) if chosen else None
