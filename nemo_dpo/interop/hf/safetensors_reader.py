"""Reading ``*.safetensors`` Hugging Face weights into model chunks of any TP/PP layout.

Each rank reads, through ``safetensors.safe_open`` slices, only the rows and
columns it keeps; headers are checked against the architecture first, so every
rank fails alike on a missing or misshapen tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from nemo_dpo.interop.hf.tensor_map import HFTensorMap
from nemo_dpo.interop.weight_transfer import fill_from, global_tensor_shapes
from nemo_dpo.models.nlp.gpt.architecture import GPTArchitecture
from nemo_dpo.parallel.collectives import barrier

SAFETENSORS_INDEX = "model.safetensors.index.json"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class SafetensorsFolder:
    """The tensors of a folder of ``*.safetensors`` files (with or without an index), read lazily."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{index} lists weight files that are missing from {self.folder}: {', '.join(missing)}"
                )
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                others = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(
                    p.name for p in self.folder.glob("*.pt*"))
                hint = f" (found {', '.join(others)}: only safetensors weights are read)" if others else ""
                raise FileNotFoundError(f"no *.safetensors weight files in {self.folder}{hint}")
            weight_map = None
        self._handles: dict[str, object] = {}
        self.file_of: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            handle = self._open(file)
            for name in handle.keys():
                if weight_map is not None and weight_map.get(name) != file:
                    continue
                self.file_of[name] = file
                self.shapes[name] = tuple(handle.get_slice(name).get_shape())
        if weight_map is not None:
            absent = [name for name, file in weight_map.items() if name not in self.file_of]
            if absent:
                raise FileNotFoundError(
                    f"{SAFETENSORS_INDEX} places {len(absent)} tensors in files that do not hold them, "
                    f"e.g. {absent[0]} in {weight_map[absent[0]]}"
                )

    def _open(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.folder / file), framework="pt")
        return self._handles[file]

    def read_rows(self, name: str, start: int, stop: int, columns: tuple[slice, ...]) -> torch.Tensor:
        return self._open(self.file_of[name]).get_slice(name)[(slice(start, stop), *columns)]

    def close(self) -> None:
        self._handles.clear()

    def check_against(self, expected: dict[str, tuple[int, ...]], config_note: str) -> None:
        """Raise on a missing, misshapen or unexpected tensor, naming it."""
        missing = [name for name in expected if name not in self.shapes]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ValueError(
                f"{self.folder} lacks weights that {config_note} calls for: {', '.join(missing[:3])}{more}"
            )
        for name, shape in expected.items():
            if self.shapes[name] != shape:
                raise ValueError(
                    f"tensor {name} in {self.file_of[name]} has shape {list(self.shapes[name])}, but "
                    f"{config_note} implies {list(shape)}"
                )
        unexpected = [
            name for name in self.shapes
            if name not in expected and not name.endswith(_IGNORED_SUFFIXES) and name != "lm_head.weight"
        ]
        if unexpected:
            raise ValueError(
                f"{self.folder} holds tensors that {config_note} does not describe, e.g. "
                f"{', '.join(sorted(unexpected)[:3])}: the weights do not match the config"
            )


def check_hf_weights(folder: str | os.PathLike, architecture: GPTArchitecture, vocab_size: int) -> None:
    """Raise on a missing weight file, or a missing, misshapen or unexpected tensor (reads headers only)."""
    files = SafetensorsFolder(folder)
    try:
        files.check_against(HFTensorMap(architecture, vocab_size).hf_shapes, str(Path(folder) / "config.json"))
    finally:
        files.close()


def load_hf_weights(model_chunks, folder: str | os.PathLike, architecture: GPTArchitecture, vocab_size: int) -> None:
    """Fill chunks of any TP/PP layout from an HF safetensors folder (call on every rank).

    Every rank first checks the whole model and all file headers against the
    architecture (so all ranks fail alike), then reads only the slices it keeps.
    """
    tensor_map = HFTensorMap(architecture, vocab_size)
    for (key, layer), shape in global_tensor_shapes(model_chunks).items():
        tensor_map.check_model_tensor(key, layer, shape)
    files = SafetensorsFolder(folder)
    try:
        files.check_against(tensor_map.hf_shapes, str(Path(folder) / "config.json"))
        fill_from(model_chunks, lambda slot: tensor_map.read_piece(slot, files.read_rows))
    finally:
        files.close()
    barrier()
