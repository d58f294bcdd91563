"""exp_manager's loggers: W&B from NeMo's keys, MLflow refused, the same names in every sink."""

import importlib.util
import os

import psutil
import pytest
from omegaconf import OmegaConf

from nemo_dpo.training.config import check_config_keys, compose_config
from nemo_dpo.training.experiment import build_logger, check_loggers, wandb_init_kwargs
from run_files import jsonl_metrics, tensorboard_metrics, wandb_offline_metrics


def exp_config(**wandb_kwargs):
    return OmegaConf.create({"name": "gpt_dpo", "create_wandb_logger": True, "wandb_logger_kwargs": wandb_kwargs})


def test_wandb_init_arguments_from_nemo_keys(tmp_path):
    got = wandb_init_kwargs(exp_config(project="p", name=None, offline=True, version="run7", log_model=False,
                                       tags=["a"]), tmp_path, run_config={"x": 1})
    assert got == {"project": "p", "tags": ["a"], "name": "gpt_dpo", "dir": str(tmp_path), "mode": "offline",
                   "id": "run7", "resume": "allow", "config": {"x": 1}}
    got = wandb_init_kwargs(exp_config(project="p", name="mine", save_dir=str(tmp_path / "w")), tmp_path)
    assert got == {"project": "p", "name": "mine", "dir": str(tmp_path / "w"), "mode": None, "id": None,
                   "resume": None, "config": None}
    assert wandb_init_kwargs(OmegaConf.create({"create_wandb_logger": False}), tmp_path) is None


@pytest.mark.parametrize("overrides, message", [
    (["exp_manager.create_wandb_logger=True", "+exp_manager.wandb_logger_kwargs.log_model=True"],
     "exp_manager.wandb_logger_kwargs.log_model=True: checkpoints are not uploaded to W&B"),
    (["exp_manager.create_wandb_logger=True", "+exp_manager.wandb_logger_kwargs.prefix=x"],
     "exp_manager.wandb_logger_kwargs.prefix='x': not a W&B setting nemo-dpo passes on"),
    (["+exp_manager.create_mlflow_logger=True"],
     "exp_manager.create_mlflow_logger=True: MLflow logging is not supported"),
    (["+exp_manager.create_mlflow_logger=False", "+exp_manager.mlflow_logger_kwargs.experiment_name=x"], None),
    (["+exp_manager.wandb_logger_kwargs.prefix=x"], None),  # read only with W&B on, as in NeMo
])
def test_logger_keys_refused_with_the_reason(overrides, message):
    cfg = compose_config(overrides)
    if message is None:
        assert check_config_keys(cfg) == []
    else:
        with pytest.raises(ValueError, match="refused config key") as error:
            check_config_keys(cfg)
        assert message in str(error.value)


def test_wandb_asked_for_but_not_installed_is_refused_at_start(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ImportError, match=r"create_wandb_logger=True needs the wandb package: pip install"):
        check_loggers(exp_config())
    check_loggers(OmegaConf.create({"create_wandb_logger": False}))


def test_every_sink_gets_the_same_names_and_values_and_wandb_leaves_no_process(tmp_path):
    pytest.importorskip("wandb")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    exp = OmegaConf.create({"name": "t", "create_tensorboard_logger": True, "create_curves": False,
                            "create_wandb_logger": True,
                            "wandb_logger_kwargs": {"project": "nemo_dpo_test", "offline": True}})
    logger = build_logger(exp, tmp_path, run_config={"model": {"seed": 1}})
    for step in (1, 2, 3):
        logger.log_metrics({"loss": 1.0 / step, "acc": 0.25 * step, "grad_norm": float("nan")}, step, "train/")
    logger.log_metrics({"loss": 0.3, "acc": 0.9}, 3, "val/")
    logger.finalize()
    expected = jsonl_metrics(tmp_path)
    assert expected[3] == pytest.approx({"train/loss": 1 / 3, "train/acc": 0.75, "train/grad_norm": float("nan"),
                                         "val/loss": 0.3, "val/acc": 0.9}, nan_ok=True)
    wandb, tensorboard = wandb_offline_metrics(tmp_path / "wandb"), tensorboard_metrics(tmp_path)
    assert sorted(wandb) == sorted(tensorboard) == sorted(expected) == [1, 2, 3]
    for step, values in expected.items():
        assert wandb[step] == pytest.approx(values, nan_ok=True)
        assert tensorboard[step] == pytest.approx(values, nan_ok=True)
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]
    assert left == [], [p.cmdline() for p in left]
    assert os.environ.get("WANDB_MODE") != "offline"  # the offline mode came from wandb_logger_kwargs
