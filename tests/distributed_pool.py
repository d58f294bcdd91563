"""A pool of spawned worker processes that run test functions as gloo process groups.

Importing torch and megatron-core takes seconds per process; tests reuse the
workers and build a fresh process group (and megatron parallel state) per task.
"""

from __future__ import annotations

import datetime
import os
import queue
import signal
import socket
import traceback

import torch.multiprocessing as mp

TASK_TIMEOUT_S = 600


def _worker(rank: int, tasks, results) -> None:
    import torch
    import torch.distributed as dist

    from nemo_dpo.parallel.processes import die_with_parent, end_children_with_process

    torch.set_num_threads(1)
    # Own process group: close() must also end what megatron's checkpoint writer spawns.
    os.setsid()
    parent = os.getppid()
    die_with_parent(parent)  # a killed test session takes its workers along (Linux)
    # As a run does it, before any process group: its children then hold no gloo sockets.
    end_children_with_process()
    while True:
        try:
            task = tasks.get(timeout=5)
        except queue.Empty:
            if os.getppid() != parent:  # orphaned: the test session is gone
                return
            continue
        if task is None:
            return
        task_id, port, world_size, fn, args = task
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        )
        try:
            dist.init_process_group(
                "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120)
            )
            results.put((task_id, rank, True, fn(*args)))
        except BaseException:
            results.put((task_id, rank, False, traceback.format_exc()))
        finally:
            from nemo_dpo.parallel.initialize import destroy_parallel

            destroy_parallel()


class DistributedPool:
    """``run(world_size, fn, *args)`` calls ``fn(*args)`` on ranks ``0..world_size-1``."""

    def __init__(self, size: int):
        self.size = size
        self._ctx = mp.get_context("spawn")
        self._start()
        self._next_task = 0

    def _start(self) -> None:
        self._results = self._ctx.Queue()
        self._tasks = [self._ctx.Queue() for _ in range(self.size)]
        self._procs = [
            # Not daemonic: megatron's checkpoint writer starts processes of its own.
            self._ctx.Process(target=_worker, args=(rank, self._tasks[rank], self._results))
            for rank in range(self.size)
        ]
        for proc in self._procs:
            proc.start()

    def run(self, world_size: int, fn, *args) -> list:
        """Results of every rank, in rank order; a failure on any rank raises with its traceback."""
        if world_size > self.size:
            raise ValueError(f"pool has {self.size} workers, task needs {world_size}")
        task_id, self._next_task = self._next_task, self._next_task + 1
        port = _free_port()
        for rank in range(world_size):
            self._tasks[rank].put((task_id, port, world_size, fn, args))
        outputs: dict[int, object] = {}
        while len(outputs) < world_size:
            try:
                got_id, rank, ok, value = self._results.get(timeout=TASK_TIMEOUT_S)
            except queue.Empty:
                self.restart()
                raise TimeoutError(f"{fn.__name__} did not finish in {TASK_TIMEOUT_S}s") from None
            if got_id != task_id:
                continue
            if not ok:
                if world_size > 1:  # surviving ranks may be stuck in a collective
                    self.restart()
                raise RuntimeError(f"rank {rank} of {fn.__name__} failed:\n{value}")
            outputs[rank] = value
        return [outputs[rank] for rank in range(world_size)]

    def restart(self) -> None:
        self.close()
        self._start()

    def close(self) -> None:
        for proc in self._procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # not yet its own group leader (closed right after a restart)
                proc.kill()
            proc.join()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
