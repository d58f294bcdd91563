"""``model.data.data_prefix`` in every form NeMo Aligner takes, and datasets blended by weight.

Forms, each for one split or (not in a dict) for all of them:

- a path (``train.jsonl``) or a one-element list of one (``[train.jsonl]``);
- a weighted blend ``[w1, path1, w2, path2, ...]``: samples drawn in proportion to the weights;
- a dict ``{train: ..., validation: ..., test: ...}`` holding any of the above per split.

A path or list that is not in a dict names the data of every split, as in NeMo Aligner
when the dict is not used (there it is cut into splits by ``splits_string``, a key this
library does not have: here each split reads the whole file).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

__all__ = [
    "DATA_PREFIX_KEY",
    "DATA_SPLITS",
    "BlendedDataset",
    "DataPrefixError",
    "blending_order",
    "split_data_prefix",
]

DATA_PREFIX_KEY = "model.data.data_prefix"
DATA_SPLITS = ("train", "validation", "test")


class DataPrefixError(ValueError):
    """A ``model.data.data_prefix`` value that names no usable data; the message names the key and item."""


def _is_mapping(value: Any) -> bool:
    # OmegaConf's DictConfig is a MutableMapping; checking by ABC keeps omegaconf out of this module.
    return isinstance(value, Mapping)


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _path(item: Any, key: str) -> str:
    if isinstance(item, os.PathLike):
        item = os.fspath(item)
    if not isinstance(item, str) or not item.strip():
        raise DataPrefixError(f"{key}={item!r}: expected the path of a data file")
    path = item.strip()
    if not Path(path).exists():
        raise DataPrefixError(f"{key}={path!r}: file not found")
    return path


def _weight(item: Any, key: str) -> float:
    # NeMo reads weights with float(), so "0.5" in a string is a weight too; a bool is not.
    if isinstance(item, bool) or not isinstance(item, (Real, str)):
        raise DataPrefixError(f"{key}={item!r}: expected a weight (a blend is [weight, path, weight, path, ...])")
    try:
        weight = float(item)
    except ValueError:
        raise DataPrefixError(
            f"{key}={item!r}: expected a weight (a blend is [weight, path, weight, path, ...])"
        ) from None
    if not math.isfinite(weight) or weight < 0:
        raise DataPrefixError(f"{key}={item!r}: a weight must be a finite number >= 0")
    return weight


def _parse_blend(value: Any, key: str) -> list[tuple[float, str]]:
    """``[(weight, path), ...]`` from one split's value (a path, a one-element list or a blend)."""
    if not _is_list(value):
        return [(1.0, _path(value, key))]
    items = list(value)
    if len(items) == 1:
        return [(1.0, _path(items[0], f"{key}[0]"))]
    if not items or len(items) % 2:
        raise DataPrefixError(
            f"{key} has {len(items)} items: give one path, or a blend [weight, path, weight, path, ...] "
            "with an even number of items"
        )
    blend = [
        (_weight(items[i], f"{key}[{i}]"), _path(items[i + 1], f"{key}[{i + 1}]")) for i in range(0, len(items), 2)
    ]
    if sum(weight for weight, _ in blend) <= 0:
        raise DataPrefixError(f"{key}: the blend's weights sum to 0")
    return blend


def split_data_prefix(data_prefix: Any, split: str) -> list[tuple[float, str]] | None:
    """The ``(weight, path)`` entries of ``split``'s data (weights as given); None when it has none.

    ``data_prefix`` is ``model.data.data_prefix`` (plain Python or OmegaConf values). Files
    are checked to exist; every malformed value raises :class:`DataPrefixError` naming
    ``model.data.data_prefix.<split>`` (or ``model.data.data_prefix`` outside a dict) and the item.
    """
    if split not in DATA_SPLITS:
        raise ValueError(f"split must be one of {DATA_SPLITS}, got {split!r}")
    if data_prefix is None:
        return None
    key = DATA_PREFIX_KEY
    if _is_mapping(data_prefix):
        unknown = [name for name in data_prefix.keys() if name not in DATA_SPLITS]
        if unknown:
            raise DataPrefixError(f"{key} has unknown key {unknown[0]!r}; valid keys: {', '.join(DATA_SPLITS)}")
        data_prefix, key = data_prefix.get(split), f"{key}.{split}"
        if data_prefix is None:
            return None
    return _parse_blend(data_prefix, key)


