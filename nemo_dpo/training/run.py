"""One DPO job from a composed config: the page ``examples/train_gpt_dpo.py`` runs."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_dpo.algorithms.dpo import compute_max_steps
from nemo_dpo.checkpoint.training_checkpoint import load_training_checkpoint, read_trainer_state
from nemo_dpo.models.nlp.gpt.architecture import GPTArchitecture, precision_dtype
from nemo_dpo.optim.optimizer import build_optimizer
from nemo_dpo.optim.scheduler import build_scheduler
from nemo_dpo.parallel.collectives import is_rank0
from nemo_dpo.parallel.initialize import ParallelLayout, destroy_parallel, initialize_parallel, launch_world_size
from nemo_dpo.training.config import prepare_config
from nemo_dpo.training.data import build_dataset, build_train_dataloader, build_val_dataloader, check_data_impl
from nemo_dpo.training.experiment import (
    build_checkpoint_callback,
    build_logger,
    check_loggers,
    log_dir_of,
    resume_checkpoint,
)
from nemo_dpo.training.model import check_peft, load_pretrained_model
from nemo_dpo.training.ref_cache import build_ref_logprob_cache
from nemo_dpo.training.task_eval import build_task_eval, check_task_eval
from nemo_dpo.training.trainer import build_trainer

log = logging.getLogger(__name__)


def check_launch_size(trainer_cfg: DictConfig, world_size: int | None = None) -> None:
    """Refuse ``trainer.num_nodes`` x ``trainer.devices`` that differ from the processes the launcher started.

    Both left at their defaults (1 and 1) means "whatever torchrun or srun
    started", so one config serves any launch; ``devices`` of -1 or "auto" too.
    ``world_size`` defaults to the launch's (:func:`launch_world_size`).
    """
    nodes, devices = trainer_cfg.get("num_nodes", 1), trainer_cfg.get("devices", 1)
    if (nodes, devices) == (1, 1) or devices in (-1, "auto"):
        return
    world_size = launch_world_size() if world_size is None else world_size
    if not (isinstance(nodes, int) and isinstance(devices, int)) or nodes * devices != world_size:
        raise ValueError(
            f"trainer.num_nodes={nodes} x trainer.devices={devices} does not match the {world_size} process(es) "
            "started (torchrun --nnodes/--nproc-per-node, or srun's tasks); make them agree or leave both at 1"
        )


def check_run_config(cfg: DictConfig) -> None:
    """Everything refused before work starts: keys and values, data format, launch size, PEFT, loggers.

    A NeMo Aligner config gets our defaults for the keys it lacks (in place).
    """
    prepare_config(cfg)
    check_data_impl(cfg.model.data)
    check_launch_size(cfg.trainer)
    check_peft(cfg.model)
    check_loggers(cfg.exp_manager)
    check_task_eval(cfg.model.data)


def start_parallel(model_cfg: DictConfig) -> None:
    """torch.distributed and megatron-core's groups in ``model``'s TP/PP layout, RNGs seeded by ``model.seed``."""
    # megatron-core reports its DDP buckets parameter by parameter at INFO.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    initialize_parallel(
        ParallelLayout(
            model_cfg.tensor_model_parallel_size,
            model_cfg.pipeline_model_parallel_size,
            model_cfg.get("virtual_pipeline_model_parallel_size"),
        ),
        seed=model_cfg.seed,
    )


def train(cfg: DictConfig, model_cls=None) -> Path:
    """Run the DPO job ``cfg`` (``conf/gpt_dpo.yaml`` layout) on every rank; returns its log folder.

    ``model_cls``: a subclass of ``MegatronGPTDPOModel`` (e.g. with its own
    ``loss_func``) to train instead of it.

    Starts torch.distributed and megatron-core's groups (or joins a process group
    already started) and tears them down at the end. Metrics land in
    ``<log dir>/metrics.jsonl`` (and TensorBoard, W&B per ``exp_manager``), their curves
    in ``<log dir>/curve_*.png`` (``exp_manager.create_curves``), checkpoints in ``<log dir>/checkpoints``.
    """
    check_run_config(cfg)  # refused before any work starts
    model_cfg = cfg.model
    start_parallel(model_cfg)
    exp = cfg.exp_manager
    log_dir = log_dir_of(exp)
    # After the process group is up: rank 0 picks the checkpoint for every rank.
    resume_from = resume_checkpoint(exp, log_dir / "checkpoints")
    model, tokenizer, tokenizer_dir = load_pretrained_model(cfg, model_cls)
    warning = GPTArchitecture.from_config(model_cfg).check_sequence_length(
        model_cfg.data.seq_length or model_cfg.encoder_seq_length
    )
    if warning and is_rank0():
        log.warning(warning)

    trainer_state = read_trainer_state(resume_from) if resume_from else {"consumed_samples": 0}
    train_ds = build_dataset(model_cfg, tokenizer, "train")
    val_ds = build_dataset(model_cfg, tokenizer, "validation")
    train_dl = build_train_dataloader(model_cfg, train_ds, consumed_samples=trainer_state["consumed_samples"])
    val_dl = build_val_dataloader(model_cfg, val_ds)

    ref_logprob_cache = build_ref_logprob_cache(cfg, model, tokenizer_dir, log_dir)
    optimizer = build_optimizer(model.model, model_cfg.optim, precision_dtype(model_cfg.precision))
    max_steps = compute_max_steps(cfg.trainer.dpo, train_dl.batch_sampler)
    scheduler = build_scheduler(optimizer, model_cfg.optim.get("sched"), max_steps)
    if resume_from:
        # The reference policy stays the pretrained model; only the policy's state resumes.
        trainer_state = load_training_checkpoint(resume_from, model, optimizer, scheduler)

    ckpt_callback = build_checkpoint_callback(exp, log_dir, model, optimizer, scheduler, model_cfg, tokenizer_dir)
    logger = build_logger(exp, log_dir, run_config=OmegaConf.to_container(cfg, resolve=True))
    task_eval = build_task_eval(model_cfg, model, tokenizer, val_ds, logger)  # None when model.data.task_eval is off
    trainer = build_trainer(cfg, model, tokenizer, optimizer, scheduler, train_dl, val_dl,
                            logger if task_eval is None else task_eval.logger, ckpt_callback)
    if resume_from:
        trainer.load_state_dict(trainer_state)
    if ref_logprob_cache is not None:
        trainer.use_ref_logprob_cache(ref_logprob_cache)
    if is_rank0():
        OmegaConf.save(cfg, log_dir / "config.yaml")
        if resume_from:
            print(f"resuming from {resume_from} at step {trainer.step} of {trainer.max_steps}", flush=True)
    try:
        if task_eval is not None:
            task_eval.measure(trainer.step)
        trainer.fit()
        if task_eval is not None:
            task_eval.measure(trainer.step)
    finally:
        # fit() leaves the metrics file (and TensorBoard's writer thread) open when it stops early;
        # finalizing also draws the curves (rank 0).
        logger.finalize()
    if is_rank0():
        if task_eval is not None:
            print(task_eval.summary(), flush=True)
        print(f"metrics: {log_dir / 'metrics.jsonl'}  checkpoints: {log_dir / 'checkpoints'}", flush=True)
        if logger.curves:
            print(f"curves: {log_dir}/curve_*.png ({len(logger.curves)} files)", flush=True)
    destroy_parallel()
    return log_dir
