"""Whole DPO jobs (``nemo_dpo.training.train``) run in-process on the ranks of the test pool."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nemo_dpo.losses import PREFERENCE_LOSSES, register_preference_loss
from nemo_dpo.parallel.collectives import is_rank0
from nemo_dpo.training import compose_config, train

NAN_LOSS = "nan_for_tests"


def _nan_loss(chosen_logratios, rejected_logratios, **_):
    return (chosen_logratios - rejected_logratios) * torch.nan


def read_metrics(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines()]


def train_job(log_dir: str, overrides: list[str]) -> list[dict] | None:
    """What ``python examples/train_gpt_dpo.py exp_manager.explicit_log_dir=<log_dir> *overrides`` logs (rank 0)."""
    # Pictures cost a second or two per run, the default data's task metric a few more; tests/test_cli.py,
    # test_plotting.py and test_task_metric.py check them.
    quick = ["exp_manager.create_curves=False"]
    if not any(o.startswith("model.data.task_eval") for o in overrides):
        quick.append("model.data.task_eval.enabled=false")
    cfg = compose_config([f"exp_manager.explicit_log_dir={log_dir}", *quick, *overrides])
    log_dir = train(cfg)
    return read_metrics(log_dir) if is_rank0() else None


def poisoned_train_job(log_dir: str, overrides: list[str]) -> list[dict] | None:
    """``train_job`` whose every loss is NaN, through the public plug-in point (a registered loss).

    The loss is registered for this job only, so other tests see the built-in registry.
    """
    register_preference_loss(NAN_LOSS)(_nan_loss)
    try:
        return train_job(log_dir, [*overrides, f"model.dpo.preference_loss={NAN_LOSS}"])
    finally:
        del PREFERENCE_LOSSES[NAN_LOSS]


def export_hf(checkpoint: str, out: str, *options: str) -> None:
    from nemo_dpo.interop.export_cli import main

    main(["--checkpoint", checkpoint, "--out", out, *options])


def config_file_train_job(config_dir: str, config_name: str, overrides: list[str]) -> dict | None:
    """``python examples/train_gpt_dpo.py --config-path <config_dir> --config-name <config_name> *overrides``.

    Returns (rank 0) the metrics, the warnings logged and the policy's parameter dtypes by name.
    """
    import logging

    from nemo_dpo.training import run as run_module

    dtypes: dict[str, str] = {}
    build_optimizer = run_module.build_optimizer

    def spy(chunks, *args, **kwargs):
        dtypes.update((name, str(p.dtype)) for chunk in chunks for name, p in chunk.named_parameters())
        return build_optimizer(chunks, *args, **kwargs)

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    handler = Collect()
    logging.getLogger().addHandler(handler)
    run_module.build_optimizer = spy
    try:
        log_dir = train(compose_config(overrides, config_dir=config_dir, config_name=config_name))
    finally:
        run_module.build_optimizer = build_optimizer
        logging.getLogger().removeHandler(handler)
    if not is_rank0():
        return None
    return {"metrics": read_metrics(log_dir), "warnings": handler.messages, "dtypes": dtypes}


def nemo_aligner_script_job(log_dir: str, overrides: list[str]) -> list[dict] | None:
    """NeMo Aligner's own ``train_gpt_dpo.py`` (imports renamed) run on our config; rank 0's metrics."""
    from nemo_aligner_train_gpt_dpo import main

    main(compose_config([f"exp_manager.explicit_log_dir={log_dir}", *overrides]))
    return read_metrics(log_dir) if is_rank0() else None


def api_page_example(overrides: list[str]) -> dict:
    """The usage example of NeMo Aligner's API page, with ``nemo_aligner`` replaced by ``nemo_dpo``."""
    from functools import partial

    from nemo_dpo.algorithms.dpo import DPOTrainer, dpo_custom_collate
    from nemo_dpo.checkpoint.pretrained import DEFAULT_MODEL_DIR
    from nemo_dpo.data.nlp.builders import build_dataloader, build_train_valid_test_dpo_datasets, identity_collate
    from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
    from nemo_dpo.utils.distributed import Timer
    from nemo_dpo.utils.train_script_utils import (
        CustomLoggerWrapper,
        add_custom_checkpoint_callback,
        extract_optimizer_scheduler_from_ptl_model,
        init_using_ptl,
        resolve_and_create_trainer,
    )
    from nemo_dpo.utils.utils import load_from_nemo

    class RecordingLogger:
        def __init__(self):
            self.records = []

        def log_metrics(self, metrics, step):
            self.records.append({"step": step, **metrics})

    cfg = compose_config(overrides)
    trainer = resolve_and_create_trainer(cfg, "dpo")
    model_cfg, path = cfg.model, str(DEFAULT_MODEL_DIR)
    # --- the API page's example from here on
    model = load_from_nemo(MegatronGPTDPOModel, model_cfg, trainer, restore_path=path)
    train_ds, val_ds, test_ds = build_train_valid_test_dpo_datasets(
        cfg=model_cfg, data_prefix=model_cfg.data.data_prefix, data_impl="jsonl", splits_string=None,
        train_valid_test_num_samples=[-1, -1, -1], seq_length=model_cfg.data.seq_length, seed=model_cfg.seed,
        tokenizer=model.tokenizer,
    )
    train_dl = build_dataloader(cfg, train_ds, 0, model_cfg.micro_batch_size, model_cfg.global_batch_size,
                                collate_fn=identity_collate)
    val_dl = build_dataloader(cfg, val_ds, 0, model_cfg.micro_batch_size, model_cfg.global_batch_size,
                              collate_fn=identity_collate, use_random_sampler=False)
    test_dl = None
    init_using_ptl(trainer, model, train_dl, train_ds)
    optimizer, scheduler = extract_optimizer_scheduler_from_ptl_model(model)
    recorder = RecordingLogger()
    logger, ckpt_callback, timer = CustomLoggerWrapper([recorder]), add_custom_checkpoint_callback(trainer, model), Timer(None)

    dpo_trainer = DPOTrainer(cfg=cfg.trainer.dpo, model=model, optimizer=optimizer,
        scheduler=scheduler, train_dataloader=train_dl, val_dataloader=val_dl,
        test_dataloader=test_dl, collate_fn=partial(dpo_custom_collate, eos_id=model.tokenizer.eos_id),
        logger=logger, ckpt_callback=ckpt_callback, run_timer=timer)
    dpo_trainer.fit()                       # epochs, validation, checkpoints
    val_loss, val_metrics = dpo_trainer.run_validation()
    return dict(records=recorder.records, val_loss=val_loss, val_metrics=val_metrics, eos_id=model.tokenizer.eos_id,
                state=dpo_trainer.state_dict(), test_ds=test_ds)


def slurm_process_group(slurm_env: dict) -> dict:
    """Start the process group as an ``srun`` task would, from ``slurm_env`` and ``SLURM_PROCID``/``LOCALID`` = rank.

    The pool's own group and launch variables are put aside first (and the
    environment restored after), so only the Slurm variables can be read.
    """
    import os

    import torch.distributed as dist

    from nemo_dpo.parallel.initialize import init_process_group

    rank = dist.get_rank()
    dist.destroy_process_group()
    saved = dict(os.environ)
    try:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
        os.environ.update(slurm_env, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank))
        init_process_group()
        total = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(total)
        return dict(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ["LOCAL_RANK"]),
                    addr=os.environ["MASTER_ADDR"], port=os.environ["MASTER_PORT"], total=total.item())
    finally:
        os.environ.clear()
        os.environ.update(saved)
