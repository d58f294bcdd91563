"""Tokenizers and tokenizer folders, behind the small interface the data pipeline uses.

A tokenizer is a folder holding only tokenizer files (checkpoints copy it whole):
``tokenizer.json`` (Hugging Face ``tokenizers``; ``transformers`` is not
needed) with ``tokenizer_config.json``, or a SentencePiece ``tokenizer.model``
(see :mod:`nemo_dpo.data.sentencepiece_backend`). Chat templates are rendered
with jinja2, the engine Hugging Face uses for them, with the same environment
options so a model's template gives the same text.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from tokenizers import Tokenizer

from nemo_dpo.data.sentencepiece_backend import SentencePieceBackend
from nemo_dpo.parallel.processes import sweep_dead_staging

__all__ = [
    "HFTokenizer", "TOKENIZER_FILES", "load_tokenizer", "stage_tokenizer_dir", "sweep_stale_tokenizer_dirs",
    "tokenizer_files_in",
]

# Files that travel with the tokenizer: how to tokenize, and how to generate
# (generation_config.json holds the stop tokens a server uses).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def _token_content(token: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as plain strings or as
    # serialised AddedToken dicts ({"content": ..., "lstrip": ...}).
    if isinstance(token, dict):
        return token.get("content")
    return token


class HFTokenizer:
    """Wraps a ``tokenizers.Tokenizer`` with NeMo's ``text_to_ids``/``ids_to_text`` interface.

    ``bos_token``/``eos_token``/``pad_token``/``chat_template`` given here override
    those from ``config`` (the parsed ``tokenizer_config.json``). ``pad_id`` falls back
    to ``eos_id``: the DPO collate pads with eos, as NeMo Aligner does.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        config: dict | None = None,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
    ):
        config = config or {}
        self.tokenizer = tokenizer
        # A tokenizer.json may carry its own truncation/padding settings; either
        # would silently change lengths behind the dataset's back.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.bos_token = bos_token or _token_content(config.get("bos_token"))
        self.eos_token = eos_token or _token_content(config.get("eos_token"))
        self.pad_token = pad_token or _token_content(config.get("pad_token"))
        self.chat_template = chat_template or _select_template(config.get("chat_template"))
        self.bos_id = self._special_id(self.bos_token, "bos_token")
        self.eos_id = self._special_id(self.eos_token, "eos_token")
        pad_id = self._special_id(self.pad_token, "pad_token")
        self.pad_id = self.eos_id if pad_id is None else pad_id
        # What characters it cannot represent become; None for byte-level models, which need none.
        unk_token = getattr(getattr(tokenizer, "model", None), "unk_token", None)
        self.unk_id = None if unk_token is None else tokenizer.token_to_id(unk_token)
        self._template = None

    def _special_id(self, token: str | None, what: str) -> int | None:
        if token is None:
            return None
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{what} {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def text_to_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without post-processor specials (no BOS/EOS added), like NeMo."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def batch_text_to_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """``text_to_ids`` over many texts at once (the Rust side runs them in parallel)."""
        return [enc.ids for enc in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def ids_to_text(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False, **kwargs: Any
    ) -> str:
        """Render OpenAI-style ``[{"role": ..., "content": ...}]`` messages with the chat template."""
        if not self.chat_template:
            raise ValueError(
                "this tokenizer has no chat template: add 'chat_template' to tokenizer_config.json "
                "(or pass chat_template=...), or give prompts as already formatted strings"
            )
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
            **kwargs,
        )

    def __getstate__(self):
        # Compiled jinja templates do not pickle (DataLoader workers); recompile lazily.
        return {**self.__dict__, "_template": None}


def _select_template(template: Any) -> str | None:
    # Newer configs may hold several named templates; the "default" one is the chat template.
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        return named.get("default")
    return template


def _compile_template(source: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template error: {message}")

    # Same options as transformers: templates are written against them.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _read_tokenizer_config(folder: Path) -> dict:
    config: dict = {}
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
    template_file = folder / "chat_template.jinja"
    if "chat_template" not in config and template_file.is_file():
        config["chat_template"] = template_file.read_text(encoding="utf-8")
    return config


def load_tokenizer(path: str | Path, **overrides: Any) -> HFTokenizer:
    """Load a ``tokenizer.json`` file, or a tokenizer folder (``tokenizer.json``, else ``tokenizer.model``).

    In a folder, ``tokenizer_config.json`` (special tokens, chat template) and a
    ``chat_template.jinja`` file are read when present. ``overrides`` go to :class:`HFTokenizer`.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    tokenizer_file = folder / "tokenizer.json" if path.is_dir() else path
    config = _read_tokenizer_config(folder)
    if tokenizer_file.is_file():
        return HFTokenizer(Tokenizer.from_file(str(tokenizer_file)), config, **overrides)
    if path.is_dir() and (folder / "tokenizer.model").is_file():
        backend = SentencePieceBackend(folder / "tokenizer.model")
        for key, token in backend.special_tokens().items():
            if config.get(key) is None:
                config[key] = token
        return HFTokenizer(backend, config, **overrides)
    raise FileNotFoundError(f"no tokenizer file at {tokenizer_file} (nor a tokenizer.model beside it)")


def tokenizer_files_in(folder: Path) -> dict[str, Path]:
    """The tokenizer files present in ``folder``, by name."""
    return {name: folder / name for name in TOKENIZER_FILES if (folder / name).is_file()}


_STAGED: list[str] = []
# Staging folders are named <prefix><pid>_<random>: a later process can tell
# those of killed runs (atexit never ran) from those of live ones.
_STAGING_PREFIX = "nemo_dpo_tokenizer_"


def _remove_staged() -> None:
    for folder in _STAGED:
        shutil.rmtree(folder, ignore_errors=True)


def sweep_stale_tokenizer_dirs() -> list[Path]:
    """Remove the staged tokenizer folders of processes that have ended (killed, so no atexit ran)."""
    return sweep_dead_staging(Path(tempfile.gettempdir()), _STAGING_PREFIX, "_")


def _new_staging_folder() -> Path:
    base = Path(tempfile.gettempdir())
    sweep_stale_tokenizer_dirs()
    while True:
        folder = base / f"{_STAGING_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
        try:
            folder.mkdir()  # the user's umask decides the mode (mkdtemp would force 0700)
        except FileExistsError:
            continue
        return folder


def stage_tokenizer_dir(files: dict[str, Path | str]) -> Path:
    """A fresh tokenizer folder (removed at exit) holding ``files``: name in folder -> source file or text.

    ``Path`` values are copied; ``str`` values are written as text. Folders left
    by processes that have ended (killed runs) are removed first.
    """
    if not _STAGED:
        atexit.register(_remove_staged)
    folder = _new_staging_folder()
    _STAGED.append(str(folder))
    for name, source in files.items():
        if isinstance(source, Path):
            shutil.copyfile(source, folder / name)  # contents only: modes follow the umask
        else:
            (folder / name).write_text(source, encoding="utf-8")
    return folder
