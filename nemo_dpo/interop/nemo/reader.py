"""The ``.nemo`` reader of :func:`nemo_dpo.interop.open_pretrained` (archives and unpacked folders)."""

from __future__ import annotations

from pathlib import Path

from nemo_dpo.data.tokenizer import stage_tokenizer_dir
from nemo_dpo.interop.nemo.archive import extract_nemo_archive, is_nemo_archive, is_nemo_folder, read_nemo_config
from nemo_dpo.interop.nemo.config import architecture_from_nemo_config
from nemo_dpo.interop.nemo.tokenizer import nemo_tokenizer_dir
from nemo_dpo.interop.nemo.weights import load_nemo_weights
from nemo_dpo.interop.source import PretrainedSource
from nemo_dpo.models.nlp.gpt.architecture import GPTArchitecture


class NemoReader:
    """A NeMo 1.0 ``.nemo`` archive of a megatron-core GPT, or its unpacked folder.

    Its vocabulary is the tokenizer's (``vocab_size`` is left to ``open_pretrained``).
    ``trust_pickled_objects``: unpickle torch weight files in full (they can
    run any code in them; only for files you trust); otherwise only tensors
    and transformer-engine extra state are read.
    """

    format = "nemo"

    def __init__(self, trust_pickled_objects: bool = False):
        self.trust_pickled_objects = trust_pickled_objects

    def matches(self, path: Path) -> bool:
        return is_nemo_archive(path) or is_nemo_folder(path)

    def open(self, path: Path, tokenizer_files: dict[str, Path] | None, extract_dir=None) -> PretrainedSource:
        folder = extract_nemo_archive(path, extract_dir) if path.is_file() else path
        config = read_nemo_config(folder)
        architecture = architecture_from_nemo_config(config)
        arch = GPTArchitecture.from_config(architecture)
        if tokenizer_files is not None:
            tokenizer_dir = stage_tokenizer_dir(tokenizer_files)
        else:
            tokenizer_dir = nemo_tokenizer_dir(folder, config)

        def load(model_chunks, vocab_size):
            load_nemo_weights(model_chunks, folder, arch, vocab_size, self.trust_pickled_objects)

        return PretrainedSource(path, self.format, architecture, None, tokenizer_dir, load)
