"""One entry point for every pretrained checkpoint a DPO run can start from.

:func:`open_pretrained` takes

* a nemo-dpo model folder (``model_config.yaml``, ``tokenizer/``, ``weights/``),
* a Hugging Face folder (``config.json``, ``*.safetensors`` with or without
  ``model.safetensors.index.json``, tokenizer files) of Llama, Mistral or Qwen2,
* a NeMo 1.0 ``.nemo`` archive of a megatron-core GPT, or its unpacked folder,

and returns a :class:`PretrainedSource`: the architecture read from the
checkpoint (our NeMo key names; it overrides the run config's, the role of NeMo
Aligner's ``load_and_override_model_config``), the vocabulary size to build
the model with, the tokenizer, and ``load_weights`` for model chunks of any
TP/PP layout::

    source = open_pretrained(path)
    model_cfg.merge_with(source.architecture)
    chunks = build_gpt_model(model_cfg, source.vocab_size)
    source.load_weights(chunks)
    tokenizer = source.load_tokenizer()
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nemo_dpo.checkpoint import hf, nemo_archive
from nemo_dpo.checkpoint.pretrained import load_pretrained_weights, read_model_config
from nemo_dpo.checkpoint.tokenizer_files import load_tokenizer_dir, stage_tokenizer_dir, tokenizer_files_in

FORMATS = ("nemo-dpo", "huggingface", "nemo")


@dataclass
class PretrainedSource:
    """A pretrained checkpoint, opened but not yet loaded.

    ``architecture``: model config keys (NeMo names) the checkpoint fixes.
    ``vocab_size``: rows of the embedding to build (the checkpoint's vocabulary,
    which may exceed the tokenizer's, as in Qwen2).
    ``tokenizer_dir``: a folder holding only tokenizer files (safe to copy into
    checkpoints); for Hugging Face sources it also keeps the source's
    ``config.json`` as ``hf_config.json`` and ``generation_config.json``, so an
    export after training writes the same model type and stop tokens.
    """

    path: Path
    format: str
    architecture: dict
    vocab_size: int
    tokenizer_dir: Path
    _load: Callable[[list], None] = field(repr=False)

    def load_tokenizer(self, **overrides: Any):
        """The tokenizer (``HFTokenizer`` interface; SentencePiece models are wrapped)."""
        return load_tokenizer_dir(self.tokenizer_dir, **overrides)

    def load_weights(self, model_chunks) -> None:
        """Fill ``model_chunks`` (this rank's, any TP/PP layout) with the checkpoint's weights.

        Collective: call on every rank. The chunks must come from
        ``build_gpt_model`` with ``architecture`` and ``vocab_size``; a tensor
        that is missing or of the wrong shape raises an error naming it.
        """
        self._load(model_chunks)


def detect_format(path: str | os.PathLike) -> str:
    """``nemo-dpo``, ``huggingface`` or ``nemo`` for a checkpoint path, or an error saying what is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pretrained checkpoint {path} does not exist")
    if path.is_file():
        if nemo_archive.is_nemo_archive(path):
            return "nemo"
        raise ValueError(f"{path} is a file but not a .nemo (tar) archive")
    if (path / "model_config.yaml").is_file() and (path / "weights").is_dir():
        return "nemo-dpo"
    if hf.is_hf_folder(path):
        return "huggingface"
    if nemo_archive.is_nemo_folder(path):
        return "nemo"
    raise ValueError(
        f"{path} is not a checkpoint nemo-dpo can read: expected a nemo-dpo model folder "
        "(model_config.yaml + weights/), a Hugging Face folder (config.json + *.safetensors), "
        "or a NeMo .nemo archive / unpacked folder (model_config.yaml + model_weights)"
    )


def open_pretrained(
    path: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    extract_dir: str | os.PathLike | None = None,
) -> PretrainedSource:
    """Open a pretrained checkpoint of any supported format (see the module docstring).

    ``tokenizer_path``: a folder with ``tokenizer.json`` or ``tokenizer.model`` to
    use instead of the checkpoint's (needed for ``.nemo`` files whose Hugging
    Face tokenizer was referenced by hub name). ``extract_dir``: where ``.nemo``
    archives are unpacked (default ``$NEMO_DPO_EXTRACT_DIR`` or the temp folder).
    Call on every rank: unpacking a ``.nemo`` archive synchronises the ranks.
    """
    path = Path(path)
    tokenizer_files = _tokenizer_override(Path(tokenizer_path)) if tokenizer_path is not None else None
    kind = detect_format(path)
    if kind == "nemo-dpo":
        source = _open_nemo_dpo(path, tokenizer_files)
    elif kind == "huggingface":
        source = _open_huggingface(path, tokenizer_files)
    else:
        source = _open_nemo(path, extract_dir, tokenizer_files)
    tokenizer_vocab = source.load_tokenizer().vocab_size
    if kind == "nemo" or (kind == "nemo-dpo" and source.vocab_size is None):
        source.vocab_size = tokenizer_vocab
    if tokenizer_vocab > source.vocab_size:
        raise ValueError(
            f"the tokenizer of {path} has {tokenizer_vocab} tokens, more than the model's "
            f"vocabulary ({source.vocab_size})"
        )
    return source


def _tokenizer_override(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer path {folder} is not a folder")
    return _tokenizer_files(folder)


def _tokenizer_files(folder: Path) -> dict[str, Path]:
    files = tokenizer_files_in(folder)
    if "tokenizer.json" not in files and "tokenizer.model" not in files:
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {folder}")
    return files


def _open_nemo_dpo(folder: Path, tokenizer_files: dict | None) -> PretrainedSource:
    architecture = read_model_config(folder)
    vocab_size = architecture.get("vocab_size")

    def load(model_chunks):
        nemo_archive.check_dist_checkpoint(model_chunks, folder / "weights", source.vocab_size)
        load_pretrained_weights(model_chunks, folder)

    tokenizer_dir = folder / "tokenizer"
    if tokenizer_files is not None:
        # Keep what the folder knows about its HF origin (config template for export).
        kept = {name: tokenizer_dir / name for name in (hf.SOURCE_CONFIG_NAME,) if (tokenizer_dir / name).is_file()}
        tokenizer_dir = stage_tokenizer_dir({**kept, **tokenizer_files})
    source = PretrainedSource(folder, "nemo-dpo", architecture, vocab_size, tokenizer_dir, load)
    return source


def _open_huggingface(folder: Path, tokenizer_files: dict | None) -> PretrainedSource:
    config = hf.read_hf_config(folder)
    architecture = hf.architecture_from_hf_config(config)
    vocab_size = int(config["vocab_size"])
    hf.check_hf_weights(folder, architecture, vocab_size)
    files = _tokenizer_files(folder) if tokenizer_files is None else tokenizer_files
    generation = {"generation_config.json": folder / "generation_config.json"}
    if "generation_config.json" in files or not generation["generation_config.json"].is_file():
        generation = {}
    tokenizer_dir = stage_tokenizer_dir({**generation, **files, hf.SOURCE_CONFIG_NAME: folder / "config.json"})

    def load(model_chunks):
        hf.load_hf_weights(model_chunks, folder, architecture, vocab_size)

    return PretrainedSource(folder, "huggingface", architecture, vocab_size, tokenizer_dir, load)


def _open_nemo(path: Path, extract_dir, tokenizer_files: dict | None) -> PretrainedSource:
    folder = nemo_archive.extract_nemo_archive(path, extract_dir) if path.is_file() else path
    config = nemo_archive.read_nemo_config(folder)
    architecture = nemo_archive.architecture_from_nemo_config(config)
    if tokenizer_files is not None:
        tokenizer_dir = stage_tokenizer_dir(tokenizer_files)
    else:
        tokenizer_dir = nemo_archive.nemo_tokenizer_dir(folder, config)
    source = PretrainedSource(path, "nemo", architecture, None, tokenizer_dir, None)

    def load(model_chunks):
        nemo_archive.load_nemo_weights(model_chunks, folder, architecture, source.vocab_size)

    source._load = load
    return source
