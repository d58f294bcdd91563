"""One entry point for every pretrained checkpoint a DPO run can start from.

:func:`open_pretrained` takes

* a nemo-dpo model folder (``model_config.yaml``, ``tokenizer/``, ``weights/``),
* a Hugging Face folder (``config.json``, ``*.safetensors`` with or without
  ``model.safetensors.index.json``, tokenizer files) of a family in
  :data:`nemo_dpo.interop.hf.FAMILIES` (Llama, Mistral, Qwen2, Qwen3),
* a NeMo 1.0 ``.nemo`` archive of a megatron-core GPT, or its unpacked folder,

and returns a :class:`~nemo_dpo.interop.source.PretrainedSource`: the
architecture read from the checkpoint (our NeMo key names; it overrides the run
config's, the role of NeMo Aligner's ``load_and_override_model_config``), the
vocabulary size to build the model with, the tokenizer, and ``load_weights``
for model chunks of any TP/PP layout::

    source = open_pretrained(path)
    model_cfg.merge_with(source.architecture)
    chunks = build_gpt_model(model_cfg, source.vocab_size)
    source.load_weights(chunks)
    tokenizer = source.load_tokenizer()

Each format is a reader (:class:`~nemo_dpo.interop.source.PretrainedReader`);
a new format is one more entry in :data:`READERS`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from nemo_dpo.interop.hf.reader import HuggingFaceReader
from nemo_dpo.interop.model_folder_reader import ModelFolderReader
from nemo_dpo.interop.nemo.reader import NemoReader
from nemo_dpo.interop.source import PretrainedReader, PretrainedSource, tokenizer_files_of

# First match wins: a nemo-dpo folder may also look like an unpacked .nemo.
READERS: tuple[PretrainedReader, ...] = (ModelFolderReader(), HuggingFaceReader(), NemoReader())


def find_reader(path: Path) -> PretrainedReader:
    """The reader for ``path``, or an error saying what a checkpoint needs."""
    if not path.exists():
        raise FileNotFoundError(f"pretrained checkpoint {path} does not exist")
    for reader in READERS:
        if reader.matches(path):
            return reader
    if path.is_file():
        raise ValueError(f"{path} is a file but not a .nemo (tar) archive")
    raise ValueError(
        f"{path} is not a checkpoint nemo-dpo can read: expected a nemo-dpo model folder "
        "(model_config.yaml + weights/), a Hugging Face folder (config.json + *.safetensors), "
        "or a NeMo .nemo archive / unpacked folder (model_config.yaml + model_weights)"
    )


def open_pretrained(
    path: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    extract_dir: str | os.PathLike | None = None,
    trust_pickled_objects: bool = False,
) -> PretrainedSource:
    """Open a pretrained checkpoint of any supported format (see the module docstring).

    ``tokenizer_path``: a folder with ``tokenizer.json`` or ``tokenizer.model`` to
    use instead of the checkpoint's (needed for ``.nemo`` files whose Hugging
    Face tokenizer was referenced by hub name). ``extract_dir``: where ``.nemo``
    archives are unpacked (default ``$NEMO_DPO_EXTRACT_DIR`` or the temp folder).
    ``trust_pickled_objects``: let ``.nemo`` torch weight files unpickle any
    object; unpickling a file can run any code in it, so only for files you
    trust (by default anything but tensors is refused, naming the file).
    Call on every rank: unpacking a ``.nemo`` archive synchronises the ranks,
    and a nemo-dpo folder is checked against its manifest on rank 0.
    """
    path = Path(path)
    tokenizer_files = None
    if tokenizer_path is not None:
        if not Path(tokenizer_path).is_dir():
            raise FileNotFoundError(f"tokenizer path {tokenizer_path} is not a folder")
        tokenizer_files = tokenizer_files_of(Path(tokenizer_path))
    reader = find_reader(path)
    if trust_pickled_objects and isinstance(reader, NemoReader):
        # Only .nemo torch files hold pickles; the other formats have nothing to trust.
        reader = NemoReader(trust_pickled_objects=True)
    source = reader.open(path, tokenizer_files, extract_dir)
    tokenizer_vocab = source.load_tokenizer().vocab_size
    if source.vocab_size is None:
        source = dataclasses.replace(source, vocab_size=tokenizer_vocab)
    if tokenizer_vocab > source.vocab_size:
        raise ValueError(
            f"the tokenizer of {path} has {tokenizer_vocab} tokens, more than the model's "
            f"vocabulary ({source.vocab_size})"
        )
    return source
