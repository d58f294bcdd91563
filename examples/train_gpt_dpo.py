"""DPO training of a GPT model, configured by conf/gpt_dpo.yaml (Hydra).

    python examples/train_gpt_dpo.py                                   # embedded default, one process
    torchrun --nproc-per-node 2 examples/train_gpt_dpo.py model.tensor_model_parallel_size=2
    python examples/train_gpt_dpo.py pretrained_checkpoint.restore_from_path=/path/to/model \\
        model.data.data_prefix.train=train.jsonl model.data.data_prefix.validation=val.jsonl
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from megatron.core import parallel_state
from omegaconf import DictConfig, OmegaConf, open_dict

from nemo_dpo.algorithms.dpo import DPOTrainer, compute_max_steps, dpo_custom_collate
from nemo_dpo.checkpoint.callback import CheckpointCallback
from nemo_dpo.checkpoint.pretrained import DEFAULT_MODEL_DIR
from nemo_dpo.checkpoint.restore import open_pretrained
from nemo_dpo.checkpoint.training_checkpoint import (
    checkpoint_problem,
    find_resume_checkpoint,
    load_training_checkpoint,
    read_trainer_state,
)
from nemo_dpo.data import (
    DPOModelDataset,
    MegatronPretrainingBatchSampler,
    MegatronPretrainingRandomBatchSampler,
    build_dataloader,
)
from nemo_dpo.models.nlp.gpt.builder import build_gpt_model
from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
from nemo_dpo.optim.optimizer import build_optimizer
from nemo_dpo.optim.scheduler import build_scheduler
from nemo_dpo.parallel.initialize import ParallelLayout, destroy_parallel, initialize_parallel
from nemo_dpo.utils.metrics_logger import MetricsLogger
from nemo_dpo.utils.run_timer import RunTimer

DEFAULT_DATA_DIR = DEFAULT_MODEL_DIR.parent / "default_data"


def build_dataset(cfg: DictConfig, tokenizer, split: str) -> DPOModelDataset | None:
    path = cfg.model.data.data_prefix.get(split)
    if path is None and cfg.model.data.data_prefix.get("train") is None and split != "test":
        path = DEFAULT_DATA_DIR / f"{split}.jsonl"
    if path is None:
        return None
    seq_length = cfg.model.data.seq_length or cfg.model.encoder_seq_length
    return DPOModelDataset(cfg.model, tokenizer, split, path, None, None, seq_length, cfg.model.seed)


def build_loader(cfg: DictConfig, dataset, train: bool, consumed_samples: int = 0):
    sampler_type = MegatronPretrainingRandomBatchSampler if train else MegatronPretrainingBatchSampler
    extra = {"seed": cfg.model.seed} if train else {}
    sampler = sampler_type(
        total_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=cfg.model.micro_batch_size,
        global_batch_size=cfg.model.global_batch_size,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
        **extra,
    )
    return build_dataloader(dataset, sampler, num_workers=cfg.model.data.num_workers)


def resume_checkpoint(exp: DictConfig, checkpoint_dir: Path) -> Path | None:
    """The checkpoint to continue from, per ``exp_manager.resume_*``."""
    if exp.resume_from_checkpoint:
        path = Path(exp.resume_from_checkpoint)
        problem = checkpoint_problem(path)
        if problem:
            raise ValueError(f"exp_manager.resume_from_checkpoint={path} cannot be resumed from: {problem}")
        return path
    if not exp.resume_if_exists:
        return None
    path = find_resume_checkpoint(checkpoint_dir)
    if path is None and not exp.resume_ignore_no_checkpoint:
        raise FileNotFoundError(f"resume_if_exists: no complete checkpoint in {checkpoint_dir}")
    return path


@hydra.main(config_path="../conf", config_name="gpt_dpo", version_base=None)
def main(cfg: DictConfig) -> None:
    # megatron-core reports its DDP buckets parameter by parameter at INFO.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    model_cfg = cfg.model
    initialize_parallel(
        ParallelLayout(
            model_cfg.tensor_model_parallel_size,
            model_cfg.pipeline_model_parallel_size,
            model_cfg.virtual_pipeline_model_parallel_size,
        ),
        seed=model_cfg.seed,
    )

    # A nemo-dpo folder, a Hugging Face folder or a .nemo file; the checkpoint's
    # architecture overrides the config's (NeMo's load_and_override_model_config).
    source = open_pretrained(
        cfg.pretrained_checkpoint.restore_from_path or DEFAULT_MODEL_DIR, tokenizer_path=model_cfg.tokenizer.path
    )
    with open_dict(model_cfg):
        model_cfg.merge_with(source.architecture)
        model_cfg.vocab_size = source.vocab_size
    tokenizer_dir, tokenizer = source.tokenizer_dir, source.load_tokenizer()
    chunks = build_gpt_model(model_cfg, source.vocab_size)
    source.load_weights(chunks)
    model = MegatronGPTDPOModel(model_cfg, source.vocab_size, model_chunks=chunks)

    exp = cfg.exp_manager
    log_dir = Path(exp.explicit_log_dir or Path(exp.exp_dir) / exp.name)
    resume_from = resume_checkpoint(exp, log_dir / "checkpoints")
    trainer_state = read_trainer_state(resume_from) if resume_from else {"consumed_samples": 0}

    train_ds = build_dataset(cfg, tokenizer, "train")
    val_ds = build_dataset(cfg, tokenizer, "validation")
    train_dl = build_loader(cfg, train_ds, train=True, consumed_samples=trainer_state["consumed_samples"])
    val_dl = build_loader(cfg, val_ds, train=False)

    optimizer = build_optimizer(model.model, model_cfg.optim)
    max_steps = compute_max_steps(cfg.trainer.dpo, train_dl.batch_sampler)
    scheduler = build_scheduler(optimizer, model_cfg.optim.get("sched"), max_steps)
    if resume_from:
        # The reference policy stays the pretrained model; only the policy's state resumes.
        trainer_state = load_training_checkpoint(resume_from, model, optimizer, scheduler)

    ckpt_callback = None
    if exp.create_checkpoint_callback:
        params = exp.checkpoint_callback_params
        ckpt_callback = CheckpointCallback(
            log_dir / "checkpoints", params.filename, model, optimizer, scheduler, model_cfg, tokenizer_dir,
            monitor=params.monitor, mode=params.mode, save_top_k=params.save_top_k,
            save_final_model=params.save_nemo_on_train_end,
        )
    trainer = DPOTrainer(
        cfg=cfg.trainer.dpo,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_dataloader=train_dl,
        val_dataloader=val_dl,
        test_dataloader=None,
        collate_fn=lambda items: dpo_custom_collate(
            items,
            eos_id=tokenizer.eos_id,
            reset_position_ids=model_cfg.data.reset_position_ids,
            reset_attention_mask=model_cfg.data.reset_attention_mask,
            eod_mask_loss=model_cfg.data.eod_mask_loss,
            pad_length_to_multiple_of=model_cfg.data.pad_length_to_multiple_of,
        ),
        logger=MetricsLogger(log_dir, use_tensorboard=exp.create_tensorboard_logger),
        ckpt_callback=ckpt_callback,
        run_timer=RunTimer(cfg.trainer.max_time),
    )
    if resume_from:
        trainer.load_state_dict(trainer_state)
    if torch.distributed.get_rank() == 0:
        OmegaConf.save(cfg, log_dir / "config.yaml")
        if resume_from:
            print(f"resuming from {resume_from} at step {trainer.step} of {trainer.max_steps}", flush=True)
    trainer.fit()
    if torch.distributed.get_rank() == 0:
        print(f"metrics: {log_dir / 'metrics.jsonl'}  checkpoints: {log_dir / 'checkpoints'}", flush=True)
    destroy_parallel()


if __name__ == "__main__":
    main()
