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


def free_accelerator_memory() -> int | None:
    """Bytes the accelerator has free now (as the driver sees it), or None on CPU."""
    return torch.cuda.mem_get_info()[0] if has_accelerator() else None


def host_staging_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``tensor`` to copy back from later: page-locked with an accelerator, so copies can overlap."""
    copy = tensor.detach().to("cpu", copy=True)
    return copy.pin_memory() if has_accelerator() else copy


class AheadCopier:
    """Host -> ``device`` copies issued ahead of use on a side stream.

    ``start`` issues the copies of a group of tensors and returns a ticket;
    ``finish`` makes the current (compute) stream wait for that group only and
    returns the device tensors. Without an accelerator (or for a CPU target) the
    host tensors are used as they are: no copy, no stream.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def start(self, tensors: list[torch.Tensor]):
        if self._stream is None:
            return list(tensors), None
        with torch.cuda.stream(self._stream):
            copies = [tensor.to(self.device, non_blocking=True) for tensor in tensors]
            done = torch.cuda.Event()
            done.record(self._stream)
        return copies, done

    def finish(self, ticket) -> list[torch.Tensor]:
        copies, done = ticket
        if done is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            for copy in copies:
                # Allocated on the side stream, read on the compute stream: not reused before that work ends.
                copy.record_stream(compute)
        return copies
