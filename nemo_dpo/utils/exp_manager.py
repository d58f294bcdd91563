"""``exp_manager``, NeMo's experiment set-up (``nemo.utils.exp_manager``), for a :class:`ScriptTrainer`."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_dpo.parallel.collectives import is_rank0
from nemo_dpo.training.experiment import build_logger, check_loggers, log_dir_of, resume_checkpoint


def exp_manager(trainer, cfg: DictConfig | None) -> Path | None:
    """Give ``trainer`` its log folder, metrics logger and the checkpoint to resume from, per ``cfg`` (``exp_manager``).

    The same decisions as ``train(cfg)``: ``explicit_log_dir`` or
    ``exp_dir/name``, ``resume_*``, ``create_tensorboard_logger``, ``create_wandb_logger``; the run's
    config is saved as ``config.yaml`` there. Collective. Returns the log
    folder (None and nothing set when ``cfg`` is None).
    """
    if cfg is None:
        return None
    check_loggers(cfg)
    log_dir = log_dir_of(cfg)
    trainer.exp_manager_cfg = cfg
    trainer.log_dir = log_dir
    trainer.ckpt_path = resume_checkpoint(cfg, log_dir / "checkpoints")
    run_config = OmegaConf.to_container(trainer.cfg, resolve=True)
    trainer.loggers.append(build_logger(cfg, log_dir, run_config=run_config))
    if is_rank0():
        OmegaConf.save(trainer.cfg, log_dir / "config.yaml")
    return log_dir
