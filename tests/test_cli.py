"""``nemo-dpo-train`` and ``nemo-dpo-plot`` as a user gets them: installed (not editable) from a copy of
the checkout, run from an empty folder elsewhere.

One install and one training run per test session (module fixtures); the install
reuses the test environment's dependencies and downloads nothing.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nemo_dpo.checkpoint.dist_ckpt import is_complete
from nemo_dpo.cli.train import absolute_config_path
from nemo_dpo.utils.plotting import CURVES
from run_files import jsonl_metrics, tensorboard_metrics, wandb_offline_metrics

REPO = Path(__file__).resolve().parent.parent
# Three steps on small batches, validating once on one batch.
SHORT = ["trainer.dpo.max_steps=3", "trainer.dpo.val_check_interval=3", "trainer.dpo.limit_val_batches=1",
         "model.global_batch_size=8", "model.micro_batch_size=4", "model.data.task_eval.num_prompts=16"]


def test_the_packaged_config_is_the_top_level_config():
    """nemo-dpo-train reads nemo_dpo/conf/gpt_dpo.yaml, the example conf/gpt_dpo.yaml: one config, twice."""
    assert (REPO / "nemo_dpo" / "conf" / "gpt_dpo.yaml").read_bytes() == (REPO / "conf" / "gpt_dpo.yaml").read_bytes()


@pytest.mark.parametrize("argv, expected", [
    (["--config-path", "mine", "a=1"], ["--config-path", "{cwd}/mine", "a=1"]),
    (["-cp", "mine"], ["-cp", "{cwd}/mine"]),
    (["--config-path=mine", "--config-name", "x"], ["--config-path={cwd}/mine", "--config-name", "x"]),
    (["--config-path", "/abs/conf"], ["--config-path", "/abs/conf"]),
    (["--config-path=pkg://my_package.conf"], ["--config-path=pkg://my_package.conf"]),
    (["model.data.data_prefix.train=mine"], ["model.data.data_prefix.train=mine"]),
])
def test_a_relative_config_path_is_taken_from_the_working_directory(argv, expected):
    cwd = os.getcwd()
    assert absolute_config_path(argv) == [arg.format(cwd=cwd) for arg in expected]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The environment of a non-editable ``pip install`` of the checkout's files (tracked and new ones)."""
    root = tmp_path_factory.mktemp("install")
    source, target = root / "source", root / "site"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((REPO / name).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, cwd=root)
    env = {**os.environ, "PYTHONPATH": str(target), "PATH": f"{target / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    where = subprocess.run([sys.executable, "-c", "import nemo_dpo; print(nemo_dpo.__file__)"], env=env,
                           cwd=root, capture_output=True, text=True, check=True).stdout
    assert Path(where.strip()).is_relative_to(target), where  # the installed copy, not the checkout
    return {"env": env, "site": target}


