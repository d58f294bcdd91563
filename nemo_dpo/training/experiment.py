"""What ``exp_manager`` decides: the log folder, where to resume from, checkpoints and metrics."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_dpo.checkpoint.callback import CheckpointCallback
from nemo_dpo.checkpoint.training_checkpoint import checkpoint_problem, find_resume_checkpoint
from nemo_dpo.parallel.collectives import broadcast_object, is_rank0
from nemo_dpo.utils.metrics_logger import MetricsLogger


def log_dir_of(exp: DictConfig) -> Path:
    """``explicit_log_dir``, else ``exp_dir/name`` (``exp_dir`` null: ``results``; ``name`` null: ``gpt_dpo``)."""
    return Path(exp.get("explicit_log_dir") or Path(exp.get("exp_dir") or "results") / (exp.get("name") or "gpt_dpo"))


def resume_checkpoint(exp: DictConfig, checkpoint_dir: Path) -> Path | None:
    """The checkpoint to continue from, per ``exp_manager.resume_*``; None to start afresh (collective)."""
    if exp.resume_from_checkpoint:
        path = Path(exp.resume_from_checkpoint)
        # Rank 0 checks (hashing every file once) and tells the others.
        problem = broadcast_object(checkpoint_problem(path) if is_rank0() else None)
        if problem:
            raise ValueError(f"exp_manager.resume_from_checkpoint={path} cannot be resumed from: {problem}")
        return path
    if not exp.resume_if_exists:
        return None
    path = find_resume_checkpoint(checkpoint_dir)
    if path is None and not exp.resume_ignore_no_checkpoint:
        raise FileNotFoundError(f"resume_if_exists: no complete checkpoint in {checkpoint_dir}")
    return path


def build_checkpoint_callback(exp: DictConfig, log_dir: Path, model, optimizer, scheduler, model_cfg: DictConfig,
                              tokenizer_dir: Path) -> CheckpointCallback | None:
    """Saves under ``log_dir/checkpoints`` per ``checkpoint_callback_params``; None when turned off."""
    if not exp.create_checkpoint_callback:
        return None
    params = exp.checkpoint_callback_params
    return CheckpointCallback(
        log_dir / "checkpoints", params.filename, model, optimizer, scheduler, model_cfg, tokenizer_dir,
        monitor=params.monitor, mode=params.mode, save_top_k=params.save_top_k,
        save_final_model=params.save_nemo_on_train_end,
    )


def check_loggers(exp: DictConfig) -> None:
    """Refuse at start-up a logger whose package is missing (``create_wandb_logger`` without wandb)."""
    if exp.get("create_wandb_logger") and importlib.util.find_spec("wandb") is None:
        raise ImportError("exp_manager.create_wandb_logger=True needs the wandb package: "
                          "pip install 'nemo-dpo[wandb]' (or set it to False)")


def wandb_init_kwargs(exp: DictConfig, log_dir: Path, run_config: dict | None = None) -> dict | None:
    """``wandb.init``'s arguments from ``exp_manager.wandb_logger_kwargs`` (NeMo's keys, as PyTorch Lightning's
    ``WandbLogger`` reads them); None without ``create_wandb_logger``.

    ``name`` defaults to ``exp_manager.name``, ``save_dir`` to the log folder;
    ``offline: True`` is W&B's offline mode (``WANDB_MODE=offline`` does the same);
    with an ``id`` (or ``version``) a resumed run continues the same W&B run.
    The keys accepted are those of nemo_keys.py's table (checked at start-up).
    """
    if not exp.get("create_wandb_logger"):
        return None
    kwargs = {key: value for key, value in
              OmegaConf.to_container(exp.get("wandb_logger_kwargs") or {}, resolve=True).items()
              if value is not None}
    kwargs.pop("log_model", None)  # only False/null get here
    run_id = kwargs.pop("id", None) or kwargs.pop("version", None)
    kwargs.pop("version", None)
    save_dir = kwargs.pop("save_dir", None) or log_dir
    offline = kwargs.pop("offline", False)
    kwargs.setdefault("name", exp.get("name"))
    return {**kwargs, "dir": str(save_dir), "mode": "offline" if offline else None,  # None: WANDB_MODE decides
            "id": run_id, "resume": "allow" if run_id else None, "config": run_config}


def build_logger(exp: DictConfig, log_dir: Path, run_config: dict | None = None) -> MetricsLogger:
    """``metrics.jsonl`` in ``log_dir``, plus TensorBoard with ``create_tensorboard_logger``, a W&B
    run (its config: ``run_config``) with ``create_wandb_logger``, and curves at the end with ``create_curves``."""
    return MetricsLogger(log_dir, use_tensorboard=exp.get("create_tensorboard_logger", True),
                         wandb_init=wandb_init_kwargs(exp, log_dir, run_config),
                         curves=exp.get("create_curves", True))
