"""Writes training metrics to ``metrics.jsonl`` (and TensorBoard when installed), on rank 0 only."""

from __future__ import annotations

import json
import math
from pathlib import Path

from nemo_dpo.parallel.collectives import is_rank0


class MetricsLogger:
    """``log_metrics(metrics, step, prefix)`` / ``finalize()``, the logger interface DPOTrainer calls."""

    def __init__(self, log_dir: str | Path, use_tensorboard: bool = True):
        self.active = is_rank0()
        self.log_dir = Path(log_dir)
        self._file = None
        self._tensorboard = None
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

    def log_metrics(self, metrics: dict, step: int, prefix: str = "") -> None:
        if not self.active:
            return
        values = {f"{prefix}{key}": float(value) for key, value in metrics.items()}
        record = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, step)

    def finalize(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
