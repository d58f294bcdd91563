"""Nothing of a run outlives it: child processes die with it, its staging folders are swept later.

A ``kill -9`` of a training process skips every ``atexit`` handler and
``finally`` block, so cleanup cannot rely on the process that dies:

* Children ask the kernel for a parent-death signal (Linux
  ``prctl(PR_SET_PDEATHSIG, SIGKILL)``): :func:`end_children_with_process`
  sets it in every process forked from the main thread, which covers
  megatron-core's checkpoint writers and the results-queue server below, and
  in ranks started by ``torchrun``, which end with its agent.
* megatron-core's checkpoint writer (``dist_checkpointing/strategies/
  filesystem_async.py``, checked against 0.16.1) lazily starts a *spawned*
  ``multiprocessing`` manager (a fresh interpreter re-importing the training
  script, about 380 MB, plus a resource tracker) whose queue carries the
  writers' results back. Nothing ends that server when the trainer is killed.
  :func:`end_children_with_process` installs the queue megatron looks for,
  served by a *forked* manager instead: it shares the trainer's memory pages,
  starts in milliseconds, needs no resource tracker and dies with its parent.
* Staging folders carry their creator's pid in their name; a later start
  removes those whose creator is gone (:func:`sweep_dead_staging`).

Where the parent-death signal does not exist (not Linux) nothing here changes
how processes start; staging folders are still swept.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
from multiprocessing.managers import SyncManager
from pathlib import Path

import psutil  # pid checks that are safe on every platform (os.kill(pid, 0) kills on Windows)

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

_installed = False
_manager: SyncManager | None = None  # the results-queue server, kept for the life of the process
# Written by the fork hook in the parent just before each fork; the child reads its copy.
_fork_parent = {"pid": 0, "main_thread": False}


def _has_parent_death_signal() -> bool:
    return sys.platform.startswith("linux")


def die_with_parent(parent_pid: int) -> bool:
    """Have the kernel SIGKILL this process when its parent ends (Linux); False where unsupported.

    ``parent_pid`` is the parent this process was started by: if it has already
    ended, no signal would ever come, so the process ends at once.
    """
    if not _has_parent_death_signal():
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent_pid:
        os._exit(1)
    return True


def _before_fork() -> None:
    _fork_parent["pid"] = os.getpid()
    _fork_parent["main_thread"] = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    # The signal follows the thread that forked, not its process: a child
    # forked from a short-lived thread would die with that thread.
    if _fork_parent["main_thread"]:
        die_with_parent(_fork_parent["pid"])


def end_children_with_process() -> None:
    """Tie this process's forked children, megatron's checkpoint writers included, to its life.

    Call once at start-up, from the main thread (``initialize_parallel`` does);
    later calls do nothing, and so does every call where the parent-death signal
    does not exist (megatron then starts its own server, as without this module).
    """
    global _installed, _manager
    if _installed or not _has_parent_death_signal():
        return
    _installed = True
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # torchrun's agent starts ranks with Popen (no fork hook) from its main
        # thread; once the agent is killed they would train on, unsupervised.
        # An agent that ended before this point is not noticed.
        die_with_parent(os.getppid())
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", True) is not None:  # not the megatron-core we know
        return
    _manager = SyncManager(ctx=multiprocessing.get_context("fork"))
    _manager.start()
    # megatron creates its own server only while this global is unset.
    filesystem_async._results_queue = _manager.Queue()


def sweep_dead_staging(folder: Path, prefix: str, suffix: str = "") -> list[Path]:
    """Remove ``<prefix><pid><suffix>...`` entries of ``folder`` whose process ``pid`` has ended.

    Folders of live processes (and names without a pid) are kept. Returns what was removed.
    """
    pattern = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix))
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        pid = int(match.group(1)) if match else None
        if pid is None or pid == os.getpid() or _running(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)  # another user's folder stays: not ours to remove
        if not entry.exists():
            removed.append(entry)
    return removed


def _running(pid: int) -> bool:
    # A zombie has ended: only its exit status waits for a parent that may never reap it
    # (a killed launcher's ranks are re-parented to an init that need not).
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
