"""Moving whole tensors in and out of model chunks of any TP/PP layout.

Both directions work on megatron-core's sharded state dict, the same map that
:func:`nemo_dpo.models.nlp.gpt.init.initialize_weights` and distributed
checkpoints use. Every tensor a rank holds is a :class:`Slot`: a global
checkpoint key (``decoder.layers.self_attention.linear_qkv.weight``), the global
layer index for per-layer keys, the full (unsharded) shape of one layer's tensor,
and which part of it this rank keeps. Hence:

* import (:func:`fill_from`): each rank asks a reader for exactly the part it
  keeps, so no rank ever materialises more than one full tensor;
* export (:func:`gather_full_tensors`): the owners of each tensor's pieces send
  them to rank 0, which yields one full tensor at a time.

The layout only enters through the slots, so the same code serves TP, PP,
virtual pipeline stages and DP (DP copies are skipped on export).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from nemo_dpo.models.nlp.gpt.init import iter_sharded_tensors
from nemo_dpo.parallel.collectives import all_gather_objects
from nemo_dpo.parallel.collectives import rank as this_rank

LAYER_PREFIX = "decoder.layers."
EMBEDDING_KEY = "embedding.word_embeddings.weight"
OUTPUT_LAYER_KEY = "output_layer.weight"
VOCAB_KEYS = (EMBEDDING_KEY, OUTPUT_LAYER_KEY)


@dataclass(frozen=True)
class Slot:
    """One tensor (or one piece of it) held by this rank.

    ``shape`` is the full tensor of one layer (layer axis removed); ``index``
    selects this rank's part of it; ``layer`` is the global layer index for keys
    under ``decoder.layers.`` and ``None`` otherwise.
    """

    key: str
    layer: int | None
    shape: tuple[int, ...]
    index: tuple[slice, ...]
    data: torch.Tensor
    main_replica: bool

    @property
    def name(self) -> str:
        """Human-readable name: the key with its layer number."""
        if self.layer is None:
            return self.key
        return f"{LAYER_PREFIX}{self.layer}.{self.key[len(LAYER_PREFIX):]}"


def _slot(sharded: ShardedTensor) -> Slot:
    if getattr(sharded, "flattened_range", None) is not None:
        raise ValueError(f"{sharded.key}: flattened (optimizer) shards are not model weights")
    skip = sharded.prepend_axis_num
    if skip > 1:
        raise ValueError(f"{sharded.key}: {skip} prepended axes; only a layer axis is supported")
    layer = sharded.global_offset[0] if skip else None
    shape = tuple(sharded.global_shape[skip:])
    index = tuple(
        slice(offset, offset + size)
        for offset, size in zip(sharded.global_offset[skip:], sharded.data.shape)
    )
    replica = sharded.replica_id if isinstance(sharded.replica_id, tuple) else (sharded.replica_id,)
    return Slot(sharded.key, layer, shape, index, sharded.data, all(r == 0 for r in replica))


def iter_slots(model_chunks, sharded_state_dict: dict | None = None) -> Iterator[Slot]:
    """Every weight tensor of this rank's chunks (DDP wrappers are looked through).

    ``sharded_state_dict``: the tensors of this one instead of the chunks' own
    (e.g. LoRA adapters, which are not part of the model's).
    """
    states = [sharded_state_dict] if sharded_state_dict is not None else [
        getattr(chunk, "module", chunk).sharded_state_dict() for chunk in model_chunks]
    for state in states:
        for sharded in iter_sharded_tensors(state):
            if sharded.data is None or sharded.key.endswith("_extra_state"):
                continue
            yield _slot(sharded)


def global_tensor_shapes(model_chunks) -> dict[tuple[str, int | None], tuple[int, ...]]:
    """``(key, layer) -> full shape`` of every weight of the whole model, on every rank (collective).

    Lets all ranks check a checkpoint against the whole model before loading,
    so a bad checkpoint fails on every rank alike instead of leaving some
    waiting in a collective.
    """
    local = {(s.key, s.layer): s.shape for s in iter_slots(model_chunks)}
    for shapes in all_gather_objects(local):
        local.update(shapes)
    return dict(sorted(local.items(), key=lambda item: _order(*item[0])))


PieceReader = Callable[[Slot], torch.Tensor]


@torch.no_grad()
def fill_from(model_chunks, read_piece: PieceReader) -> None:
    """Copy ``read_piece(slot)`` into every slot of this rank's chunks.

    ``read_piece`` returns the values of ``slot.index`` of the full tensor
    ``slot.key`` (of layer ``slot.layer``) in any dtype; a piece of the wrong
    shape raises an error naming the tensor. Not collective by itself.
    """
    for slot in iter_slots(model_chunks):
        piece = read_piece(slot)
        if tuple(piece.shape) != tuple(slot.data.shape):
            raise ValueError(
                f"{slot.name}: the checkpoint gives a piece of shape {tuple(piece.shape)} where the "
                f"model holds {tuple(slot.data.shape)} (full tensor {slot.shape})"
            )
        slot.data.copy_(piece)


def _order(key: str, layer: int | None) -> tuple:
    # Embedding first, then layer by layer, then the final norm and the output layer.
    if layer is not None:
        return (1, layer, key)
    return (0 if key == EMBEDDING_KEY else 2, 0, key)


@torch.no_grad()
def gather_full_tensors(model_chunks, sharded_state_dict: dict | None = None
                        ) -> Iterator[tuple[str, int | None, torch.Tensor]]:
    """``(key, layer, full tensor)`` for every weight, on rank 0 (collective).

    Every rank must exhaust the iterator: ranks other than 0 yield nothing but
    send their pieces while it runs. Tensors arrive on rank 0 on the CPU, one at
    a time, in the order embedding, layers, final norm, output layer.
    ``sharded_state_dict``: as for :func:`iter_slots`.
    """
    local = [slot for slot in iter_slots(model_chunks, sharded_state_dict) if slot.main_replica]
    meta = [(s.key, s.layer, s.shape, s.index, s.data.dtype) for s in local]
    everyone, rank = all_gather_objects(meta), this_rank()
    pieces: dict[tuple, list] = {}
    for owner, owned in enumerate(everyone):
        for position, (key, layer, shape, index, dtype) in enumerate(owned):
            pieces.setdefault((key, layer), []).append((owner, position, shape, index, dtype))
    receive_device = local[0].data.device if local else torch.device("cpu")
    for key, layer in sorted(pieces, key=lambda k: _order(*k)):
        parts = pieces[(key, layer)]
        shape, dtype = parts[0][2], parts[0][4]
        full = torch.empty(shape, dtype=dtype) if rank == 0 else None
        covered = 0
        for owner, position, part_shape, index, _ in parts:
            if part_shape != shape:
                raise ValueError(f"{key}: ranks disagree on its full shape ({part_shape} vs {shape})")
            if owner == rank:
                values = local[position].data.detach().contiguous()
                if rank == 0:
                    full[index] = values.cpu()
                else:
                    dist.send(values, dst=0)
            elif rank == 0:
                size = [s.stop - s.start for s in index]
                buffer = torch.empty(size, dtype=dtype, device=receive_device)
                dist.recv(buffer, src=owner)
                full[index] = buffer.cpu()
            covered += _numel(index)
        if rank == 0:
            if covered != full.numel():
                raise ValueError(f"{key} (layer {layer}): the model's pieces cover {covered} of "
                                 f"{full.numel()} values")
            yield key, layer, full


def _numel(index: tuple[slice, ...]) -> int:
    count = 1
    for s in index:
        count *= s.stop - s.start
    return count
