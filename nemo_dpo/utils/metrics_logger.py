"""Writes training metrics to ``metrics.jsonl``, TensorBoard and Weights & Biases, on rank 0 only,
and their curves (PNG) when the run ends.

Every sink gets the same names (``train/loss``, ``val/acc``, ...) at the same steps.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from nemo_dpo.parallel.collectives import is_rank0
from nemo_dpo.utils.plotting import plot_metrics_or_warn


class MetricsLogger:
    """``log_metrics(metrics, step, prefix)`` / ``finalize()``, the logger interface DPOTrainer calls.

    ``wandb_init``: keyword arguments of ``wandb.init`` (a W&B run is started with
    them); None for no W&B run. Each metrics.jsonl record also holds ``wall_time``
    (seconds since the epoch, when it was written), as TensorBoard events do.
    With ``curves``, ``finalize()`` draws ``curve_*.png`` next to metrics.jsonl
    (:func:`~nemo_dpo.utils.plotting.plot_metrics`; a failure only warns) and
    keeps what it drew in ``self.curves``.
    """

    def __init__(self, log_dir: str | Path, use_tensorboard: bool = True, wandb_init: dict | None = None,
                 curves: bool = True):
        self.active = is_rank0()
        self.log_dir = Path(log_dir)
        self.draw_curves = curves
        self.curves: dict[Path, list[str]] = {}
        self._file = None
        self._tensorboard = None
        self._wandb_run = None
        if not self.active:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.log_dir / "metrics.jsonl", "a", encoding="utf-8")
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self._tensorboard = SummaryWriter(str(self.log_dir))
        if wandb_init is not None:
            import wandb  # checked at start-up (training/experiment.py:check_loggers)

            Path(wandb_init["dir"]).mkdir(parents=True, exist_ok=True)
            self._wandb_run = wandb.init(**wandb_init)

    def log_metrics(self, metrics: dict, step: int, prefix: str = "") -> None:
        if not self.active:
            return
        values = {f"{prefix}{key}": float(value) for key, value in metrics.items()}
        record = {"step": step, "wall_time": time.time(),
                  **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def finalize(self) -> None:
        """Close every sink and draw the curves (once: later calls do nothing)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            if self.draw_curves:
                self.curves = plot_metrics_or_warn(self.log_dir)
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.finish()
            self._wandb_run = None
            wandb.teardown()  # ends W&B's service process now, not at interpreter exit
