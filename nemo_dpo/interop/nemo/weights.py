"""Weights of an unpacked ``.nemo``: a distributed checkpoint, or torch state dicts merged over TP/PP.

Distributed checkpoints load directly: their keys are the checkpoint keys of
our models (transformer-engine spelling ``self_attention.linear_qkv.layer_norm_weight``
for the norms, which the local layer spec maps onto ``input_layernorm``). Torch
state dicts are keyed by module names in either spelling; both are mapped to
checkpoint keys, and tensor-parallel files are merged.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from nemo_dpo.checkpoint.dist_ckpt import KEY_PREFIX, model_sharded_state_dict
from nemo_dpo.checkpoint.safe_load import UnsafeFileError, check_dist_checkpoint_files, load_tensors
from nemo_dpo.interop.nemo.archive import CONFIG_NAME, WEIGHTS_DIR, WEIGHTS_FILE
from nemo_dpo.interop.shape_check import check_dist_checkpoint, check_tensor_shapes
from nemo_dpo.interop.weight_transfer import (
    LAYER_PREFIX,
    OUTPUT_LAYER_KEY,
    VOCAB_KEYS,
    Slot,
    fill_from,
    global_tensor_shapes,
)
from nemo_dpo.models.nlp.gpt.architecture import GPTArchitecture
from nemo_dpo.parallel.collectives import barrier


def nemo_weights_location(folder: str | os.PathLike) -> Path | list[tuple[int, int, Path]]:
    """The distributed-checkpoint folder, or the torch files as ``(tp rank, pp rank, path)``."""
    folder = Path(folder)
    if (folder / WEIGHTS_DIR).is_dir():
        if not (folder / WEIGHTS_DIR / "metadata.json").is_file():
            raise FileNotFoundError(f"{folder / WEIGHTS_DIR} is not a distributed checkpoint (no metadata.json)")
        return folder / WEIGHTS_DIR
    if (folder / WEIGHTS_FILE).is_file():
        return [(0, 0, folder / WEIGHTS_FILE)]
    files = []
    for path in sorted(folder.glob(f"*/{WEIGHTS_FILE}")):
        match = re.fullmatch(r"mp_rank_(\d+)|tp_rank_(\d+)_pp_rank_(\d+)", path.parent.name)
        if match:
            tp = int(match.group(1) if match.group(1) is not None else match.group(2))
            files.append((tp, int(match.group(3) or 0), path))
    if not files:
        raise FileNotFoundError(
            f"no weights in {folder}: expected {WEIGHTS_DIR}/ (distributed checkpoint), {WEIGHTS_FILE}, "
            f"or mp_rank_XX/{WEIGHTS_FILE}"
        )
    return files


def _drop_objects(state):
    if isinstance(state, dict):
        return {k: _drop_objects(v) for k, v in state.items() if not isinstance(v, ShardedObject)}
    return state


def load_dist_checkpoint_weights(model_chunks, directory: str | os.PathLike, vocab_size: int) -> None:
    """Load model weights from a NeMo/megatron distributed checkpoint (call on every rank).

    Only tensors are read: per-module ``_extra_state`` (transformer-engine FP8
    metadata in NeMo's checkpoints) means nothing to our modules.
    """
    check_dist_checkpoint_files(directory)
    check_dist_checkpoint(model_chunks, directory, vocab_size)
    request = _drop_objects(model_sharded_state_dict(model_chunks))
    loaded = dist_checkpointing.load(request, str(directory))
    for (name, state), chunk in zip(loaded.items(), model_chunks):
        module = getattr(chunk, "module", chunk)
        state = {key.removeprefix(KEY_PREFIX): value for key, value in state.items()}
        result = module.load_state_dict(state, strict=False)
        missing = [key for key in result.missing_keys if not key.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise ValueError(f"loading {directory}: missing {missing}, unexpected {result.unexpected_keys}")


_LOCAL_TO_CHECKPOINT = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
_COLUMN_PARALLEL = ("embedding.word_embeddings.weight", OUTPUT_LAYER_KEY, "self_attention.linear_qkv.weight",
                    "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight", "mlp.linear_fc1.bias")
_ROW_PARALLEL = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def checkpoint_key(name: str) -> tuple[str, int | None] | None:
    """``(checkpoint key, layer)`` of a module state-dict name in either layer-spec spelling."""
    for prefix in ("model.", "module."):
        name = name.removeprefix(prefix)
    if name.endswith("_extra_state") or name.endswith("inv_freq"):
        return None
    match = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", name)
    if match:
        suffix = _LOCAL_TO_CHECKPOINT.get(match.group(2), match.group(2))
        return LAYER_PREFIX + suffix, int(match.group(1))
    return name, None


def _torch_load(path: Path, trust_pickled_objects: bool) -> dict:
    # Tensors, plain containers, and the BytesIO blobs transformer-engine pickles as
    # extra state; anything else needs a full unpickle, which can run code from the file.
    if trust_pickled_objects:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    else:
        try:
            state = load_tensors(path, [io.BytesIO], mmap=True)
        except UnsafeFileError as err:
            raise UnsafeFileError(
                f"{err}; only for a file you trust, set pretrained_checkpoint.trust_pickled_objects=true"
            ) from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


class TorchStateDictWeights:
    """Full tensors by checkpoint key from NeMo torch state dicts, merged over TP and PP ranks."""

    def __init__(self, files: list[tuple[int, int, Path]], gated: bool, trust_pickled_objects: bool = False):
        self.gated = gated
        by_stage: dict[int, dict[int, dict]] = {}
        for tp, pp, path in files:
            by_stage.setdefault(pp, {})[tp] = _torch_load(path, trust_pickled_objects)
        self.pieces: dict[tuple[str, int | None], list[torch.Tensor]] = {}
        offset = 0
        for pp in sorted(by_stage):
            ranks = by_stage[pp]
            if sorted(ranks) != list(range(len(ranks))):
                raise FileNotFoundError(f"pipeline stage {pp} lacks tensor-parallel files: has ranks {sorted(ranks)}")
            stage_layers = 0
            for tp in sorted(ranks):
                for name, tensor in ranks[tp].items():
                    located = checkpoint_key(name) if isinstance(tensor, torch.Tensor) else None
                    if located is None:
                        continue
                    key, layer = located
                    if layer is not None:
                        stage_layers = max(stage_layers, layer + 1)
                        layer += offset
                    self.pieces.setdefault((key, layer), []).append(tensor)
            offset += stage_layers
        self.tp = max(len(r) for r in by_stage.values())
        self._cache: tuple | None = None

    def _partition(self, key: str) -> int | None:
        if self.tp == 1:
            return None
        suffix = key.removeprefix(LAYER_PREFIX)
        if suffix in _COLUMN_PARALLEL:
            return 0
        if suffix in _ROW_PARALLEL:
            return 1
        return None

    def shape(self, key: str, layer: int | None) -> tuple[int, ...] | None:
        parts = self.pieces.get((key, layer))
        if not parts:
            return None
        dim = self._partition(key)
        shape = list(parts[0].shape)
        if dim is not None:
            shape[dim] = sum(p.shape[dim] for p in parts)
        return tuple(shape)

    def full(self, key: str, layer: int | None) -> torch.Tensor:
        if self._cache is not None and self._cache[0] == (key, layer):
            return self._cache[1]
        parts = self.pieces[(key, layer)]
        dim = self._partition(key)
        if dim is None:
            full = parts[0]
        elif self.gated and key.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")):
            # Each rank holds [its gate rows; its up rows].
            halves = [p.chunk(2, dim=0) for p in parts]
            full = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        else:
            full = torch.cat(parts, dim=dim)
        self._cache = ((key, layer), full)
        return full

    def check(self, model_chunks, vocab_size: int, tied: bool, where: Path) -> None:
        """Raise, on every rank, on a missing, misshapen or unexpected tensor."""
        stored = {located: self.shape(*located) for located in self.pieces
                  if not (tied and located[0] == OUTPUT_LAYER_KEY)}
        check_tensor_shapes(global_tensor_shapes(model_chunks), stored, where, vocab_size, CONFIG_NAME)

    def read_piece(self, slot: Slot, vocab_size: int) -> torch.Tensor:
        full = self.full(slot.key, slot.layer)
        if slot.key in VOCAB_KEYS:
            rows = torch.zeros(slot.shape, dtype=full.dtype)
            rows[:vocab_size] = full[:vocab_size]
            full = rows
        return full[slot.index]


def load_nemo_weights(model_chunks, folder: str | os.PathLike, architecture: GPTArchitecture,
                      vocab_size: int, trust_pickled_objects: bool = False) -> None:
    """Fill chunks of any TP/PP layout from an unpacked ``.nemo`` (call on every rank).

    Torch state dicts holding objects other than tensors are refused unless
    ``trust_pickled_objects``: unpickling a file can run any code in it.
    """
    location = nemo_weights_location(folder)
    if isinstance(location, Path):
        load_dist_checkpoint_weights(model_chunks, location, vocab_size)
        return
    weights = TorchStateDictWeights(location, architecture.gated_linear_unit, trust_pickled_objects)
    weights.check(model_chunks, vocab_size, architecture.share_embeddings_and_output_weights, Path(folder))
    with torch.no_grad():
        fill_from(model_chunks, lambda slot: weights.read_piece(slot, vocab_size))
    barrier()
