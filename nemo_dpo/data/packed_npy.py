"""NeMo Aligner's packed DPO ``.npy`` files: read without running code, check, unpack and write.

NeMo Aligner's ``examples/nlp/data/dpo/prepare_packed_dpo_dataset.py`` saves
``np.save(path, list_of_packs)``: a 1-d object array whose pickled payload holds
one dict per pack with

* ``input_ids``: the tokens of each pair's chosen then rejected sequence (prompt +
  response), all pairs of the pack concatenated;
* ``labels``: the same length, the token ids *unshifted* with -100 on prompt
  positions (NeMo's reader shifts them per sequence when it collates);
* ``reward``: ``[chosen, rejected]`` of each pair, concatenated;
* ``lengths``: ``[chosen_len, rejected_len]`` of each pair, concatenated;
* ``seq_boundaries``: ``[0, b1, b2, ...]``, two entries per pair (end of chosen,
  end of rejected), so sequence ``k`` is ``input_ids[b[k]:b[k+1]]``.

``np.load(allow_pickle=True)`` would unpickle the payload, which can run any code
the file names. :func:`load_packed_npy` parses the ``.npy`` header itself and
unpickles with an unpickler that resolves only numpy's array reconstruction and
dtype (and numpy scalars), so a file naming anything else is refused unexecuted.
"""

from __future__ import annotations

import io
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib import format as npy_format
from torch.utils.data import Dataset

from nemo_dpo.data.collate import dpo_custom_collate
from nemo_dpo.data.packing import first_fit, first_fit_decreasing
from nemo_dpo.data.records import PreferenceDataError

__all__ = [
    "DPOPackedDataset",
    "PACK_KEYS",
    "PACKING_ALGORITHMS",
    "PackedDataError",
    "check_pack",
    "load_packed_npy",
    "make_pack",
    "pack_pairs",
    "pack_to_pairs",
    "save_packed_npy",
]

PACK_KEYS = ("input_ids", "labels", "reward", "lengths", "seq_boundaries")
PACKING_ALGORITHMS = ("first_fit_decreasing", "first_fit_shuffle")  # NeMo's create_packing_strategy names


class PackedDataError(PreferenceDataError):
    """A packed ``.npy`` file that cannot be used; the message is one line naming the file (and pack)."""


