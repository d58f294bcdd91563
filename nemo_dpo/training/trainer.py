"""The DPOTrainer of a run, with the collate ``model.data`` asks for."""

from __future__ import annotations

import math
from functools import partial

from omegaconf import DictConfig

from nemo_dpo.algorithms.dpo import DPOTrainer, dpo_custom_collate
from nemo_dpo.utils.run_timer import RunTimer


def sequence_length_multiple(pad_length_to_multiple_of: int | None, model_config) -> int | None:
    """What the collate pads lengths to a multiple of: the user's ``model.data.pad_length_to_multiple_of``,
    and under sequence parallelism also the TP size (their least common multiple)."""
    if not model_config.sequence_parallel:
        return pad_length_to_multiple_of
    return math.lcm(pad_length_to_multiple_of or 1, model_config.tensor_model_parallel_size)


def build_trainer(cfg: DictConfig, model, tokenizer, optimizer, scheduler, train_dataloader, val_dataloader,
                  logger, ckpt_callback) -> DPOTrainer:
    """``DPOTrainer`` over ``cfg.trainer.dpo`` with ``trainer.max_time`` as its time budget."""
    data_cfg = cfg.model.data
    collate_fn = partial(
        dpo_custom_collate,
        eos_id=tokenizer.eos_id,
        reset_position_ids=data_cfg.reset_position_ids,
        reset_attention_mask=data_cfg.reset_attention_mask,
        eod_mask_loss=data_cfg.eod_mask_loss,
        pad_length_to_multiple_of=sequence_length_multiple(data_cfg.pad_length_to_multiple_of,
                                                           model.model[0].config),
    )
    return DPOTrainer(
        cfg=cfg.trainer.dpo,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_dataloader=train_dataloader,
        val_dataloader=val_dataloader,
        test_dataloader=None,
        collate_fn=collate_fn,
        logger=logger,
        ckpt_callback=ckpt_callback,
        run_timer=RunTimer(cfg.trainer.get("max_time")),
    )
