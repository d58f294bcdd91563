"""Full training checkpoints: everything needed to continue a run exactly, at any layout.

A training checkpoint is a model folder (see :mod:`nemo_dpo.checkpoint.pretrained`)
plus::

    optimizer/            Adam moments as a megatron distributed checkpoint (reshardable)
    training_state.pt     LR scheduler, RNG states of every rank (tensors and plain values)
    trainer_state.json    step, consumed_samples, epoch, metrics at save time
    manifest.json         size and checksum of every other file

With LoRA the model folder is an adapter folder (:mod:`nemo_dpo.checkpoint.adapters`:
the adapters and a reference to the base model) and the optimizer holds the
adapters' state only.

It is written atomically; :func:`find_resume_checkpoint` only ever picks a
folder whose save completed and whose files all match its manifest.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from megatron.core import dist_checkpointing

from nemo_dpo.checkpoint.adapters import (
    ADAPTERS_DIR,
    LORA_CONFIG,
    load_adapters,
    read_lora_config,
    write_adapter_folder,
)
from nemo_dpo.checkpoint.dist_ckpt import (
    KEY_PREFIX,
    atomic_checkpoint_dir,
    is_complete,
    load_model_weights,
    model_sharded_state_dict,
)
from nemo_dpo.checkpoint.integrity import CheckpointError, folder_problem, one_line, reading
from nemo_dpo.checkpoint.pretrained import MODEL_CONFIG, WEIGHTS_DIR, write_model_folder
from nemo_dpo.checkpoint.safe_load import check_dist_checkpoint_files
from nemo_dpo.checkpoint.training_state import read_training_state, rng_state, set_rng_state, write_training_state
from nemo_dpo.models.nlp.gpt.lora import adapter_sharded_state_dict, has_lora
from nemo_dpo.parallel.collectives import broadcast_object, gather_objects_to_rank0, is_rank0, rank, world_size

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
TRAINING_STATE = "training_state.pt"
OPTIMIZER_DIR = "optimizer"
_DIST_FOLDERS = (WEIGHTS_DIR, OPTIMIZER_DIR)
_LORA_DIST_FOLDERS = (ADAPTERS_DIR, OPTIMIZER_DIR)
# Counters DPOTrainer.load_state_dict takes from trainer_state.json.
_COUNTERS = ("step", "consumed_samples", "epoch")


def save_training_checkpoint(folder: str | Path, model, optimizer, scheduler, trainer_state: dict,
                             model_cfg, tokenizer_dir: str | Path) -> Path:
    """Write a training checkpoint atomically (collective: call on every rank)."""
    rng_states = gather_objects_to_rank0(rng_state())
    # Per rank: each data-parallel rank's loss keeps its own state (bco_pair's running mean).
    loss_states = gather_objects_to_rank0(model.preference_loss.state_dict())
    with atomic_checkpoint_dir(folder) as staging:
        if is_rank0():
            (staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True) + "\n")
            write_training_state(staging / TRAINING_STATE, scheduler.state_dict(), rng_states, loss_states)
            (staging / OPTIMIZER_DIR).mkdir()
        if has_lora(model.model):
            write_adapter_folder(staging, model.model, model_cfg, tokenizer_dir, model.base_checkpoint)
        else:
            write_model_folder(staging, model.model, model_cfg, tokenizer_dir)
        sharded = optimizer.sharded_state_dict(_trained_sharded_state_dict(model.model))
        dist_checkpointing.save({"optimizer": sharded}, str(staging / OPTIMIZER_DIR))
    return Path(folder)


def _trained_sharded_state_dict(model_chunks) -> dict:
    """The sharded tensors of what the optimizer trains: the adapters with LoRA, else every weight."""
    if has_lora(model_chunks):
        return adapter_sharded_state_dict(model_chunks, KEY_PREFIX)
    return model_sharded_state_dict(model_chunks)


def _restore_loss_state(folder: Path, model, loss_states: list[dict] | None, world: int) -> None:
    """This rank's preference loss state; a stateful loss that cannot get its own is refused."""
    if not model.preference_loss.state_dict():
        return  # no stateful term
    if loss_states is None or len(loss_states) != world:
        raise ValueError(
            f"{folder} holds no preference loss state for {world} ranks (saved: "
            f"{'none' if loss_states is None else len(loss_states)}), but preference_loss "
            f"{list(model.preference_loss.state_dict())} keeps a running state; resume with the same "
            "number of ranks, or start a new run")
    model.preference_loss.load_state_dict(loss_states[rank()])


