"""The nemo-dpo model folder reader of :func:`nemo_dpo.interop.open_pretrained`."""

from __future__ import annotations

from pathlib import Path

from nemo_dpo.checkpoint.pretrained import (
    MODEL_CONFIG,
    WEIGHTS_DIR,
    check_model_folder,
    load_pretrained_weights,
    read_model_config,
)
from nemo_dpo.checkpoint.safe_load import check_dist_checkpoint_files
from nemo_dpo.data.tokenizer import stage_tokenizer_dir
from nemo_dpo.interop.hf.config import SOURCE_CONFIG_NAME
from nemo_dpo.interop.shape_check import check_dist_checkpoint
from nemo_dpo.interop.source import PretrainedSource


class ModelFolderReader:
    """A folder written by :func:`nemo_dpo.checkpoint.pretrained.save_pretrained` (or a training checkpoint)."""

    format = "nemo-dpo"

    def matches(self, path: Path) -> bool:
        return (path / MODEL_CONFIG).is_file() and (path / WEIGHTS_DIR).is_dir()

    def open(self, path: Path, tokenizer_files: dict[str, Path] | None, extract_dir=None) -> PretrainedSource:
        # Collective like open_pretrained itself: rank 0 checks the files, every rank hears the verdict.
        check_model_folder(path)
        architecture = read_model_config(path)
        tokenizer_dir = path / "tokenizer"
        if tokenizer_files is not None:
            # Keep what the folder knows about its HF origin (config template for export).
            kept = {name: tokenizer_dir / name for name in (SOURCE_CONFIG_NAME,) if (tokenizer_dir / name).is_file()}
            tokenizer_dir = stage_tokenizer_dir({**kept, **tokenizer_files})

        def load(model_chunks, vocab_size):
            check_dist_checkpoint_files(path / WEIGHTS_DIR)
            check_dist_checkpoint(model_chunks, path / WEIGHTS_DIR, vocab_size)
            load_pretrained_weights(model_chunks, path)

        return PretrainedSource(path, self.format, architecture, architecture.get("vocab_size"), tokenizer_dir, load)