def _numpy_globals() -> dict[tuple[str, str], Any]:
    from numpy._core import multiarray

    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    # numpy < 2 pickles under numpy.core, numpy >= 2 under numpy._core; both mean the same functions.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals an ``np.save``-d object array of plain dicts needs.

    Opcodes that build dicts, lists, tuples, strings and numbers need no global;
    an ``ndarray`` is rebuilt from ``numpy.core.multiarray._reconstruct``,
    ``numpy.ndarray`` and ``numpy.dtype`` (verified on NeMo Aligner's own fixture with
    ``pickletools``), numpy scalars from ``multiarray.scalar``.
    """

    def __init__(self, file, where: str):
        super().__init__(file)
        self._where = where
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        found = self._allowed.get((module, name))
        if found is None:
            raise PackedDataError(f"{self._where}: refused to load: its pickled data references {module}.{name}, "
                                  "which a packed DPO file never needs (nothing was executed)")
        return found

    def persistent_load(self, pid):
        raise PackedDataError(f"{self._where}: refused to load: its pickled data uses persistent ids")


def load_packed_npy(path: str | Path) -> list[dict]:
    """The packs of a NeMo Aligner packed DPO ``.npy`` file, unchecked (see :func:`check_pack`)."""
    path = Path(path)
    where = str(path)
    not_packed = f"{where}: not a packed DPO .npy file (a 1-d numpy object array of dicts, as np.save writes)"
    try:
        with path.open("rb") as f:
            version = npy_format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = npy_format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = npy_format.read_array_header_2_0(f)
            else:
                raise PackedDataError(f"{not_packed}; .npy format version {version} is not read")
            if dtype != np.dtype(object) or len(shape) != 1:
                raise PackedDataError(f"{not_packed}; it holds an array of shape {shape} and dtype {dtype}")
            payload = _RestrictedUnpickler(f, where).load()
    except PackedDataError:
        raise
    except OSError as err:
        raise PackedDataError(f"{where}: cannot read: {err.strerror or err}") from err
    except Exception as err:  # bad magic, bad header, truncated or malformed pickle
        raise PackedDataError(f"{not_packed}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                              ) from err
    if isinstance(payload, np.ndarray):
        payload = list(payload.reshape(-1))
    if not isinstance(payload, list) or len(payload) != shape[0]:
        raise PackedDataError(f"{not_packed}; its payload is a {type(payload).__name__}, not {shape[0]} packs")
    if not payload:
        raise PackedDataError(f"{where}: no packs")
    return payload


def _int_list(value: Any, key: str, where: str) -> list[int]:
    array = np.asarray(value)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise PackedDataError(f"{where}: {key!r} must be a 1-d list of integers")
    return array.astype(np.int64).tolist()


def check_pack(pack: Any, where: str, vocab_size: int | None = None) -> dict:
    """``pack`` as plain lists after checking its structure; ``where`` names file and pack in errors."""
    if not isinstance(pack, dict):
        raise PackedDataError(f"{where}: a pack must be a dict, got {type(pack).__name__}")
    missing = [key for key in PACK_KEYS if key not in pack]
    if missing:
        raise PackedDataError(f"{where}: missing key(s) {missing} (a pack has {list(PACK_KEYS)})")
    input_ids = _int_list(pack["input_ids"], "input_ids", where)
    labels = _int_list(pack["labels"], "labels", where)
    lengths = _int_list(pack["lengths"], "lengths", where)
    bounds = _int_list(pack["seq_boundaries"], "seq_boundaries", where)
    reward = np.asarray(pack["reward"])
    real = np.issubdtype(reward.dtype, np.integer) or np.issubdtype(reward.dtype, np.floating)
    if reward.ndim != 1 or not (real or reward.size == 0):
        raise PackedDataError(f"{where}: 'reward' must be a 1-d list of numbers")
    reward = reward.astype(np.float64).tolist()
    if len(labels) != len(input_ids):
        raise PackedDataError(f"{where}: 'labels' has {len(labels)} entries, 'input_ids' {len(input_ids)}")
    num_seqs = len(bounds) - 1
    if num_seqs < 2 or num_seqs % 2:
        raise PackedDataError(f"{where}: 'seq_boundaries' {bounds[:8]} must be [0, end of chosen, end of rejected, "
                              "...] for at least one pair (an odd number of entries, at least 3)")
    if bounds[0] != 0 or bounds[-1] != len(input_ids) or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise PackedDataError(f"{where}: 'seq_boundaries' must increase from 0 to len(input_ids)={len(input_ids)}")
    seq_lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if len(lengths) != num_seqs or lengths != seq_lengths:
        raise PackedDataError(f"{where}: 'lengths' {lengths[:8]} must equal the sequence lengths given by "
                              f"'seq_boundaries' {seq_lengths[:8]} (chosen then rejected of each pair)")
    if len(reward) != num_seqs:
        raise PackedDataError(f"{where}: 'reward' has {len(reward)} entries for {num_seqs // 2} pairs (two per pair)")
    if not all(np.isfinite(reward)):
        raise PackedDataError(f"{where}: 'reward' holds a non-finite value")
    bad = [t for t in input_ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        limit = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise PackedDataError(f"{where}: token id {bad[0]} in 'input_ids' is outside the vocabulary {limit}")
    for k, (start, end) in enumerate(zip(bounds, bounds[1:])):
        seq_labels, seq_ids = labels[start:end], input_ids[start:end]
        kept = [i for i, label in enumerate(seq_labels) if label != -100]
        if any(seq_labels[i] != seq_ids[i] for i in kept):
            raise PackedDataError(f"{where}: sequence {k}: 'labels' must be the token ids or -100")
        if not kept or kept[0] < 1 or kept != list(range(kept[0], end - start)):
            raise PackedDataError(f"{where}: sequence {k}: 'labels' must be -100 on a non-empty prompt and the ids "
                                  "on a non-empty response after it")
    for p in range(0, num_seqs, 2):
        prompt_c = _prompt_length(labels, bounds, p)
        prompt_r = _prompt_length(labels, bounds, p + 1)
        if prompt_c != prompt_r or input_ids[bounds[p]:bounds[p] + prompt_c] != \
                input_ids[bounds[p + 1]:bounds[p + 1] + prompt_r]:
            raise PackedDataError(f"{where}: pair {p // 2}: chosen and rejected (sequences {p} and {p + 1}) must be "
                                  "consecutive and share their prompt")
    return {"input_ids": input_ids, "labels": labels, "reward": reward, "lengths": lengths, "seq_boundaries": bounds}


def _prompt_length(labels: list[int], bounds: list[int], k: int) -> int:
    """Prompt length of sequence ``k``: its leading -100 labels."""
    start, end = bounds[k], bounds[k + 1]
    n = 0
    while start + n < end and labels[start + n] == -100:
        n += 1
    return n


def pack_to_pairs(pack: dict) -> list[dict]:
    """The pairs of a checked pack as :class:`~nemo_dpo.data.DPOModelDataset` items, each sequence
    unpadded (``dpo_custom_collate`` pads a batch to its longest)."""
    return [_pair(pack, p) for p in range(len(pack["lengths"]) // 2)]


def _pair(pack: dict, p: int) -> dict:
    """Pair ``p`` of a checked pack (sequences ``2p`` and ``2p + 1``)."""
    ids, labels, bounds, reward = pack["input_ids"], pack["labels"], pack["seq_boundaries"], pack["reward"]
    item = {}
    for side, k in (("chosen", 2 * p), ("rejected", 2 * p + 1)):
        start, end = bounds[k], bounds[k + 1]
        item[side] = torch.tensor(ids[start:end], dtype=torch.long)
        item[f"{side}_labels"] = torch.tensor(labels[start:end], dtype=torch.long)
        item[f"{side}_length"] = end - start
        item[f"{side}_reward"] = float(reward[k])
    return item


def make_pack(items: list[dict]) -> dict:
    """One pack in NeMo Aligner's layout from :class:`~nemo_dpo.data.DPOModelDataset` items (plain lists)."""
    pack = {"input_ids": [], "labels": [], "reward": [], "lengths": [], "seq_boundaries": [0]}
    for item in items:
        for side in ("chosen", "rejected"):
            length = int(item[f"{side}_length"])
            pack["input_ids"].extend(int(t) for t in item[side][:length])
            pack["labels"].extend(int(t) for t in item[f"{side}_labels"][:length])
            pack["reward"].append(float(item[f"{side}_reward"]))
            pack["lengths"].append(length)
            pack["seq_boundaries"].append(len(pack["input_ids"]))
    return pack