def blending_order(weights: Sequence[float], size: int) -> np.ndarray:
    """Which dataset each of ``size`` blended samples comes from, by NeMo's rule.

    With weights normalised to sum 1, sample ``i`` goes to the dataset furthest behind
    its share: the largest ``w_j * max(i, 1) - drawn_j`` (the first such dataset on a
    tie), as NeMo's ``helpers.build_blending_indices`` does, except that a weight-0
    dataset is never drawn from (NeMo draws one sample from it on a tie). Every dataset's
    count after ``n`` samples stays within one sample of ``w_j * n``.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not len(w) or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {list(weights)}")
    w = (w / w.sum()).tolist()
    # NeMo would draw from a weight-0 dataset on a tie (at sample 1); here it is never drawn from.
    candidates = [j for j, weight in enumerate(w) if weight > 0]
    drawn = [0] * len(w)
    order = np.empty(size, dtype=np.int64)
    for i in range(size):
        scale = max(i, 1)
        best, best_error = candidates[0], w[candidates[0]] * scale - drawn[candidates[0]]
        for j in candidates[1:]:
            error = w[j] * scale - drawn[j]
            if error > best_error:
                best, best_error = j, error
        order[i] = best
        drawn[best] += 1
    return order


class BlendedDataset(Dataset):
    """Samples of several datasets interleaved in proportion to ``weights`` (NeMo's ``BlendableDataset``).

    What matches NeMo: weights are normalised to sum 1 and samples are interleaved by
    NeMo's greedy rule (:func:`blending_order`), so each dataset supplies its share of
    every stretch of samples, within one sample; a dataset asked for more samples than
    it holds repeats its records.

    What differs: NeMo sizes the blend by the number of samples training needs (and pads
    each dataset's share by 0.5%); NeMo Aligner's DPO recipe asks for ``-global_batch_size``
    ("the whole data"), which a blend cannot take. Here ``size`` defaults to the total
    number of samples of the datasets (one epoch of the blend is as long as its inputs
    together), each dataset's share is exactly what the interleaving draws, and the records
    a dataset supplies are a seeded random permutation of it (a new one for each pass over
    it) rather than its first records in file order, so that a down-weighted file
    contributes a random subset, the same for every run with the same ``seed``.
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int | None = None, seed: int = 0):
        super().__init__()
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"got {len(datasets)} datasets and {len(weights)} weights")
        lengths = [len(d) for d in datasets]
        self.datasets = list(datasets)
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.size = sum(lengths) if size is None else int(size)
        if self.size <= 0:
            raise ValueError(f"a blend needs a positive size, got {self.size}")
        self.dataset_index = blending_order(self.weights, self.size)
        self.sample_index = np.empty(self.size, dtype=np.int64)
        rng = np.random.default_rng(seed)
        for j, length in enumerate(lengths):
            positions = np.flatnonzero(self.dataset_index == j)
            if not len(positions):
                continue
            if not length:
                raise ValueError(f"dataset {j} of the blend is empty but has weight {self.weights[j]:.3g}")
            passes = -(-len(positions) // length)
            records = np.concatenate([rng.permutation(length) for _ in range(passes)])
            self.sample_index[positions] = records[: len(positions)]

    @property
    def counts(self) -> list[int]:
        """Samples drawn from each dataset."""
        return np.bincount(self.dataset_index, minlength=len(self.datasets)).tolist()

    def locate(self, index: int) -> tuple[int, int]:
        """``(dataset, sample within it)`` of blended sample ``index``."""
        return int(self.dataset_index[index]), int(self.sample_index[index])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        dataset, sample = self.locate(index)
        return self.datasets[dataset][sample]
