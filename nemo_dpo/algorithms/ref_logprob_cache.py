"""Reference log-probs computed once per data set and kept on disk (``model.dpo.precompute_ref_log_probs``).

The reference policy is frozen, so its per-token log-probs of a pair never
change: one forward-only pass over the training and validation sets replaces
the reference forward of every global batch of every epoch, and the file it
leaves serves resumed and later runs on the same data.

A cache file is ``<dir>/<split>-<fingerprint>.safetensors`` holding, per pair,
the chosen and the rejected token log-prob vectors (one flat float32 tensor,
``offsets`` into it, rows ``[chosen_0, rejected_0, chosen_1, ...]``) and the
pairs' ``sample_index``. Its metadata stores the fingerprint's parts and a
sha256 of the tensors' bytes. The fingerprint hashes parts the caller gives
(reference weights, data files, tokenizer files, tokenization settings) and
two the cache derives itself: the token ids of every pair (``items``: any
change of data, tokenizer or tokenization that reaches the model) and the
batching that decides which pairs share a forward (``batching``: global batch,
data-parallel size, log-prob micro-batch, sampler order), so that the values
of a step are bitwise those an on-the-fly run computes there (step 0: policy
and reference equal, loss exactly ln 2).

The pass feeds the model the global batches of the training sampler's first
epoch (the validation sampler's order for validation), then the pairs that
epoch leaves out, through the trainer's collate and
``get_ref_policy_logprobs``: the same batches, padding and micro-batches as
computing them on the fly in the first epoch. Each data-parallel rank computes
its share, the shares are gathered over the data-parallel group and rank 0
writes the file, atomically (temporary file, fsync, rename). A file that fails
to read or to verify is named in a warning and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable

import torch
from megatron.core import parallel_state
from safetensors import safe_open
from safetensors.torch import save

from nemo_dpo.data.samplers import PAD_INDEX, PaddedIndexDataset
from nemo_dpo.parallel.collectives import ReduceOp, all_gather_objects, all_reduce, is_rank0

__all__ = ["RefLogprobCache", "RefLogprobTable", "fingerprint_files", "fingerprint_named_tensors"]

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
SPLITS = ("train", "validation")
_HASH_CHUNK = 1 << 20


def fingerprint_files(paths: Iterable[str | Path]) -> str:
    """sha256 over the names (relative to each given path) and contents of files; folders are walked."""
    digest = hashlib.sha256()
    for root in sorted(Path(p) for p in paths):
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for file in files:
            digest.update(f"{file.relative_to(root) if root.is_dir() else root.name}\0".encode())
            with open(file, "rb") as handle:
                while chunk := handle.read(_HASH_CHUNK):
                    digest.update(chunk)
            digest.update(b"\0")
    return digest.hexdigest()


def fingerprint_named_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``(name, tensor)`` in the order given."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _combined(parts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class RefLogprobTable:
    """Per-pair reference token log-probs by sample index, and the batch tensors made of them."""

    def __init__(self, rows: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.rows = rows

    def lookup(self, batch: dict) -> torch.Tensor:
        """``[2B, S-1]`` float32 like ``get_ref_policy_logprobs``: chosen rows, then rejected (0 past each row)."""
        pairs, length = batch["chosen"].shape
        out = torch.zeros(2 * pairs, max(length - 1, 0), dtype=torch.float32)
        for row, index in enumerate(batch["sample_index"].tolist()):
            if index not in self.rows:
                raise KeyError(f"sample {index} has no precomputed reference log-probs (the cache covers "
                               f"{len(self.rows)} pairs; was the data set built differently?)")
            for offset, values in enumerate(self.rows[index]):
                out[row + offset * pairs, : len(values)] = values
        return out

    def to_tensors(self) -> dict[str, torch.Tensor]:
        indices = sorted(self.rows)
        vectors = [vector for index in indices for vector in self.rows[index]]
        lengths = torch.tensor([0] + [len(v) for v in vectors], dtype=torch.long)
        flat = torch.cat(vectors) if vectors else torch.zeros(0)
        return {"logprobs": flat.float().contiguous(), "offsets": lengths.cumsum(0),
                "sample_index": torch.tensor(indices, dtype=torch.long)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "RefLogprobTable":
        flat, offsets, indices = tensors["logprobs"], tensors["offsets"], tensors["sample_index"]
        if offsets.numel() != 2 * indices.numel() + 1 or offsets[0] != 0 or offsets[-1] != flat.numel() or (
                offsets.diff() < 0).any():
            raise ValueError("offsets do not match the log-probs and sample indices")
        bounds = offsets.tolist()
        vectors = [flat[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]
        return cls({index: (vectors[2 * i], vectors[2 * i + 1]) for i, index in enumerate(indices.tolist())})


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    return fingerprint_named_tensors(sorted(tensors.items()))


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(save(tensors, metadata=metadata))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return tensors, metadata


class RefLogprobCache:
    """Reference log-probs of the training and validation sets, computed once and kept in ``directory``.

    Args:
        directory: the cache folder (shared by runs that should share caches).
        parts: fingerprint parts common to every split, each a hash or a short
            description: e.g. ``weights``, ``tokenizer``, ``settings``.
        split_parts: parts of one split only, e.g. ``{"train": {"data": <file hash>}}``.
    """

    def __init__(self, directory: str | Path, parts: dict[str, str],
                 split_parts: dict[str, dict[str, str]] | None = None):
        self.directory = Path(directory)
        self.parts = dict(parts)
        self.split_parts = dict(split_parts or {})

    # ------------------------------------------------------------- planning
    @staticmethod
    def _plan(dataloader, micro_batch_size: int):
        """``(dataset, global batches of this DP rank's indices, batching description)``."""
        sampler = dataloader.batch_sampler
        dataset = dataloader.dataset
        if not isinstance(dataset, PaddedIndexDataset):
            dataset = PaddedIndexDataset(dataset)
        total = int(getattr(sampler, "total_samples", len(dataset)))
        global_batch = int(sampler.global_batch_size)
        dp_rank, dp_size = int(sampler.data_parallel_rank), int(sampler.data_parallel_size)
        epoch_order = getattr(sampler, "epoch_order", None)
        order = list(epoch_order(0)) if epoch_order is not None else list(range(total))
        if getattr(sampler, "drop_last", False):
            order = order[: len(order) // global_batch * global_batch]
        seen = set(order)
        order += [index for index in range(total) if index not in seen]
        order += [PAD_INDEX] * (-len(order) % global_batch)
        batches = [order[start:start + global_batch][dp_rank::dp_size] for start in range(0, len(order), global_batch)]
        batching = json.dumps({"sampler": type(sampler).__name__, "seed": getattr(sampler, "seed", None),
                               "global_batch_size": global_batch, "data_parallel_size": dp_size,
                               "micro_batch_size": micro_batch_size, "drop_last": getattr(sampler, "drop_last", None)},
                              sort_keys=True)
        return dataset, total, batches, batching

    @staticmethod
    def _items_digest(dataset, total: int) -> str:
        digest = hashlib.sha256()
        for index in range(total):
            item = dataset[index]
            for key in ("chosen", "rejected"):
                tokens = torch.as_tensor(item[key], dtype=torch.long).contiguous()
                digest.update(f"{index}{key}{tokens.numel()}\0".encode())
                digest.update(tokens.numpy().tobytes())
        return digest.hexdigest()

    # ------------------------------------------------------------- the cache
    def table(self, split: str, dataloader, prepare_batch: Callable, model) -> RefLogprobTable:
        """The reference log-probs of ``dataloader``'s data set: read from the cache, or computed and stored.

        ``prepare_batch`` turns a list of items into the batch the model sees (the
        trainer's collate, sampler padding dropped). Collective: every rank calls
        it with its own dataloader (same data set).
        """
        micro = model.dpo.log_prob_forward_micro_batch_size or model.cfg.micro_batch_size
        dataset, total, batches, batching = self._plan(dataloader, micro)
        parts = {**self.parts, **self.split_parts.get(split, {}), "split": split, "format": FORMAT_VERSION,
                 "items": self._items_digest(dataset, total), "batching": batching}
        fingerprint = _combined(parts)
        path = self.directory / f"{split}-{fingerprint[:32]}.safetensors"
        table = self._load(path, fingerprint, split, parts)
        if all_reduce(torch.tensor(0.0 if table is None else 1.0), ReduceOp.MIN).item() == 1.0:
            log.info("reference log-probs of %s: read from %s", split, path)
            return table
        table = self._compute(dataset, batches, prepare_batch, model)
        if is_rank0():
            tensors = table.to_tensors()
            _write_atomic(path, tensors, {"fingerprint": fingerprint, "parts": json.dumps(parts, sort_keys=True),
                                          "sha256": _tensors_digest(tensors)})
            log.info("reference log-probs of %s (%d pairs) written to %s", split, len(table.rows), path)
        return table

    def _load(self, path: Path, fingerprint: str, split: str, parts: dict[str, str]) -> RefLogprobTable | None:
        if not path.exists():
            if is_rank0():
                log.info("reference log-prob cache miss for %s: %s", split, self._miss_reason(split, parts))
            return None
        try:
            tensors, metadata = _read(path)
            if metadata.get("fingerprint") != fingerprint:
                raise ValueError("its fingerprint differs from its name's")
            if metadata.get("sha256") != _tensors_digest(tensors):
                raise ValueError("its contents do not match their checksum")
            return RefLogprobTable.from_tensors(tensors)
        except Exception as error:  # any unreadable or inconsistent file is recomputed, never trusted
            log.warning("reference log-prob cache file %s is damaged (%s); recomputing it", path, error)
            return None

    def _miss_reason(self, split: str, parts: dict[str, str]) -> str:
        """What differs from the closest earlier cache of ``split`` in the folder (the fewest parts)."""
        closest = None
        previous = sorted(self.directory.glob(f"{split}-*.safetensors"), key=lambda p: -p.stat().st_mtime)
        for path in previous:
            try:
                with safe_open(str(path), framework="pt") as handle:
                    old = json.loads((handle.metadata() or {})["parts"])
            except Exception:
                continue
            changed = sorted(key for key in set(old) | set(parts) if old.get(key) != parts.get(key))
            if closest is None or len(changed) < len(closest[1]):
                closest = path, changed
        if closest is None:
            return "no cache yet" if not previous else "fingerprint differs"
        return f"{', '.join(closest[1])} changed since {closest[0].name}"

    @staticmethod
    def _compute(dataset, batches: list[list[int]], prepare_batch: Callable, model) -> RefLogprobTable:
        rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for indices in batches:
            items = [dataset[index] for index in indices]
            logprobs = model.get_ref_policy_logprobs(prepare_batch(items)).float().cpu()
            kept = [(index, item) for index, item in zip(indices, items) if index != PAD_INDEX]
            pairs = len(kept)
            for row, (index, item) in enumerate(kept):
                rows[index] = tuple(logprobs[row + offset * pairs, : len(item[key]) - 1].clone()
                                    for offset, key in enumerate(("chosen", "rejected")))
        merged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for shard in all_gather_objects(rows, group=parallel_state.get_data_parallel_group()):
            merged.update(shard)
        return RefLogprobTable(merged)
