"""The Hugging Face folder reader of :func:`nemo_dpo.interop.open_pretrained`."""

from __future__ import annotations

from pathlib import Path

from nemo_dpo.data.tokenizer import stage_tokenizer_dir
from nemo_dpo.interop.hf.config import SOURCE_CONFIG_NAME, architecture_from_hf_config, read_hf_config
from nemo_dpo.interop.hf.safetensors_reader import check_hf_weights, load_hf_weights
from nemo_dpo.interop.source import PretrainedSource, tokenizer_files_of
from nemo_dpo.models.nlp.gpt.architecture import GPTArchitecture


class HuggingFaceReader:
    """``config.json`` + ``*.safetensors`` (with or without an index) + tokenizer files."""

    format = "huggingface"

    def matches(self, path: Path) -> bool:
        return path.is_dir() and (path / "config.json").is_file()

    def open(self, path: Path, tokenizer_files: dict[str, Path] | None, extract_dir=None) -> PretrainedSource:
        config = read_hf_config(path)
        architecture = architecture_from_hf_config(config)
        arch = GPTArchitecture.from_config(architecture)
        vocab_size = int(config["vocab_size"])
        check_hf_weights(path, arch, vocab_size)
        files = tokenizer_files_of(path) if tokenizer_files is None else tokenizer_files
        generation = {"generation_config.json": path / "generation_config.json"}
        if "generation_config.json" in files or not generation["generation_config.json"].is_file():
            generation = {}
        tokenizer_dir = stage_tokenizer_dir({**generation, **files, SOURCE_CONFIG_NAME: path / "config.json"})

        def load(model_chunks, vocab_size):
            load_hf_weights(model_chunks, path, arch, vocab_size)

        return PretrainedSource(path, self.format, architecture, vocab_size, tokenizer_dir, load)
