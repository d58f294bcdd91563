"""What every checkpoint reader hands back (:class:`PretrainedSource`) and the reader interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from nemo_dpo.data.tokenizer import load_tokenizer, tokenizer_files_in


@dataclass
class PretrainedSource:
    """A pretrained checkpoint, opened but not yet loaded.

    ``architecture``: model config keys (NeMo names) the checkpoint fixes.
    ``vocab_size``: rows of the embedding to build (the checkpoint's vocabulary,
    which may exceed the tokenizer's, as in Qwen2); ``None`` until
    :func:`~nemo_dpo.interop.open_pretrained` sets it for formats that take the
    tokenizer's. ``tokenizer_dir``: a folder holding only tokenizer files (safe
    to copy into checkpoints); for Hugging Face sources it also keeps the
    source's ``config.json`` as ``hf_config.json`` and ``generation_config.json``,
    so an export after training writes the same model type and stop tokens.
    ``loader(model_chunks, vocab_size)`` fills model chunks with the weights.
    """

    path: Path
    format: str
    architecture: dict
    vocab_size: int | None
    tokenizer_dir: Path
    loader: Callable[[list, int], None] = field(repr=False)

    def load_tokenizer(self, **overrides: Any):
        """The tokenizer (``HFTokenizer`` interface; SentencePiece models are wrapped)."""
        return load_tokenizer(self.tokenizer_dir, **overrides)

    def load_weights(self, model_chunks) -> None:
        """Fill ``model_chunks`` (this rank's, any TP/PP layout) with the checkpoint's weights.

        Collective: call on every rank. The chunks must come from
        ``build_gpt_model`` with ``architecture`` and ``vocab_size``; a tensor
        that is missing or of the wrong shape raises an error naming it.
        """
        self.loader(model_chunks, self.vocab_size)


class PretrainedReader(Protocol):
    """One checkpoint format: recognise its paths, open them."""

    format: str

    def matches(self, path: Path) -> bool:
        """Whether ``path`` (which exists) is a checkpoint of this format."""

    def open(self, path: Path, tokenizer_files: dict[str, Path] | None, extract_dir) -> PretrainedSource:
        """The source at ``path``; ``tokenizer_files`` (name -> file) replace the checkpoint's tokenizer."""


def tokenizer_files_of(folder: Path) -> dict[str, Path]:
    """The tokenizer files of ``folder``, which must hold a ``tokenizer.json`` or ``tokenizer.model``."""
    files = tokenizer_files_in(folder)
    if "tokenizer.json" not in files and "tokenizer.model" not in files:
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {folder}")
    return files
