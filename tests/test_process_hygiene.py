"""Nothing outlives a run: no child process after ``kill -9``, no staging folder after the next start."""

import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from distributed_pool import DistributedPool
from nemo_dpo.checkpoint.pretrained import DEFAULT_MODEL_DIR, TOKENIZER_DIR
from nemo_dpo.checkpoint.training_checkpoint import find_resume_checkpoint
from nemo_dpo.data.tokenizer import stage_tokenizer_dir, sweep_stale_tokenizer_dirs
from nemo_dpo.interop.nemo.archive import extract_nemo_archive
from test_train_gpt_dpo import REPO

# Saving every step, with the tokenizer staged in a temp folder (an explicit tokenizer path).
RUN = ["trainer.dpo.max_steps=40", "trainer.dpo.save_interval=1", "trainer.dpo.val_check_interval=100",
       "model.global_batch_size=16", "model.micro_batch_size=4",
       f"model.tokenizer.path={DEFAULT_MODEL_DIR / TOKENIZER_DIR}"]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def start_example(log_dir: Path, temp_dir: Path, *overrides: str, launcher=(sys.executable,)) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TMPDIR": str(temp_dir)}
    cmd = [*launcher, str(REPO / "examples" / "train_gpt_dpo.py"), f"exp_manager.explicit_log_dir={log_dir}",
           *RUN, *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def alive(process: psutil.Process) -> bool:
    # A zombie has ended; only its exit status waits for a reaper.
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def survivors_after(pids: list[int], seconds: float) -> list[int]:
    """Those of ``pids`` still running after waiting up to ``seconds`` for all of them to end."""
    processes = []
    for pid in pids:
        try:
            processes.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p.pid for p in processes if alive(p)]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def staged_tokenizers(temp_dir: Path) -> list[str]:
    return sorted(p.name for p in temp_dir.glob("nemo_dpo_tokenizer_*"))


@pytest.mark.parametrize("launcher", [(sys.executable,), TORCHRUN], ids=["python", "torchrun"])
def test_sigkill_leaves_no_process_and_the_next_start_sweeps(tmp_path, monkeypatch, launcher):
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    run = start_example(tmp_path / "killed", temp_dir, launcher=launcher)
    try:
        deadline = time.monotonic() + 600
        while find_resume_checkpoint(tmp_path / "killed" / "checkpoints") is None:
            assert run.poll() is None, "the run ended before it saved"
            assert time.monotonic() < deadline, "the run did not save in time"
            time.sleep(0.05)
        descendants = psutil.Process(run.pid).children(recursive=True)
        os.kill(run.pid, signal.SIGKILL)  # the leader only, as `kill -9 PID` does
        run.wait()
    finally:
        if run.poll() is None:
            run.kill()
    assert descendants, "the run had no child process: the test would prove nothing"
    survivors = survivors_after([p.pid for p in descendants], 5)
    for process in descendants:
        if process.pid in survivors:
            process.kill()
    assert not survivors
    left = staged_tokenizers(temp_dir)  # by the killed process (python) or its ranks (torchrun)
    killed = {run.pid, *(p.pid for p in descendants)}
    assert left and all(int(name.split("_")[3]) in killed for name in left)

    # The next start stages its tokenizer the same way, which first sweeps what ended processes left.
    monkeypatch.setattr(tempfile, "tempdir", str(temp_dir))
    fresh = stage_tokenizer_dir({"tokenizer.json": "{}"})
    assert staged_tokenizers(temp_dir) == [fresh.name]


@pytest.fixture
def private_tempdir(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_stale_tokenizer_folders_of_ended_processes_are_swept(private_tempdir):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = private_tempdir / f"nemo_dpo_tokenizer_{dead_pid()}_abcd"
        kept = private_tempdir / f"nemo_dpo_tokenizer_{live.pid}_abcd"
        unrelated = private_tempdir / "nemo_dpo_tokenizer_notapid"
        for folder in (stale, kept, unrelated):
            folder.mkdir()
            (folder / "tokenizer.json").write_text("{}")
        new = stage_tokenizer_dir({"tokenizer.json": "{}"})
        assert new.name.startswith(f"nemo_dpo_tokenizer_{os.getpid()}_")
        assert not stale.exists()
        assert kept.is_dir() and unrelated.is_dir()
    finally:
        live.kill()
        live.wait()


def archive_of(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("members, message", [
    ({"model_weights.ckpt": b"x"}, "model_config.yaml"),
    ({"model_config.yaml": b"num_layers: 1\n", "../escaped.yaml": b"x"}, "escaped"),
])
def test_refused_extraction_leaves_nothing(tmp_path, members, message):
    archive = archive_of(tmp_path / "bad.nemo", members)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match=message):
        extract_nemo_archive(archive, extract_dir=cache)
    assert list(cache.iterdir()) == []
    assert not (tmp_path / "escaped.yaml").exists()


def test_extraction_sweeps_staging_of_ended_processes(tmp_path):
    cache = tmp_path / "cache"
    host = socket.gethostname()
    stale = cache / f".nemo_dpo_unpack.{host}.{dead_pid()}.old-0123"
    other_host = cache / f".nemo_dpo_unpack.{host}x.{dead_pid()}.old-0123"
    for folder in (stale, other_host):
        folder.mkdir(parents=True)
    archive = archive_of(tmp_path / "good.nemo", {"model_config.yaml": b"num_layers: 1\n"})
    target = extract_nemo_archive(archive, extract_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted([target.name, other_host.name])


def start_run_machinery() -> tuple[list[int], str]:
    """Start what every job starts; the processes below this worker, and a tokenizer folder it staged."""
    from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel

    initialize_parallel(ParallelLayout(1, 1))
    staged = stage_tokenizer_dir({"tokenizer.json": "{}"})
    return [os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))], str(staged)


def test_the_test_pool_closes_with_everything_it_started():
    pool = DistributedPool(1)
    try:
        pids, staged = pool.run(1, start_run_machinery)[0]
    finally:
        pool.close()
    assert len(pids) > 1  # the worker and the checkpoint results server at least
    assert not survivors_after(pids, 5)
    assert Path(staged).is_dir()  # killed workers run no atexit: conftest sweeps after closing
    sweep_stale_tokenizer_dirs()
    assert not Path(staged).exists()


def test_without_a_parent_death_signal_nothing_changes(monkeypatch):
    from nemo_dpo.parallel import processes

    monkeypatch.setattr(processes.sys, "platform", "darwin")
    monkeypatch.setattr(processes, "_installed", False)
    monkeypatch.setattr(processes, "_manager", None)
    monkeypatch.setattr(processes.os, "register_at_fork", None)  # as on Windows: calling it would fail
    assert processes.die_with_parent(os.getppid()) is False
    processes.end_children_with_process()
    assert processes._manager is None and not processes._installed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_child_whose_parent_already_ended_ends_at_once():
    # Told its parent was another process: that parent is "gone", so no signal would ever come.
    code = "from nemo_dpo.parallel.processes import die_with_parent; die_with_parent(1); print('survived')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "survived" not in result.stdout
