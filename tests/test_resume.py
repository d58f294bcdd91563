"""Crash-safe checkpoints: SIGKILL at any moment, resume (at any layout), same losses.

The runs that are killed are real processes of the example script; every other
run is an in-process job on the test pool (same metrics, no start-up cost).
"""

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.distributed.checkpoint import FileSystemReader

from nemo_dpo.checkpoint.dist_ckpt import is_complete
from nemo_dpo.checkpoint.integrity import CheckpointError, reading
from nemo_dpo.checkpoint.training_checkpoint import checkpoint_problem, find_resume_checkpoint, read_trainer_state
from nemo_dpo.checkpoint.training_state import read_training_state
from nemo_dpo.training.experiment import resume_checkpoint
from test_train_gpt_dpo import REPO, run_in_pool, series
from training_workers import poisoned_train_job

STEPS = 8
RUN = [f"trainer.dpo.max_steps={STEPS}", "trainer.dpo.save_interval=1", "trainer.dpo.val_check_interval=4",
       "trainer.dpo.limit_val_batches=1", "model.global_batch_size=16", "model.micro_batch_size=4",
       "exp_manager.checkpoint_callback_params.save_top_k=-1"]


# What a resumed run saves is not compared; its losses are.
RESUME_ONLY = [*RUN, "exp_manager.create_checkpoint_callback=False"]


