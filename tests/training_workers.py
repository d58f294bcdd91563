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
    cfg = compose_config([f"exp_manager.explicit_log_dir={log_dir}", *overrides])
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


def export_hf(checkpoint: str, out: str) -> None:
    from nemo_dpo.interop.export_cli import main

    main(["--checkpoint", checkpoint, "--out", out])


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
