"""Which device this process computes on, and the accelerator's own state (RNG).

The only module outside :mod:`nemo_dpo.parallel.cpu_compat` that talks to
``torch.cuda``: everything else asks here, so CPU and GPU share one code path.
"""

from __future__ import annotations

import importlib.util

import torch


def has_accelerator() -> bool:
    """Whether a CUDA GPU is present (and so NCCL, CUDA kernels, transformer-engine may be used)."""
    return torch.cuda.is_available()


def accelerator_device() -> torch.device:
    """The device this rank computes on: its local GPU, or the CPU."""
    if has_accelerator():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def select_local_device(local_rank: int) -> None:
    """Bind this process to GPU ``local_rank`` (nothing to do on CPU)."""
    if has_accelerator():
        torch.cuda.set_device(local_rank)


def transformer_engine_usable() -> bool:
    """transformer-engine needs both the package and a CUDA device."""
    return has_accelerator() and importlib.util.find_spec("transformer_engine") is not None


def accelerator_rng_state() -> torch.Tensor | None:
    """The GPU's RNG state, or None on CPU."""
    return torch.cuda.get_rng_state() if has_accelerator() else None


def set_accelerator_rng_state(state: torch.Tensor | None) -> None:
    """Restore what :func:`accelerator_rng_state` returned (ignored without a GPU or a state)."""
    if state is not None and has_accelerator():
        torch.cuda.set_rng_state(state)
