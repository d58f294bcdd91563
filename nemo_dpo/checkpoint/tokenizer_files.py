"""Tokenizer folders of imported checkpoints.

A checkpoint's tokenizer is handed to training as a folder holding only
tokenizer files (checkpoints copy that folder whole, so it must not be a
model folder full of weights). Two kinds are read:

* ``tokenizer.json`` (Hugging Face ``tokenizers``), with ``tokenizer_config.json``;
* ``tokenizer.model`` alone (SentencePiece, as in NeMo 1.0 ``.nemo`` archives and
  older Llama 2 folders), behind the same :class:`~nemo_dpo.data.tokenizer.HFTokenizer`
  interface, so chat templates in ``tokenizer_config.json`` still apply.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from nemo_dpo.data.tokenizer import HFTokenizer, load_tokenizer

# Files that travel with the tokenizer: how to tokenize, and how to generate
# (generation_config.json holds the stop tokens a server uses).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)

_STAGED: list[str] = []


def _remove_staged() -> None:
    for folder in _STAGED:
        shutil.rmtree(folder, ignore_errors=True)


def stage_tokenizer_dir(files: dict[str, Path | str]) -> Path:
    """A fresh folder (removed at exit) holding ``files``: name in folder -> source file or text.

    ``Path`` values are copied; ``str`` values are written as text.
    """
    if not _STAGED:
        atexit.register(_remove_staged)
    folder = Path(tempfile.mkdtemp(prefix="nemo_dpo_tokenizer_"))
    _STAGED.append(str(folder))
    for name, source in files.items():
        if isinstance(source, Path):
            shutil.copy2(source, folder / name)
        else:
            (folder / name).write_text(source, encoding="utf-8")
    return folder


def tokenizer_files_in(folder: Path) -> dict[str, Path]:
    """The tokenizer files present in ``folder``, by name."""
    return {name: folder / name for name in TOKENIZER_FILES if (folder / name).is_file()}


class _SentencePieceBackend:
    """The part of ``tokenizers.Tokenizer``'s interface that HFTokenizer uses, over SentencePiece."""

    def __init__(self, model_file: Path):
        try:
            import sentencepiece
        except ImportError as err:
            raise ImportError(
                f"{model_file} is a SentencePiece model: `pip install sentencepiece` to read it"
            ) from err
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))

    def no_truncation(self) -> None:
        pass

    def no_padding(self) -> None:
        pass

    def encode(self, text: str, add_special_tokens: bool = True) -> Any:
        # SentencePiece adds no BOS/EOS by itself, which is what text_to_ids wants.
        return SimpleNamespace(ids=self.processor.encode(text))

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list:
        return [SimpleNamespace(ids=ids) for ids in self.processor.encode(list(texts))]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.processor.decode(list(ids))

    def token_to_id(self, token: str) -> int | None:
        token_id = self.processor.piece_to_id(token)
        return token_id if self.processor.id_to_piece(token_id) == token else None

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self.processor.get_piece_size()

    def special_piece(self, token_id: int) -> str | None:
        return self.processor.id_to_piece(token_id) if token_id >= 0 else None


def load_tokenizer_dir(folder: str | os.PathLike, **overrides: Any) -> HFTokenizer:
    """The tokenizer of a tokenizer folder: ``tokenizer.json``, else ``tokenizer.model``."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return load_tokenizer(folder, **overrides)
    model_file = folder / "tokenizer.model"
    if not model_file.is_file():
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {folder}")
    config: dict = {}
    if (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    if "chat_template" not in config and (folder / "chat_template.jinja").is_file():
        config["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    backend = _SentencePieceBackend(model_file)
    processor = backend.processor
    defaults = {
        "bos_token": backend.special_piece(processor.bos_id()),
        "eos_token": backend.special_piece(processor.eos_id()),
        "pad_token": backend.special_piece(processor.pad_id()),
    }
    for key, value in defaults.items():
        if value is not None and config.get(key) is None:
            config[key] = value
    return HFTokenizer(backend, config, **overrides)