def launch(log_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(REPO / "examples" / "train_gpt_dpo.py"), f"exp_manager.explicit_log_dir={log_dir}", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def kill_when(process: subprocess.Popen, condition, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "timed out waiting to kill the run"
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def logged_steps(log_dir: Path) -> int:
    path = log_dir / "metrics.jsonl"
    return len(series([json.loads(l) for l in path.read_text().splitlines() if l.endswith("}")], "train/loss")) if path.exists() else 0


def losses_by_step(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.fixture(scope="module")
def uninterrupted_run(dist_pool, tmp_path_factory):
    """The log folder and losses of the run the interrupted ones must reproduce."""
    log_dir = tmp_path_factory.mktemp("full")
    return log_dir, losses_by_step(run_in_pool(dist_pool, log_dir, *RUN))


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return uninterrupted_run[1]


def test_sigkill_at_random_step_then_resume_matches(dist_pool, uninterrupted, tmp_path):
    kill_after = random.Random().randint(2, STEPS - 2)
    kill_when(launch(tmp_path, *RUN), lambda: logged_steps(tmp_path) >= kill_after)
    resumed_from = find_resume_checkpoint(tmp_path / "checkpoints")
    assert resumed_from is not None
    start = read_trainer_state(resumed_from)["step"]
    records = run_in_pool(dist_pool, tmp_path, *RESUME_ONLY)  # resume_if_exists is on by default
    got = losses_by_step(records)
    # The resumed run logs steps start+1.. (the killed one may have logged some of them too).
    for step in range(start + 1, STEPS + 1):
        assert got[step] == pytest.approx(uninterrupted[step], abs=1e-6), (step, kill_after, start)


def test_sigkill_during_a_save_falls_back_to_previous_checkpoint(dist_pool, uninterrupted, tmp_path):
    def saving_third():
        if not checkpoints.is_dir():
            return False
        folders = list(checkpoints.iterdir())
        return any(p.name.endswith(".tmp") for p in folders) and sum(map(is_complete, folders)) >= 2

    # On a loaded machine the save can finish between seeing it start and the kill
    # landing; such a run was killed between saves, so try again (in a fresh folder).
    for attempt in range(3):
        log_dir = tmp_path / f"attempt{attempt}"
        checkpoints = log_dir / "checkpoints"
        kill_when(launch(log_dir, *RUN), saving_third)
        interrupted = [p for p in checkpoints.iterdir() if p.name.endswith(".tmp")]
        if interrupted:
            break
    assert interrupted and checkpoint_problem(interrupted[0]) is not None
    resumed_from = find_resume_checkpoint(checkpoints)
    assert resumed_from is not None and not resumed_from.name.endswith(".tmp")
    start = read_trainer_state(resumed_from)["step"]
    got = losses_by_step(run_in_pool(dist_pool, log_dir, *RESUME_ONLY))
    for step in range(start + 1, STEPS + 1):
        assert got[step] == pytest.approx(uninterrupted[step], abs=1e-6), step


def test_truncated_checkpoint_is_named_and_skipped(dist_pool, uninterrupted_run, tmp_path):
    # Every checkpoint of the uninterrupted run (save_top_k=-1 keeps all) in a folder of our own.
    shutil.copytree(uninterrupted_run[0] / "checkpoints", tmp_path / "checkpoints")
    newest = find_resume_checkpoint(tmp_path / "checkpoints")
    shard = next((newest / "optimizer").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert "truncated" in checkpoint_problem(newest) and shard.name in checkpoint_problem(newest)
    fallback = find_resume_checkpoint(tmp_path / "checkpoints")
    assert fallback != newest and read_trainer_state(fallback)["step"] == STEPS - 1
    with pytest.raises(RuntimeError, match="cannot be resumed from: optimizer/.*truncated"):
        # Checkpoint names hold '=': Hydra needs the path quoted.
        run_in_pool(dist_pool, tmp_path / "again", *RUN, f"exp_manager.resume_from_checkpoint='{newest}'")


def test_resume_on_another_layout(dist_pool, uninterrupted, tmp_path):
    """Saved at (TP, PP) = (2, 1) at step 4; resumed at (1, 2) and at (1, 1), training goes on as the saving run did.

    Up to the save the saving run agrees with the single-process one (layouts agree in
    fp32); later, reduction-order noise compounds step by step (1.6e-5 by step 8), so
    the resumed runs are held to the run they continue, more tightly (2e-6: packed rows
    are padded to another length at PP=2, so the matrix products round differently).
    """
    saved = tmp_path / "tp2"
    # Only the step-4 checkpoint is resumed from: saving every step would add nothing.
    every_fourth = [o if not o.startswith("trainer.dpo.save_interval=") else "trainer.dpo.save_interval=4" for o in RUN]
    saving_run = losses_by_step(run_in_pool(dist_pool, saved, *every_fourth, "model.tensor_model_parallel_size=2",
                                            nproc=2))
    for step in range(1, 5):
        assert saving_run[step] == pytest.approx(uninterrupted[step], abs=1e-5), step
    for folder in (saved / "checkpoints").iterdir():
        if folder.name != "final_model" and read_trainer_state(folder)["step"] > 4:
            shutil.rmtree(folder)
    for name, layout, nproc in (("pp2", "model.pipeline_model_parallel_size=2", 2), ("single", "model.seed=1234", 1)):
        shutil.copytree(saved / "checkpoints", tmp_path / name / "checkpoints")
        got = losses_by_step(run_in_pool(dist_pool, tmp_path / name, *RESUME_ONLY, layout, nproc=nproc))
        assert sorted(got) == [5, 6, 7, 8]
        for step in got:
            assert got[step] == pytest.approx(saving_run[step], abs=2e-6), (name, step)


def test_save_top_k_keeps_best_two_and_newest(dist_pool, tmp_path):
    records = run_in_pool(dist_pool, tmp_path, "trainer.dpo.max_steps=6", "trainer.dpo.save_interval=1",
                          "trainer.dpo.val_check_interval=1", "trainer.dpo.limit_val_batches=1",
                          "model.global_batch_size=16", "model.micro_batch_size=4",
                          "exp_manager.checkpoint_callback_params.save_top_k=2")
    val_loss = {r["step"]: r["val/loss"] for r in records if "val/loss" in r}
    best_two = sorted(val_loss, key=val_loss.get)[:2]
    kept = {read_trainer_state(p)["step"] for p in (tmp_path / "checkpoints").iterdir() if p.name != "final_model"}
    assert kept == set(best_two) | {6}, (val_loss, kept)


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(dist_pool, tmp_path):
    good = RUN[:1] + ["trainer.dpo.max_steps=2", *RUN[1:]]
    run_in_pool(dist_pool, tmp_path, *good)  # two good steps, checkpoints at 1 and 2
    last_good = find_resume_checkpoint(tmp_path / "checkpoints")
    # A loss plug-in that is NaN on every pair; the run resumes at step 2 and must stop at step 3.
    with pytest.raises(RuntimeError, match=r"NonFiniteLossError: step 3: non-finite loss \(nan\) or gradient norm "
                                           r"\(nan\) on training samples \[[0-9, ]+\]; the weights were not updated "
                                           r"and the checkpoint of step 2 is intact"):
        dist_pool.run(1, poisoned_train_job, str(tmp_path), RUN)
    assert find_resume_checkpoint(tmp_path / "checkpoints") == last_good and checkpoint_problem(last_good) is None
    (records,) = dist_pool.run(1, poisoned_train_job, str(tmp_path), [
        *RUN, "trainer.dpo.skip_nonfinite_steps=True", "exp_manager.create_checkpoint_callback=False"])
    skipped = series(records, "train/skipped_steps")
    assert skipped[-1] == STEPS - 2 and series(records, "train/grad_norm")[-1] == "nan"  # logged as text


def test_max_time_stops_after_saving(dist_pool, tmp_path):
    records = run_in_pool(dist_pool, tmp_path, *RUN, "trainer.max_time=00:00:00:01", "trainer.dpo.save_interval=0")
    steps = series(records, "train/loss")
    assert len(steps) < STEPS
    saved = find_resume_checkpoint(tmp_path / "checkpoints")
    assert saved is not None and read_trainer_state(saved)["step"] == len(steps)


def damaged_copy(uninterrupted_run, tmp_path: Path) -> tuple[Path, Path]:
    """Every checkpoint of the uninterrupted run in a folder of our own, and the newest of them."""
    shutil.copytree(uninterrupted_run[0] / "checkpoints", tmp_path / "checkpoints")
    newest = find_resume_checkpoint(tmp_path / "checkpoints")
    assert read_trainer_state(newest)["step"] == STEPS
    return tmp_path / "checkpoints", newest


def flip_middle_bytes(weights: Path) -> Path:
    """Invert 16 bytes in the middle of the largest shard; its name."""
    shard = max(weights.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    shard.write_bytes(bytes(data))
    return shard


def overwrite_tensor_with_finite_values(weights: Path) -> Path:
    """Replace the bytes of the largest tensor by other finite values of the same size; its shard."""
    metadata = FileSystemReader(str(weights)).read_metadata()
    item = max(metadata.storage_data.values(), key=lambda i: i.length)
    shard = weights / item.relative_path
    data = bytearray(shard.read_bytes())
    record = bytes(data[item.offset:item.offset + item.length])
    tensor = torch.load(io.BytesIO(record), weights_only=True)
    garbage = tensor * 0.5 + 0.25
    assert torch.isfinite(garbage).all() and not torch.equal(garbage, tensor)
    old, new = (t.contiguous().view(torch.uint8).numpy().tobytes() for t in (tensor, garbage))
    start = item.offset + record.index(old)
    data[start:start + len(new)] = new
    shard.write_bytes(bytes(data))
    return shard


@pytest.mark.parametrize("damage", [flip_middle_bytes, overwrite_tensor_with_finite_values], ids=["flipped", "finite"])
def test_same_size_damage_falls_back_to_previous_checkpoint(dist_pool, uninterrupted_run, tmp_path, caplog, damage):
    checkpoints, newest = damaged_copy(uninterrupted_run, tmp_path)
    sizes = {p: p.stat().st_size for p in (newest / "weights").glob("*.distcp")}
    shard = damage(newest / "weights")
    assert {p: p.stat().st_size for p in sizes} == sizes
    problem = checkpoint_problem(newest)
    assert problem == f"weights/{shard.name} fails its sha256 checksum (its contents changed after the save)"
    fallback = find_resume_checkpoint(checkpoints)
    assert read_trainer_state(fallback)["step"] == STEPS - 1
    warning = [r.getMessage() for r in caplog.records if r.name.startswith("nemo_dpo")]
    assert warning == [f"cannot resume from {newest}: {problem}; trying an older checkpoint"]
    got = losses_by_step(run_in_pool(dist_pool, tmp_path, *RESUME_ONLY))
    assert sorted(got) == [STEPS] and got[STEPS] == pytest.approx(uninterrupted_run[1][STEPS], abs=1e-6)
    # Named explicitly, the damaged checkpoint is refused, naming the file.
    exp = OmegaConf.create({"resume_from_checkpoint": str(newest)})
    with pytest.raises(ValueError, match=f"cannot be resumed from: weights/{shard.name} fails its sha256"):
        resume_checkpoint(exp, checkpoints)


def test_checkpoints_without_manifest_still_resume(dist_pool, uninterrupted_run, tmp_path, caplog):
    checkpoints, _ = damaged_copy(uninterrupted_run, tmp_path)
    for folder in checkpoints.glob("*step=*"):
        if read_trainer_state(folder)["step"] > STEPS - 2:
            shutil.rmtree(folder)
        else:
            (folder / "manifest.json").unlink()
    caplog.clear()
    newest = find_resume_checkpoint(checkpoints)
    assert read_trainer_state(newest)["step"] == STEPS - 2
    assert [r.getMessage() for r in caplog.records if r.name.startswith("nemo_dpo")] == [
        f"{newest} has no manifest.json (saved by an older nemo-dpo): its files cannot be checksummed"]
    got = losses_by_step(run_in_pool(dist_pool, tmp_path, *RESUME_ONLY))
    assert sorted(got) == [STEPS - 1, STEPS]
    for step in got:
        assert got[step] == pytest.approx(uninterrupted_run[1][step], abs=1e-6), step


def test_truncated_training_state_is_named(uninterrupted_run, tmp_path):
    checkpoints, newest = damaged_copy(uninterrupted_run, tmp_path)
    state = newest / "training_state.pt"
    size = state.stat().st_size
    state.write_bytes(state.read_bytes()[: size // 2])
    assert checkpoint_problem(newest) == f"training_state.pt is truncated ({size // 2} of {size} bytes)"
    (newest / "manifest.json").unlink()  # as an older save would have it: the load itself must say so
    problem = checkpoint_problem(newest)
    assert problem.startswith("training_state.pt cannot be read (") and "\n" not in problem, problem
    with pytest.raises(CheckpointError) as raised:
        with reading(newest, "training_state.pt"):
            read_training_state(state)
    assert str(raised.value).startswith(f"cannot read checkpoint {newest}: training_state.pt: ")


def test_bad_trainer_state_values_are_named(uninterrupted_run, tmp_path):
    checkpoints, newest = damaged_copy(uninterrupted_run, tmp_path)
    path = newest / "trainer_state.json"
    for key, value in (("consumed_samples", -16), ("step", 2.5), ("epoch", True), ("step", None)):
        state = json.loads(path.read_text())
        path.write_text(json.dumps({**state, key: value}))
        with pytest.raises(CheckpointError) as raised:
            read_trainer_state(newest)
        assert str(raised.value) == (f"checkpoint {newest}: trainer_state.json: {key} must be a non-negative "
                                     f"integer, got {value!r}")
        path.write_text(json.dumps(state))
    path.write_text(path.read_text()[:10])
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*: trainer_state.json: JSONDecodeError"):
        read_trainer_state(newest)
    assert read_trainer_state(find_resume_checkpoint(checkpoints))["step"] == STEPS - 1


def test_sharded_optimizer_resumes_at_other_data_and_tensor_parallel_sizes(dist_pool, tmp_path):
    """Saved at DP=2 with the optimizer state sharded (ZeRO-1) at step 4; resumed at DP=1 and at TP=2.

    The checkpoint holds master weights and moments per parameter (megatron's fully
    reshardable layout), so each resumed run continues exactly as the saving run did.
    """
    sharded = "model.optim.name=distributed_fused_adam"
    saving = [*(o if not o.startswith("trainer.dpo.save_interval=") else "trainer.dpo.save_interval=4" for o in RUN),
              sharded]
    saving_run = losses_by_step(run_in_pool(dist_pool, tmp_path / "dp2", *saving, nproc=2))
    for folder in (tmp_path / "dp2" / "checkpoints").iterdir():
        if folder.name != "final_model" and read_trainer_state(folder)["step"] > 4:
            shutil.rmtree(folder)
    for name, layout, nproc in (("dp1", "model.seed=1234", 1), ("tp2", "model.tensor_model_parallel_size=2", 2)):
        shutil.copytree(tmp_path / "dp2" / "checkpoints", tmp_path / name / "checkpoints")
        got = losses_by_step(run_in_pool(dist_pool, tmp_path / name, *RESUME_ONLY, sharded, layout, nproc=nproc))
        assert sorted(got) == [5, 6, 7, 8]
        for step in got:
            assert got[step] == pytest.approx(saving_run[step], abs=2e-6), (name, step)

