"""One check of a checkpoint's tensors against the model about to receive them.

Used by every format whose tensors are keyed like the model's own (nemo-dpo
model folders, ``.nemo`` distributed checkpoints and torch state dicts), so all
fail with the same messages, on every rank, before any weight is read.
"""

from __future__ import annotations

import os

from megatron.core import dist_checkpointing

from nemo_dpo.checkpoint.dist_ckpt import KEY_PREFIX
from nemo_dpo.interop.weight_transfer import VOCAB_KEYS, global_tensor_shapes


def check_tensor_shapes(expected: dict, stored: dict, where, vocab_size: int,
                        unexpected_note: str | None = None) -> None:
    """Raise if ``stored`` lacks a tensor of ``expected`` or has one of another shape.

    Both map ``(checkpoint key, layer or None)`` to a shape. Vocabulary tensors
    may have more rows than the model (other padding) but not fewer than
    ``vocab_size``. With ``unexpected_note``, tensors the model does not have
    are refused too.
    """
    for (key, layer), want in expected.items():
        want, name = tuple(want), key if layer is None else f"{key} (layer {layer})"
        got = stored.get((key, layer))
        if got is None:
            raise ValueError(f"{where} has no tensor {name} (shape {want})")
        got = tuple(got)
        if key.removeprefix(KEY_PREFIX) in VOCAB_KEYS:
            if got[1:] != want[1:]:
                problem = f"{name} has shape {got} in the checkpoint, the model expects {want} (up to vocab padding)"
            elif got[0] < vocab_size:
                problem = f"{name} has {got[0]} rows in the checkpoint, fewer than the vocabulary ({vocab_size})"
            else:
                continue
            raise ValueError(f"{where}: {problem}")
        if got != want:
            raise ValueError(f"{where}: {name} has shape {got} in the checkpoint, the model expects {want}")
    if unexpected_note is not None:
        unexpected = [located for located in stored if located not in expected]
        if unexpected:
            key, layer = unexpected[0]
            raise ValueError(
                f"{where} holds {len(unexpected)} tensors the model does not have, e.g. {key} (layer {layer}): "
                f"the weights do not match {unexpected_note}"
            )


def check_dist_checkpoint(model_chunks, directory: str | os.PathLike, vocab_size: int) -> None:
    """Raise, on every rank, if a megatron distributed checkpoint does not fit ``model_chunks``.

    Per-layer tensors are stored stacked over layers, so their expected shape
    gets the number of layers in front.
    """
    stored = {(key, None): tuple(meta.global_shape)
              for key, meta in dist_checkpointing.load_tensors_metadata(str(directory)).items()}
    shapes = global_tensor_shapes(model_chunks)
    layers: dict[str, int] = {}
    for key, layer in shapes:
        if layer is not None:
            layers[key] = max(layers.get(key, 0), layer + 1)
    expected = {(KEY_PREFIX + key, None): (layers[key], *shape) if key in layers else tuple(shape)
                for (key, _), shape in shapes.items()}
    check_tensor_shapes(expected, stored, directory, vocab_size)
