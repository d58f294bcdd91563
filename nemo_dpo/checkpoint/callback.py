"""The ``ckpt_callback`` DPOTrainer saves through: one model folder per checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

from nemo_dpo.checkpoint.pretrained import save_pretrained

_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(:[^}]*)?\}")


def format_checkpoint_name(pattern: str, values: dict) -> str:
    """Lightning's naming: ``{val_loss:.3f}`` -> ``val_loss=0.693``; a missing value is left out."""

    def field(match: re.Match) -> str:
        name, spec = match.group(1), match.group(2) or ""
        if name not in values:
            return f"{name}=nan"
        return f"{name}={format(float(values[name]) if spec else values[name], spec[1:])}"

    return _FIELD.sub(field, pattern)


class CheckpointCallback:
    """Saves the policy as a nemo-dpo model folder named by ``filename`` under ``dirpath``.

    Each folder holds the architecture, tokenizer, reshardable weights and
    ``trainer_state.json`` (step, consumed samples, epoch and the metrics at save
    time); it is written atomically and can be passed back as
    ``pretrained_checkpoint.restore_from_path``.
    """

    def __init__(self, dirpath: str | Path, filename: str, model, model_cfg, tokenizer_dir: str | Path):
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.model = model
        self.model_cfg = model_cfg
        self.tokenizer_dir = Path(tokenizer_dir)
        self.saved: list[Path] = []

    def custom_save(self, monitor_candidates: dict, is_train_end: bool = False) -> Path:
        values = {key: float(value) if hasattr(value, "__float__") else value
                  for key, value in monitor_candidates.items()}
        name = format_checkpoint_name(self.filename, values)
        if is_train_end:
            name += "-last"
        state = json.dumps({"is_train_end": is_train_end, **values}, indent=2, sort_keys=True)
        folder = save_pretrained(self.model.model, self.model_cfg, self.tokenizer_dir, self.dirpath / name,
                                 extra_files={"trainer_state.json": state + "\n"})
        self.saved.append(folder)
        return folder