def pack_pairs(sizes: list[int], pack_size: int, algorithm: str, seed: int) -> list[list[int]]:
    """Bins of pair indices (each pair ``sizes[i]`` tokens, chosen + rejected) of at most ``pack_size`` tokens.

    ``first_fit_decreasing``: largest first (tightest packs, short pairs end up
    together); ``first_fit_shuffle``: first fit in an order shuffled by ``seed``.
    """
    if algorithm not in PACKING_ALGORITHMS:
        raise ValueError(f"packing algorithm {algorithm!r} is not one of {list(PACKING_ALGORITHMS)}")
    too_big = [s for s in sizes if s > pack_size]
    if too_big:
        raise ValueError(f"a pair of {max(too_big)} tokens (chosen + rejected) does not fit pack_size={pack_size}")
    if algorithm == "first_fit_decreasing":
        return first_fit_decreasing(sizes, pack_size)
    order = list(range(len(sizes)))
    random.Random(seed).shuffle(order)
    return first_fit(sizes, pack_size, order)


def save_packed_npy(path: str | Path, packs: list[dict]) -> None:
    """Write ``packs`` as NeMo Aligner does: ``np.save`` of an object array of dicts of plain lists."""
    array = np.empty(len(packs), dtype=object)
    for i, pack in enumerate(packs):
        array[i] = pack
    with io.open(path, "wb") as f:
        np.save(f, array, allow_pickle=True)


