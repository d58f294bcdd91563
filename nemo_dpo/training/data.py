"""Datasets and data loaders from ``model.data``."""

from __future__ import annotations

import logging
from pathlib import Path

from megatron.core import parallel_state
from omegaconf import DictConfig
from torch.utils.data import DataLoader

import nemo_dpo
from nemo_dpo.data import (
    BlendedDataset,
    DPOModelDataset,
    DPOPackedDataset,
    MegatronPretrainingBatchSampler,
    MegatronPretrainingRandomBatchSampler,
    build_dataloader,
    split_data_prefix,
)
from nemo_dpo.data.formats import NEMO_FIELD_NAMES, FieldNames
from nemo_dpo.parallel.collectives import is_rank0

log = logging.getLogger(__name__)

# Used for the splits when model.data.data_prefix names no training file.
DEFAULT_DATA_DIR = Path(nemo_dpo.__file__).resolve().parent / "assets" / "default_data"
DATA_IMPLS = ("jsonl", "packed_jsonl")


def check_data_impl(data_cfg: DictConfig) -> None:
    """Refuse a ``model.data.data_impl`` the dataset builder cannot read, and ``field_names`` it would not use."""
    impl = data_cfg.get("data_impl", "jsonl")
    if impl not in DATA_IMPLS:
        raise ValueError(f"model.data.data_impl={impl!r} is not supported; valid values: {list(DATA_IMPLS)}")
    field_names = FieldNames.from_config(data_cfg.get("field_names"))
    if impl == "packed_jsonl" and field_names != NEMO_FIELD_NAMES:
        raise ValueError("model.data.field_names names the fields of preference records; packed .npy files "
                         "(data_impl=packed_jsonl) hold token ids: leave it at its default")


def build_dataset(model_cfg: DictConfig, tokenizer, split: str) -> DPOModelDataset | BlendedDataset | None:
    """The ``split`` dataset (train, validation or test) of ``model.data``; None when it has no data.

    ``model.data.data_prefix`` takes NeMo Aligner's forms (see :mod:`nemo_dpo.data.blending`):
    a path, a one-element list, a blend ``[w1, path1, w2, path2, ...]`` (a
    :class:`BlendedDataset` seeded by ``model.seed``), or a dict of those per split.
    Without training data, train and validation fall back to the embedded default data.
    With ``data_impl: packed_jsonl`` the paths are NeMo Aligner's packed ``.npy`` files,
    read as :class:`DPOPackedDataset` (one item per pair; the model re-packs).
    """
    data_cfg = model_cfg.data
    check_data_impl(data_cfg)
    data_prefix = data_cfg.get("data_prefix")
    blend = split_data_prefix(data_prefix, split)
    packed = data_cfg.get("data_impl", "jsonl") == "packed_jsonl"
    if blend is None and split != "test" and split_data_prefix(data_prefix, "train") is None:
        if packed:
            raise ValueError("model.data.data_impl='packed_jsonl' needs model.data.data_prefix to name the packed "
                             ".npy files (the embedded default data is JSONL)")
        blend = [(1.0, DEFAULT_DATA_DIR / f"{split}.jsonl")]
    if blend is None:
        return None
    seq_length = data_cfg.seq_length or model_cfg.encoder_seq_length
    # A weight-0 file is checked but never drawn from, so it is not read.
    used = [(weight, path) for weight, path in blend if weight > 0]
    datasets = [
        (DPOPackedDataset if packed else DPOModelDataset)(model_cfg, tokenizer, split, path, None, None, seq_length,
                                                          model_cfg.seed) for _, path in used
    ]
    if len(datasets) == 1:
        return datasets[0]
    return BlendedDataset(datasets, [weight for weight, _ in used], seed=model_cfg.seed)


def _sampler_args(model_cfg: DictConfig, dataset, consumed_samples: int) -> dict:
    return dict(
        total_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=model_cfg.micro_batch_size,
        global_batch_size=model_cfg.global_batch_size,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
    )


def build_train_dataloader(model_cfg: DictConfig, dataset, consumed_samples: int = 0) -> DataLoader:
    """Shuffled global batches (seeded by ``model.seed``), continuing after ``consumed_samples``."""
    sampler = MegatronPretrainingRandomBatchSampler(
        **_sampler_args(model_cfg, dataset, consumed_samples), seed=model_cfg.seed
    )
    return build_dataloader(dataset, sampler, num_workers=model_cfg.data.num_workers)


def build_val_dataloader(model_cfg: DictConfig, dataset) -> DataLoader:
    """Global batches in dataset order, the last one padded; no batches (and a warning) without a dataset."""
    if dataset is None:
        if is_rank0():
            log.warning("no validation data (model.data.data_prefix.validation is null): training without validation")
        return DataLoader([], batch_sampler=[])
    sampler = MegatronPretrainingBatchSampler(**_sampler_args(model_cfg, dataset, 0))
    return build_dataloader(dataset, sampler, num_workers=model_cfg.data.num_workers)
