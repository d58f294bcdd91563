"""``training_state.pt``: the LR scheduler and every rank's RNG states, as tensors and plain values.

Nothing in it needs unpickling beyond what ``torch.load(weights_only=True)``
allows: numpy's RNG key is stored as a tensor, python's state as a list of
ints. Files from older nemo-dpo versions hold numpy's key as an ndarray; the
only extra types their load admits are numpy's array and dtype rebuilders.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from nemo_dpo.checkpoint.safe_load import load_tensors
from nemo_dpo.parallel.device import accelerator_rng_state, set_accelerator_rng_state

# How numpy arrays pickle: enough to read the RNG key of a file written before this format.
_NUMPY_CORE = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
_NUMPY_ARRAY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _NUMPY_CORE.multiarray._reconstruct]


def rng_state() -> dict:
    """This process's python, numpy, torch and accelerator RNG states, in loadable types."""
    version, internal, gauss_next = random.getstate()
    bit_generator, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": {"bit_generator": bit_generator, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": accelerator_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (or an older file's tuples)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        key = numpy_state["key"].numpy().astype(np.uint32)
        numpy_state = (numpy_state["bit_generator"], key, numpy_state["pos"], numpy_state["has_gauss"],
                       numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    set_accelerator_rng_state(state["cuda"])


def write_training_state(path: Path, scheduler_state: dict, rng_states: list[dict],
                         loss_states: list[dict] | None = None) -> None:
    """Write the scheduler's state dict (plain values), the RNG states of every rank and, per rank,
    the preference loss's state (``PreferenceLossMixture.state_dict()``: ``bco_pair``'s running mean)."""
    state = {"scheduler": scheduler_state, "rng": rng_states}
    if loss_states is not None:
        state["loss"] = loss_states
    torch.save(state, path)


def read_training_state(path: Path) -> dict:
    """``{"scheduler", "rng"}`` (and ``"loss"`` when saved) from ``path``, loaded without running code from it."""
    state = load_tensors(path, _NUMPY_ARRAY_GLOBALS)
    if not isinstance(state, dict) or not isinstance(state.get("scheduler"), dict) or not isinstance(state.get("rng"), list):
        raise ValueError("expected a dict with 'scheduler' (dict) and 'rng' (list)")
    return state
