"""Distributed start-up in one place: process group, megatron-core parallel state, seeds.

The same calls serve a single process, ``torchrun`` with gloo on CPU and
``torchrun`` with NCCL on GPU: the backend and device follow from whether CUDA is
available, and every CUDA-only corner of megatron-core is covered by
:mod:`nemo_dpo.parallel.cpu_compat`.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from nemo_dpo.parallel.cpu_compat import enable_cpu_compat
from nemo_dpo.parallel.device import has_accelerator, select_local_device
from nemo_dpo.parallel.processes import end_children_with_process


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of the tensor, pipeline and data parallel dimensions of one run."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_model_parallel_size "
                f"({self.tensor_model_parallel_size}) x pipeline_model_parallel_size "
                f"({self.pipeline_model_parallel_size})"
            )
        return world_size // model_parallel


def init_process_group(timeout_minutes: int = 30) -> None:
    """Start torch.distributed: NCCL on GPU, gloo on CPU.

    Rank, world size and rendezvous come from :func:`launch_environment`
    (torchrun's variables, else Slurm's under ``srun``); without either this
    becomes a one-process group, so scripts and tests run unchanged as a plain
    ``python`` process.
    """
    if dist.is_initialized():
        return
    launch = launch_environment()
    # What torchrun would have set: megatron-core and later code read these.
    for key, value in launch.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    select_local_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if has_accelerator() else "gloo"
    dist.init_process_group(
        backend=backend,
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def launch_environment(env=None) -> dict[str, str]:
    """``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` of this process's launch.

    torchrun's variables win when present (an empty dict: nothing to add). Under
    Slurm (``srun python ...``), as PyTorch Lightning's launcher does: rank, local
    rank and world size from ``SLURM_PROCID``, ``SLURM_LOCALID`` and
    ``SLURM_NTASKS``, the rendezvous host the first node of
    ``SLURM_JOB_NODELIST`` and the port ``MASTER_PORT``, else one derived from
    ``SLURM_JOB_ID`` (the same on every node of a job). An interactive
    allocation (``SLURM_JOB_NAME`` bash or interactive) counts as no launch.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return {}
    if "SLURM_NTASKS" not in env or "SLURM_PROCID" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return {}
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
    job_id = env.get("SLURM_JOB_ID", "")
    default_port = 15000 + int(job_id[-4:]) if job_id[-4:].isdigit() else 12910
    return {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
        "MASTER_PORT": env.get("MASTER_PORT") or str(default_port),
    }


def launch_world_size() -> int:
    """Processes in this run: the started group's size, else what the launcher's variables say (1 alone)."""
    if dist.is_initialized():
        return dist.get_world_size()
    launch = launch_environment()
    return int(launch.get("WORLD_SIZE") or os.environ.get("WORLD_SIZE", "1"))


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``node[01-03,07],gpu5`` -> ``node01`` (no ``scontrol`` needed)."""
    depth, end = 0, len(nodelist)
    for index, char in enumerate(nodelist):  # the first entry ends at a comma outside brackets
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = index
            break
    entry = nodelist[:end].strip()
    while "[" in entry:  # each bracket group contributes its first value (zero padding kept)
        prefix, _, rest = entry.partition("[")
        ranges, _, suffix = rest.partition("]")
        entry = prefix + ranges.split(",")[0].split("-")[0] + suffix
    return entry


def initialize_parallel(layout: ParallelLayout, seed: int = 1234) -> None:
    """Start torch.distributed and megatron-core's TP/PP/DP groups, then seed every RNG.

    Child processes started from here on end with this process (see
    :mod:`nemo_dpo.parallel.processes`).
    """
    # First, while few threads run: it forks the checkpoint results server.
    end_children_with_process()
    enable_cpu_compat()
    init_process_group()
    layout.data_parallel_size(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
        # The distributed optimizer asks for the gloo data-parallel group, on every device.
        create_gloo_process_groups=True,
    )
    set_seed(seed)


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch identically on every rank.

    Weight initialisation does not depend on these (see
    :func:`nemo_dpo.models.nlp.gpt.init.initialize_weights`), so the layout never
    changes the initial weights; dropout streams use megatron's tracker.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # The tracker's states exist on CPU too (through the CPU shim): sequence parallelism forks them.
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down megatron-core's groups and torch.distributed (for tests and clean exits)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