def read_trainer_state(folder: str | Path) -> dict:
    """``trainer_state.json`` of a checkpoint (step, consumed_samples, epoch, metrics), its counters checked."""
    folder = Path(folder)
    with reading(folder, TRAINER_STATE):
        state = json.loads((folder / TRAINER_STATE).read_text())
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {folder}: {TRAINER_STATE} is not a JSON object")
    for key in _COUNTERS:
        value = state.get(key)
        # bool is an int to python; a checkpoint holding true is damaged all the same.
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"checkpoint {folder}: {TRAINER_STATE}: {key} must be a non-negative integer, got {value!r}")
    return state


def load_training_checkpoint(folder: str | Path, model, optimizer, scheduler) -> dict:
    """Restore policy weights, optimizer, scheduler and RNG from ``folder`` (collective).

    The reference policy is left alone: it stays the pretrained model the run
    started from. Returns the trainer state. RNG states are restored when the
    world size matches the saving run's; otherwise ranks keep their fresh seeds.
    Any file that cannot be read raises a :class:`CheckpointError` naming it.
    """
    folder = Path(folder)
    trainer_state = read_trainer_state(folder)
    lora = has_lora(model.model)
    if lora != (folder / LORA_CONFIG).is_file():
        raise ValueError(f"{folder} is a {'LoRA' if not lora else 'full fine-tuning'} checkpoint but the run "
                         f"{'trains LoRA adapters' if lora else 'trains every weight'}: set model.peft.peft_scheme "
                         "as in the run that saved it")
    if lora:
        base = read_lora_config(folder).get("base_checkpoint")
        if base != model.base_checkpoint and is_rank0():
            log.warning("%s was trained on the base model %s; this run's base is %s", folder, base,
                        model.base_checkpoint)
        load_adapters(model.model, folder)
    else:
        with reading(folder, f"{WEIGHTS_DIR}/", _DIST_FOLDERS):
            load_model_weights(model.model, folder / WEIGHTS_DIR)
    with reading(folder, f"{OPTIMIZER_DIR}/", _DIST_FOLDERS):
        check_dist_checkpoint_files(folder / OPTIMIZER_DIR)
        sharded = optimizer.sharded_state_dict(_trained_sharded_state_dict(model.model), is_loading=True)
        loaded = dist_checkpointing.load({"optimizer": sharded}, str(folder / OPTIMIZER_DIR))
        optimizer.load_sharded_state_dict(loaded["optimizer"])
    with reading(folder, TRAINING_STATE):
        training_state = read_training_state(folder / TRAINING_STATE)
        scheduler.load_state_dict(training_state["scheduler"])
        rng = training_state["rng"]
        world = world_size()
        if len(rng) == world:
            set_rng_state(rng[rank()])
        elif is_rank0():
            log.warning("%s was saved by %d ranks, resuming on %d: RNG states are not restored", folder, len(rng), world)
        _restore_loss_state(folder, model, training_state.get("loss"), world)
    return trainer_state


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why ``folder`` cannot be resumed from (incomplete, a file missing or damaged, naming it), or None.

    Checks every file against the checkpoint's manifest; older checkpoints
    without one get the checks their files allow.
    """
    folder = Path(folder)
    if not is_complete(folder):
        return "its save did not finish (no completion marker)"
    if folder.name.endswith(".tmp"):
        # Killed after its marker but before the rename: the save never took its place.
        return "it is the staging folder of a save that did not finish"
    for name in (TRAINER_STATE, TRAINING_STATE, MODEL_CONFIG):
        if not (folder / name).is_file():
            return f"{name} is missing"
    problem = folder_problem(folder, _LORA_DIST_FOLDERS if (folder / LORA_CONFIG).is_file() else _DIST_FOLDERS)
    if problem:
        return problem
    try:
        read_trainer_state(folder)
    except CheckpointError as err:
        return str(err)
    try:
        read_training_state(folder / TRAINING_STATE)
    except Exception as err:  # whatever torch raises, the file cannot be resumed from
        return f"{TRAINING_STATE} cannot be read ({one_line(err)})"
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
                candidates.append((read_trainer_state(folder)["step"], folder))
            except CheckpointError as err:
                log.warning("ignoring %s: %s", folder, err)
        for _, folder in sorted(candidates, reverse=True):
            problem = checkpoint_problem(folder)
            if problem is None:
                choice[0] = str(folder)
                break
            log.warning("cannot resume from %s: %s; trying an older checkpoint", folder, problem)
    chosen = broadcast_object(choice[0])
    return Path(chosen) if chosen else None
