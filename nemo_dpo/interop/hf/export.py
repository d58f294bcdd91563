"""Writing model chunks of any TP/PP layout as a Hugging Face folder.

Full tensors are gathered to rank 0 one at a time and written, without the
vocab padding, as ``*.safetensors`` shards that
``transformers.AutoModelForCausalLM.from_pretrained`` loads, with ``config.json``
and the tokenizer files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from nemo_dpo.data.tokenizer import TOKENIZER_FILES, load_tokenizer
from nemo_dpo.interop.hf.config import SOURCE_CONFIG_NAME, hf_config_from_architecture
from nemo_dpo.interop.hf.families import family_for_architecture
from nemo_dpo.interop.hf.safetensors_reader import SAFETENSORS_INDEX
from nemo_dpo.interop.hf.tensor_map import HFTensorMap
from nemo_dpo.interop.weight_transfer import gather_full_tensors, global_tensor_shapes
from nemo_dpo.models.nlp.gpt.architecture import GPTArchitecture
from nemo_dpo.parallel.collectives import barrier, is_rank0, raise_on_every_rank

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


class _ShardWriter:
    """Accumulates tensors into safetensors files of at most ``max_bytes`` each."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.files: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.max_bytes:
            self._flush()
        self.current[name] = tensor
        self.current_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f"part-{len(self.files):05d}.safetensors"
        save_file(self.current, str(path), metadata={"format": "pt"})
        # safetensors creates its files 0600; an exported model is shared like any other file.
        os.chmod(path, 0o666 & ~current_umask())
        self.files.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> None:
        if self.current or not self.files:
            self._flush()
        count = len(self.files)
        if count == 1:
            os.replace(self.folder / "part-00000.safetensors", self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / f"part-{i:05d}.safetensors", self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def current_umask() -> int:
    # The only portable way to read the umask is to set it; put it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _special_token_ids(tokenizer_dir: Path | None) -> dict:
    if tokenizer_dir is None:
        return {}
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except FileNotFoundError:
        return {}
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    return {key: value for key, value in ids.items() if value is not None}


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    """Copy the tokenizer (and generation) files of ``source`` into ``destination`` (modes follow the umask)."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, destination / name)
            copied.append(name)
    return copied


def export_hf(
    model_chunks,
    architecture: dict,
    vocab_size: int,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write the model as a Hugging Face folder (collective: call on every rank).

    Works from any TP/PP layout: pieces are gathered to rank 0 one tensor at a
    time. ``vocab_size`` is the real vocabulary (padding rows are dropped);
    ``dtype`` defaults to that of most of the model's weights. Tokenizer and generation files in
    ``tokenizer_dir`` are copied; an ``hf_config.json`` there (the imported
    model's config.json) is the template of the new ``config.json``. The folder
    appears complete or not at all (written under ``<out_dir>.tmp``, renamed).
    """
    out = Path(out_dir)
    rank0 = is_rank0()
    # Everything that can be refused is refused on every rank, before any tensor moves.
    arch = GPTArchitecture.from_config(architecture)
    family_for_architecture(arch)
    tensor_map = HFTensorMap(arch, vocab_size)
    for (key, layer), shape in global_tensor_shapes(model_chunks).items():
        tensor_map.check_model_tensor(key, layer, shape)
    staging = out.with_name(out.name + ".tmp")
    # One dtype for the whole file: the requested one, else that of most weights (norms may be fp32).
    dtypes = [p.dtype for chunk in model_chunks for p in chunk.parameters()]
    target_dtype = dtype or max(set(dtypes), key=dtypes.count)
    tokenizer_path = Path(tokenizer_dir) if tokenizer_dir is not None else None
    error, config = None, None
    if rank0:
        try:
            template = None
            if tokenizer_path is not None and (tokenizer_path / SOURCE_CONFIG_NAME).is_file():
                template = json.loads((tokenizer_path / SOURCE_CONFIG_NAME).read_text(encoding="utf-8"))
            config = hf_config_from_architecture(
                architecture, vocab_size, target_dtype, template, _special_token_ids(tokenizer_path)
            )
            if out.exists() and not overwrite:
                raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        except (OSError, ValueError) as err:
            error = err
    raise_on_every_rank(error)
    writer = _ShardWriter(staging, max_shard_bytes) if rank0 else None
    for key, layer, full in gather_full_tensors(model_chunks):
        for name, tensor in tensor_map.to_hf(key, layer, full).items():
            writer.add(name, tensor.to(target_dtype))
    if rank0:
        writer.finish()
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if tokenizer_path is not None:
            copy_tokenizer_files(tokenizer_path, staging)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    barrier()
    return out
