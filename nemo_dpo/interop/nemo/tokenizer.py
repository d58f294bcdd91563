"""The tokenizer of a ``.nemo``, from its config's ``tokenizer`` section, as a tokenizer folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig

from nemo_dpo.data.tokenizer import stage_tokenizer_dir, tokenizer_files_in
from nemo_dpo.interop.nemo.archive import CONFIG_NAME
from nemo_dpo.interop.nemo.config import config_value



def _artifact(folder: Path, value) -> Path | None:
    """A tokenizer file named in the config: ``nemo:<name>`` inside the archive, or a path."""
    if not value:
        return None
    value = str(value)
    if value.startswith("nemo:"):
        candidate = folder / value[len("nemo:"):]
        return candidate if candidate.exists() else None
    for candidate in (Path(value), folder / Path(value).name):
        if candidate.exists():
            return candidate
    return None


def nemo_tokenizer_dir(folder: str | os.PathLike, config: DictConfig) -> Path:
    """A folder with the checkpoint's tokenizer files, from the config's ``tokenizer`` section."""
    folder = Path(folder)
    section = config_value(config, "tokenizer", {}) or {}
    library = config_value(section, "library") if section else None
    chat_template = config_value(section, "chat_template") if section else None
    extra = {}
    if chat_template:
        extra["tokenizer_config.json"] = json.dumps({"chat_template": str(chat_template)})
    if library == "sentencepiece" or (
        library == "megatron" and config_value(section, "type") == "GPTSentencePieceTokenizer"
    ):
        model = _artifact(folder, config_value(section, "model"))
        if model is None or not model.is_file():
            raise FileNotFoundError(
                f"the SentencePiece model {config_value(section, 'model')!r} named in {CONFIG_NAME} is not in {folder}"
            )
        if config_value(section, "special_tokens") or config_value(section, "additional_special_tokens"):
            raise ValueError("SentencePiece tokenizers with added special_tokens are not supported")
        return stage_tokenizer_dir({"tokenizer.model": model, **extra})
    if library == "huggingface":
        for value in (config_value(section, "model"), config_value(section, "type")):
            location = _artifact(folder, value)
            if location is not None and location.is_dir() and (location / "tokenizer.json").is_file():
                return stage_tokenizer_dir({**tokenizer_files_in(location), **extra})
            if location is not None and location.name == "tokenizer.json":
                return stage_tokenizer_dir({"tokenizer.json": location, **extra})
        if (folder / "tokenizer.json").is_file():
            return stage_tokenizer_dir({**tokenizer_files_in(folder), **extra})
        raise FileNotFoundError(
            f"the Hugging Face tokenizer {config_value(section, 'type')!r} of this .nemo is not inside it; "
            "pass the folder of its tokenizer.json (model.tokenizer.path / tokenizer_path)"
        )
    raise ValueError(
        f"tokenizer library {library!r} of this .nemo is not supported (supported: sentencepiece, "
        "huggingface); pass a tokenizer folder (model.tokenizer.path / tokenizer_path)"
    )
