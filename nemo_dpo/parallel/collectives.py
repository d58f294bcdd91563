"""The collectives the rest of the package uses, each also correct in a single process.

Callers never check ``dist.is_initialized()`` themselves: every function here
behaves as the one-process case (the value is already everyone's) without a
process group or on a group of one. Tensors may live on the CPU: for NCCL they
are moved to the accelerator for the collective and handed back where they were.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nemo_dpo.parallel.device import accelerator_device

ReduceOp = dist.ReduceOp


def world_size(group=None) -> int:
    """Processes in ``group`` (the default group when None); 1 without torch.distributed."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def rank(group=None) -> int:
    """This process's rank in ``group``; 0 without torch.distributed."""
    return dist.get_rank(group) if dist.is_initialized() else 0


def is_rank0() -> bool:
    """Whether this is global rank 0 (or a process without torch.distributed)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op without torch.distributed."""
    if dist.is_initialized():
        dist.barrier()


def _on_comm_device(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(accelerator_device())


def all_reduce(tensor: torch.Tensor, op=ReduceOp.SUM, group=None) -> torch.Tensor:
    """The reduction of ``tensor`` over ``group``, on the device ``tensor`` came from."""
    if world_size(group) == 1:
        return tensor
    reduced = _on_comm_device(tensor)
    dist.all_reduce(reduced, op=op, group=group)
    return reduced.to(tensor.device)


def broadcast(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """``tensor`` of global rank ``src`` on every rank of ``group``, on the caller's device."""
    if world_size(group) == 1:
        return tensor
    shared = _on_comm_device(tensor)
    dist.broadcast(shared, src, group=group)
    return shared.to(tensor.device)


def broadcast_object(value, src: int = 0, group=None):
    """A picklable value of global rank ``src``, on every rank."""
    if world_size(group) == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_objects(value, group=None) -> list:
    """Every rank's picklable ``value``, in rank order, on every rank."""
    if world_size(group) == 1:
        return [value]
    gathered: list = [None] * world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def gather_objects_to_rank0(value) -> list | None:
    """Every rank's picklable ``value`` in rank order on rank 0; None on the others."""
    if world_size() == 1:
        return [value]
    gathered = [None] * world_size() if is_rank0() else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def raise_on_every_rank(error: BaseException | None) -> None:
    """Raise the first rank's error on every rank, so that none is left waiting in a collective.

    Each rank passes the error it met (or None); all ranks raise the same one, or
    none does. Collective: every rank must call it.
    """
    errors = all_gather_objects(error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def all_gather_rows(local: torch.Tensor, group=None) -> torch.Tensor:
    """The rows of every rank's ``local`` (any number each, same trailing shape), in rank order."""
    size = world_size(group)
    if size == 1:
        return local
    device = accelerator_device()
    counts = torch.zeros(size, dtype=torch.long, device=device)
    counts[rank(group)] = local.shape[0]
    dist.all_reduce(counts, group=group)
    padded = torch.zeros(max(int(counts.max().item()), 1), *local.shape[1:], dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    gathered = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[:n] for g, n in zip(gathered, counts.tolist())]).to(local.device)
