"""NeMo Aligner's script helpers (``nemo_aligner.utils.train_script_utils``) without PyTorch Lightning.

NeMo Aligner's DPO script builds a Lightning trainer only to start
distributed training, carry loggers and the checkpoint callback, and let its
model create the optimizer. Here :class:`ScriptTrainer` carries the same things
as plain attributes and each helper is an adapter over nemo-dpo's builders
(:mod:`nemo_dpo.training`), so a script written against NeMo Aligner runs the
same job as ``examples/train_gpt_dpo.py``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_dpo.algorithms.dpo import compute_max_steps
from nemo_dpo.checkpoint.training_checkpoint import load_training_checkpoint, read_trainer_state
from nemo_dpo.models.nlp.gpt.architecture import precision_dtype
from nemo_dpo.optim.optimizer import build_optimizer
from nemo_dpo.optim.scheduler import build_scheduler
from nemo_dpo.models.nlp.gpt.lora import has_lora
from nemo_dpo.training.experiment import build_checkpoint_callback
from nemo_dpo.training.model import check_peft, restore_adapters
from nemo_dpo.training.run import check_run_config, start_parallel

__all__ = [
    "CustomLoggerWrapper",
    "ScriptTrainer",
    "add_custom_checkpoint_callback",
    "extract_optimizer_scheduler_from_ptl_model",
    "init_distributed",
    "init_peft",
    "init_using_ptl",
    "resolve_and_create_trainer",
    "retrieve_custom_trainer_state_dict",
]

# What NeMo keeps on the Lightning module (optimizer, scheduler) and its checkpoint connector, by model.
_MODEL_STATE: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def model_state(model) -> dict:
    """Per-model facts the helpers share: ``tokenizer_dir``, ``optimizer``, ``scheduler``."""
    return _MODEL_STATE.setdefault(model, {})


@dataclass
class ScriptTrainer:
    """What NeMo's Lightning trainer carries through a DPO script, as plain attributes.

    ``cfg``: the resolved run config. :func:`~nemo_dpo.utils.exp_manager.exp_manager`
    fills ``log_dir``, ``loggers`` and ``ckpt_path`` (the checkpoint to resume
    from, or None); :func:`add_custom_checkpoint_callback` adds the checkpoint
    callback to ``callbacks``.
    """

    cfg: DictConfig
    loggers: list = field(default_factory=list)
    callbacks: list = field(default_factory=list)
    ckpt_path: Path | None = None
    log_dir: Path | None = None
    exp_manager_cfg: DictConfig | None = None


def resolve_and_create_trainer(cfg: DictConfig, pop_trainer_key: str) -> ScriptTrainer:
    """Resolve ``cfg`` in place, check it and start distributed training; the :class:`ScriptTrainer`.

    Differs from NeMo Aligner: no Lightning trainer is made (``pop_trainer_key``,
    the algorithm's ``trainer.<key>`` section, is left in place); the config is
    validated as ``train(cfg)`` validates it (unknown keys, values, and
    ``trainer.num_nodes`` x ``trainer.devices`` against the launch); and
    torch.distributed with megatron-core's groups starts here rather than in
    :func:`init_distributed`, because the model is built next.
    """
    OmegaConf.resolve(cfg)
    check_run_config(cfg)
    start_parallel(cfg.model)
    return ScriptTrainer(cfg=cfg)


def init_distributed(ptl_trainer: ScriptTrainer, ptl_model, use_te: bool = False) -> None:
    """Nothing left to do: :func:`resolve_and_create_trainer` started distributed training.

    ``use_te``: transformer-engine's TP groups need no set-up here either.
    """


def init_peft(ptl_model, updated_cfg: DictConfig) -> None:
    """Check ``model.peft``; with LoRA load ``restore_from_path``'s adapters when set.

    The adapters themselves are added (and the base frozen) when the model is
    built from a config with ``peft_scheme: lora``; a model built without them is refused.
    """
    settings = check_peft(updated_cfg)
    if settings is not None and ptl_model is not None:
        if not has_lora(ptl_model.model):
            raise ValueError("model.peft.peft_scheme=lora but the model was built without adapters: "
                             "build it from the config that has the peft block")
        restore_adapters(ptl_model, updated_cfg)


def retrieve_custom_trainer_state_dict(ptl_trainer: ScriptTrainer) -> dict | None:
    """``step``, ``consumed_samples``, ``epoch`` of the checkpoint the run resumes from; None when it starts afresh."""
    if ptl_trainer.ckpt_path is None:
        return None
    return read_trainer_state(ptl_trainer.ckpt_path)


def init_using_ptl(ptl_trainer: ScriptTrainer, ptl_model, train_dataloader, train_ds) -> None:
    """Create the model's optimizer and LR schedule (``model.optim``) and, when resuming, restore them with the policy.

    Differs from NeMo Aligner: no Lightning hooks run; what they did for DPO
    (optimizer, scheduler over the run's steps, restoring ``trainer.ckpt_path``)
    is done directly. ``train_ds`` is not needed.
    """
    model_cfg = ptl_model.cfg
    optimizer = build_optimizer(ptl_model.model, model_cfg.optim, precision_dtype(model_cfg.precision))
    max_steps = compute_max_steps(ptl_trainer.cfg.trainer.dpo, train_dataloader.batch_sampler)
    scheduler = build_scheduler(optimizer, model_cfg.optim.get("sched"), max_steps)
    if ptl_trainer.ckpt_path is not None:
        # The reference policy stays the pretrained model; only the policy's state resumes.
        load_training_checkpoint(ptl_trainer.ckpt_path, ptl_model, optimizer, scheduler)
    model_state(ptl_model).update(optimizer=optimizer, scheduler=scheduler)


def extract_optimizer_scheduler_from_ptl_model(ptl_model) -> tuple:
    """``(optimizer, scheduler)`` that :func:`init_using_ptl` made for ``ptl_model``.

    Differs from NeMo Aligner: the optimizer is nemo-dpo's ``MegatronAdamW``
    (DPOTrainer also takes a plain torch optimizer); the scheduler is a torch LR scheduler.
    """
    state = model_state(ptl_model)
    if "optimizer" not in state:
        raise RuntimeError("no optimizer for this model: call init_using_ptl(trainer, model, train_dataloader, train_ds) first")
    return state["optimizer"], state["scheduler"]


class _NoCheckpointCallback:
    """Saves nothing (``exp_manager.create_checkpoint_callback: False``, or no ``exp_manager`` call)."""

    def custom_save(self, *args, **kwargs) -> None:
        pass


def add_custom_checkpoint_callback(ptl_trainer: ScriptTrainer, ptl_model):
    """The ``ckpt_callback`` for DPOTrainer, per ``exp_manager.checkpoint_callback_params``, saving under the log folder.

    Call after :func:`init_using_ptl` (a checkpoint holds the optimizer and schedule).
    """
    exp = ptl_trainer.exp_manager_cfg
    optimizer, scheduler = extract_optimizer_scheduler_from_ptl_model(ptl_model)
    callback = None
    if exp is not None and ptl_trainer.log_dir is not None:
        callback = build_checkpoint_callback(exp, ptl_trainer.log_dir, ptl_model, optimizer, scheduler, ptl_model.cfg,
                                             model_state(ptl_model).get("tokenizer_dir"))
    if callback is None:
        return _NoCheckpointCallback()
    ptl_trainer.callbacks.append(callback)
    return callback


@dataclass
class CustomLoggerWrapper:
    """Hands each call to every logger that has the method (``log_metrics`` with ``prefix`` on the names)."""

    loggers: list

    def apply_fn(self, name_of_fn: str, *args, **kwargs) -> None:
        for logger in self.loggers:
            method = getattr(logger, name_of_fn, None)
            if method is not None:
                method(*args, **kwargs)

    def log_hyperparams(self, params) -> None:
        self.apply_fn("log_hyperparams", params)

    def log_table(self, *args, **kwargs) -> None:
        self.apply_fn("log_table", *args, **kwargs)

    def log_image(self, *args, **kwargs) -> None:
        self.apply_fn("log_image", *args, **kwargs)

    def log_metrics(self, metrics: dict, step: int | None = None, prefix: str = "") -> None:
        self.apply_fn("log_metrics", {f"{prefix}{key}": value for key, value in metrics.items()}, step)

    def finalize(self) -> None:
        self.apply_fn("finalize")
