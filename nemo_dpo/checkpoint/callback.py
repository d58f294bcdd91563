"""The ``ckpt_callback`` DPOTrainer saves through: training checkpoints, top-k, final model."""

from __future__ import annotations

import logging
import math
import re
import shutil
from pathlib import Path

from nemo_dpo.checkpoint.adapters import save_adapters
from nemo_dpo.checkpoint.pretrained import save_pretrained
from nemo_dpo.checkpoint.training_checkpoint import read_trainer_state, save_training_checkpoint
from nemo_dpo.models.nlp.gpt.lora import has_lora
from nemo_dpo.parallel.collectives import barrier, is_rank0

log = logging.getLogger(__name__)
_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(:[^}]*)?\}")
FINAL_MODEL = "final_model"


def format_checkpoint_name(pattern: str, values: dict) -> str:
    """Lightning's naming: ``{val_loss:.3f}`` -> ``val_loss=0.693``; a missing value shows as nan."""

    def field(match: re.Match) -> str:
        name, spec = match.group(1), match.group(2) or ""
        if name not in values:
            return f"{name}=nan"
        return f"{name}={format(float(values[name]) if spec else values[name], spec[1:])}"

    return _FIELD.sub(field, pattern)


class CheckpointCallback:
    """Saves training checkpoints named by ``filename`` under ``dirpath`` and prunes them.

    After each save the ``save_top_k`` best checkpoints by ``monitor`` (``mode``
    ``min`` or ``max``) and the newest one are kept, the others deleted
    (``save_top_k: -1`` keeps all). With ``save_final_model`` the end of training
    also writes ``final_model/``, a weights-only model folder for export or
    ``pretrained_checkpoint.restore_from_path``.
    """

    def __init__(self, dirpath: str | Path, filename: str, model, optimizer, scheduler, model_cfg,
                 tokenizer_dir: str | Path, monitor: str = "val_loss", mode: str = "min",
                 save_top_k: int = -1, save_final_model: bool = True):
        if mode not in ("min", "max"):
            raise ValueError(f"checkpoint_callback_params.mode must be 'min' or 'max', got {mode!r}")
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.model_cfg = model_cfg
        self.tokenizer_dir = Path(tokenizer_dir)
        self.monitor, self.mode, self.save_top_k = monitor, mode, save_top_k
        self.save_final_model = save_final_model

    def custom_save(self, monitor_candidates: dict, is_train_end: bool = False) -> Path:
        """Save a training checkpoint named from ``monitor_candidates`` (collective)."""
        values = {key: float(value) for key, value in monitor_candidates.items()}
        for key in ("step", "consumed_samples", "epoch"):
            values[key] = int(values[key])
        folder = self.dirpath / format_checkpoint_name(self.filename, values)
        save_training_checkpoint(folder, self.model, self.optimizer, self.scheduler, values,
                                 self.model_cfg, self.tokenizer_dir)
        if is_rank0():
            self._prune(newest=folder)
        if is_train_end and self.save_final_model:
            if has_lora(self.model.model):  # the adapters and a reference to the base model
                save_adapters(self.model.model, self.model_cfg, self.tokenizer_dir, self.dirpath / FINAL_MODEL,
                              self.model.base_checkpoint)
            else:
                save_pretrained(self.model.model, self.model_cfg, self.tokenizer_dir, self.dirpath / FINAL_MODEL)
        barrier()
        return folder

    def _prune(self, newest: Path) -> None:
        if self.save_top_k < 0:
            return
        others = [f for f in self.dirpath.iterdir() if f != newest and (f / "trainer_state.json").is_file()]

        def rank(folder: Path):
            # Checkpoints without the monitored value (saved between validations) rank last.
            value = read_trainer_state(folder).get(self.monitor, math.nan)
            return (math.isnan(value), value if self.mode == "min" else -value)

        keep = set(sorted([*others, newest], key=rank)[: self.save_top_k]) | {newest}
        for folder in others:
            if folder not in keep:
                log.info("removing checkpoint %s (not among the best %d by %s)", folder, self.save_top_k, self.monitor)
                shutil.rmtree(folder)