@pytest.fixture(scope="module")
def installed_run(installed, tmp_path_factory) -> dict:
    """``nemo-dpo-train`` with W&B offline, from an empty folder, with a temp folder of its own.

    The tokenizer is given explicitly (the packaged one), so the run stages a copy of it in the
    temp folder, as it does for Hugging Face and .nemo checkpoints.
    """
    workdir, temp_dir = tmp_path_factory.mktemp("empty"), tmp_path_factory.mktemp("tmp")
    env = {**installed["env"], "WANDB_MODE": "offline", "TMPDIR": str(temp_dir)}
    tokenizer = installed["site"] / "nemo_dpo" / "assets" / "default_model" / "tokenizer"
    result = subprocess.run(["nemo-dpo-train", *SHORT, "exp_manager.create_wandb_logger=True",
                             f"model.tokenizer.path={tokenizer}"], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return {"log_dir": workdir / "results" / "gpt_dpo", "temp_dir": temp_dir, "stderr": result.stderr,
            "stdout": result.stdout}


def test_installed_command_trains_and_writes_metrics_checkpoint_and_curves(installed_run):
    log_dir = installed_run["log_dir"]
    metrics = jsonl_metrics(log_dir)
    assert sorted(metrics) == [0, 1, 2, 3] and "val/loss" in metrics[3] and "train/loss" in metrics[1]
    # The embedded default's task metric, before and after training.
    before, after = metrics[0]["task/exact_match"], metrics[3]["task/exact_match"]
    # ... and printed at the end, with the values logged.
    assert (f"task/exact_match (greedy answers to 16 held-out prompts): {before:.3f} before training, "
            f"{after:.3f} after; preference accuracy (val/acc) {metrics[3]['val/acc']:.3f}") in installed_run["stdout"]
    checkpoints = sorted((log_dir / "checkpoints").iterdir())
    assert [p.name for p in checkpoints][0] == "final_model" and len(checkpoints) == 2
    assert "step=3" in checkpoints[1].name and all(is_complete(p) for p in checkpoints)
    for name in CURVES:
        assert (log_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_wandb_offline_and_tensorboard_log_the_names_and_values_of_metrics_jsonl(installed_run):
    log_dir = installed_run["log_dir"]
    expected = jsonl_metrics(log_dir)
    wandb = wandb_offline_metrics(log_dir / "wandb")
    tensorboard = tensorboard_metrics(log_dir)
    assert "val/acc" in expected[3] and "train/reference_step_time" in expected[1]
    for step, values in expected.items():
        assert wandb[step] == pytest.approx(values, rel=1e-12, nan_ok=True), step
        assert tensorboard[step] == pytest.approx(values, rel=1e-6, nan_ok=True), step  # float32 events
    assert sorted(wandb) == sorted(tensorboard) == sorted(expected)


def test_no_temporary_file_of_ours_is_left(installed_run):
    left = sorted(p.name for p in installed_run["temp_dir"].iterdir())
    assert [name for name in left if name.startswith("nemo_dpo")] == [], left


def test_the_progress_bar_shows_step_loss_acc_and_time_left(installed_run):
    last = installed_run["stderr"].replace("\r", "\n").split("Training steps")[-1]
    # e.g. ": 100%|██████| 3/3 [00:04<00:00,  1.42s/it, train_loss=0.6799, train_acc=0.625, ...]"
    assert re.search(r"3/3 \[\d\d:\d\d<\d\d:\d\d", last), last
    assert re.search(r"train_loss=[\d.]+", last) and re.search(r"train_acc=[\d.]+", last), last


def test_installed_plot_command_redraws_the_curves(installed, installed_run):
    log_dir = installed_run["log_dir"]
    for name in CURVES:
        (log_dir / name).unlink()
    result = subprocess.run(["nemo-dpo-plot", str(log_dir)], env=installed["env"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    printed = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert sorted(Path(path).name for path in printed) == sorted(CURVES)
    assert printed[str(log_dir / "curve_loss.png")] == "train/loss, val/loss"
    assert all((log_dir / name).is_file() for name in CURVES)


def test_help_lists_main_keys_of_the_packaged_config(installed):
    result = subprocess.run(["nemo-dpo-train", "--help"], env=installed["env"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    keys = re.findall(r"^  ([a-z_]+(?:\.[a-z_]+)+) ", result.stdout, flags=re.M)
    packaged = OmegaConf.load(installed["site"] / "nemo_dpo" / "conf" / "gpt_dpo.yaml")
    assert len(keys) >= 15 and "trainer.dpo.max_steps" in keys and "model.data.data_prefix.train" in keys
    missing = [key for key in keys if OmegaConf.select(packaged, key, default=KeyError) is KeyError]
    assert missing == []


def test_config_path_and_name_from_the_working_directory(installed, tmp_path):
    config = OmegaConf.load(REPO / "conf" / "gpt_dpo.yaml")
    config.trainer.dpo.max_steps = 7
    (tmp_path / "my_conf").mkdir()
    OmegaConf.save(config, tmp_path / "my_conf" / "short.yaml")
    result = subprocess.run(
        ["nemo-dpo-train", "--config-path", "my_conf", "--config-name", "short", "model.optim.lr=0.001",
         "--cfg", "job"], cwd=tmp_path, env=installed["env"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.trainer.dpo.max_steps == 7 and printed.model.optim.lr == 0.001