class DPOPackedDataset(Dataset):
    """NeMo Aligner's ``DPOPackedDataset``: the pairs of a packed ``.npy`` file, with its constructor.

    ``data_prefix`` is the ``.npy`` path, read with :func:`load_packed_npy` (never
    ``np.load(allow_pickle=True)``) unless ``data`` gives the packs; ``documents``
    selects pack indices (all when None). Every pack is checked (:func:`check_pack`,
    token ids within the tokenizer's vocabulary, sequences at most ``seq_length``),
    each error one line naming the file and the pack.

    Unlike NeMo Aligner, an item is one *pair* (a :class:`~nemo_dpo.data.DPOModelDataset`
    item), not one pack, and ``global_batch_size`` counts pairs, as in unpacked
    training, so a global batch, its loss (the mean over its pairs), the samplers,
    resumption and the reference log-prob cache are those of the same pairs read from
    JSONL. The file's packs are not kept as micro-batches: with ``model.data.packing``
    the model re-packs each global batch's pairs itself (several packs per micro-batch,
    any micro-batch size, CPU or GPU, no transformer-engine needed, where NeMo
    Aligner's reader requires micro-batch size 1 and transformer-engine).
    ``pack(i)``/``num_packs`` give the checked packs.
    """

    def __init__(self, cfg, tokenizer, name: str, data_prefix, documents, data, seq_length: int, seed: int,
                 drop_last: bool = True):
        super().__init__()
        self.cfg, self.tokenizer, self.name, self.data_prefix = cfg, tokenizer, name, data_prefix
        self.seq_length, self.seed, self.drop_last = seq_length, seed, drop_last
        where = str(data_prefix) if data_prefix is not None else name
        packs = load_packed_npy(data_prefix) if data is None else list(data)
        documents = range(len(packs)) if documents is None else [int(i) for i in documents]
        vocab_size = getattr(tokenizer, "vocab_size", None) if tokenizer is not None else None
        self._packs = []
        self._pairs: list[tuple[int, int]] = []  # (pack, pair within it) of each item
        for i in documents:
            pack = check_pack(packs[i], f"{where}: pack {i}", vocab_size)
            longest = max(pack["lengths"])
            if seq_length is not None and longest > seq_length:
                raise PackedDataError(f"{where}: pack {i}: a sequence of {longest} tokens exceeds "
                                      f"seq_length={seq_length}")
            self._pairs.extend((len(self._packs), p) for p in range(len(pack["lengths"]) // 2))
            self._packs.append(pack)
        if not self._pairs:
            raise PackedDataError(f"{where}: no packs")

    @property
    def num_packs(self) -> int:
        return len(self._packs)

    def pack(self, i: int) -> dict:
        return self._packs[i]

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if idx < 0:
            raise IndexError(f"{self.name}: index {idx} < 0 (padding markers are handled by build_dataloader)")
        pack, pair = self._pairs[idx]
        return _pair(self._packs[pack], pair)

    def global_collate_fn(self, batch: list[dict], eos_id: int, reset_position_ids: bool = False,
                          reset_attention_mask: bool = False, eod_mask_loss: bool = False,
                          pad_length_to_multiple_of: int | None = None, **kwargs) -> dict[str, torch.Tensor]:
        """The padded batch :func:`~nemo_dpo.data.dpo_custom_collate` makes of these pairs.

        Items may also be raw packs (dicts with ``seq_boundaries``), as NeMo Aligner's
        dataset yields: each is checked and unpacked into its pairs.
        """
        pairs = []
        for item in batch:
            if "seq_boundaries" in item:
                pairs.extend(pack_to_pairs(check_pack(item, f"{self.name}: pack")))
            else:
                pairs.append(item)
        return dpo_custom_collate(pairs, eos_id, reset_position_ids, reset_attention_mask, eod_mask_loss,
                                  pad_length_to_multiple_of, **kwargs)
