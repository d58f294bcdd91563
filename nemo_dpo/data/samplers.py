"""Megatron-style batch samplers driven by ``consumed_samples``, and the DataLoader around them.

Every step covers one global batch: ``global_batch_size`` consecutive positions of
the epoch's sample order. Data-parallel rank ``r`` receives positions ``r, r + dp,
r + 2 dp, ...`` of it (``global_batch_size // dp`` indices, which the trainer splits
into micro-batches); striding, as NeMo's sequential sampler does, spreads the padding
of a last partial batch over the ranks. As the order is defined on global batches,
what a step sees does not depend on the data-parallel size, and ``consumed_samples``
alone says where a run stands.

When the last global batch of an epoch is incomplete and kept (``drop_last=False``),
it is filled with :data:`PAD_INDEX`, so every step has the same number of
micro-batches; :func:`build_dataloader` serves those as copies of a real item flagged
``sample_mask=0.0``, which the loss must leave out.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "PAD_INDEX",
    "MegatronPretrainingBatchSampler",
    "MegatronPretrainingRandomBatchSampler",
    "PaddedIndexDataset",
    "build_dataloader",
    "identity_collate",
]

PAD_INDEX = -1


class _MegatronBatchSampler:
    """Shared bookkeeping; subclasses define the sample order of an epoch."""

    # Whether iterating moves ``consumed_samples`` on, so the next ``iter()`` resumes
    # (training) rather than starting over (validation).
    advances = False

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        global_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool,
    ):
        if total_samples <= 0:
            raise ValueError(f"no samples to draw from: total_samples={total_samples}")
        if micro_batch_size <= 0 or data_parallel_size <= 0 or consumed_samples < 0:
            raise ValueError("micro_batch_size and data_parallel_size must be > 0, consumed_samples >= 0")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        if global_batch_size % (micro_batch_size * data_parallel_size):
            raise ValueError(
                f"global_batch_size ({global_batch_size}) is not divisible by micro_batch_size "
                f"({micro_batch_size}) x data_parallel_size ({data_parallel_size})"
            )
        if consumed_samples % global_batch_size:
            # Steps start at multiples of the global batch; anything else is not a step boundary.
            raise ValueError(
                f"consumed_samples ({consumed_samples}) is not a multiple of "
                f"global_batch_size ({global_batch_size})"
            )
        if drop_last and total_samples < global_batch_size:
            raise ValueError(
                f"{total_samples} samples do not fill one global batch of {global_batch_size} (drop_last=True)"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.drop_last = drop_last

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return self.total_samples // self.global_batch_size
        return -(-self.total_samples // self.global_batch_size)

    @property
    def samples_per_epoch(self) -> int:
        """``consumed_samples`` grows by this much per epoch (padding included)."""
        return self.steps_per_epoch * self.global_batch_size

    def __len__(self) -> int:
        """Steps left in the current epoch."""
        return (self.samples_per_epoch - self.consumed_samples % self.samples_per_epoch) // self.global_batch_size

    def epoch_order(self, epoch: int) -> list[int]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.consumed_samples, self.samples_per_epoch)
        order = self.epoch_order(epoch)
        order += [PAD_INDEX] * (self.samples_per_epoch - len(order))
        for start in range(offset, self.samples_per_epoch, self.global_batch_size):
            if self.advances:
                self.consumed_samples += self.global_batch_size
            global_batch = order[start : start + self.global_batch_size]
            yield global_batch[self.data_parallel_rank :: self.data_parallel_size]


class MegatronPretrainingBatchSampler(_MegatronBatchSampler):
    """Samples in file order, for validation.

    By default (``drop_last=False``) every sample is seen exactly once per pass, the last
    global batch being padded with :data:`PAD_INDEX`. Each ``iter()`` starts again from
    ``consumed_samples``.
    """

    def __init__(self, *args, drop_last: bool = False, **kwargs):
        super().__init__(*args, drop_last=drop_last, **kwargs)

    def epoch_order(self, epoch: int) -> list[int]:
        return list(range(self.total_samples))


class MegatronPretrainingRandomBatchSampler(_MegatronBatchSampler):
    """Samples in a random order drawn per epoch from ``seed + epoch``, for training.

    Iterating yields the rest of the current epoch and advances ``consumed_samples``, so
    the next ``iter()`` starts the next epoch (a prefetching DataLoader runs ahead of
    training: checkpoint the trainer's own count, as NeMo Aligner does). A sampler built
    with the ``consumed_samples`` of a checkpoint continues with exactly the indices an
    uninterrupted run would have drawn. With ``drop_last`` (the default) the samples left over after the last full
    global batch are skipped for that epoch; which ones changes from epoch to epoch.
    """

    advances = True

    def __init__(self, *args, drop_last: bool = True, seed: int = 0, **kwargs):
        super().__init__(*args, drop_last=drop_last, **kwargs)
        self.seed = seed

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.total_samples, generator=generator).tolist()


class PaddedIndexDataset(Dataset):
    """Serves :data:`PAD_INDEX` as a copy of item 0 with ``sample_mask=0.0``; real items get 1.0.

    Every item also carries its ``sample_index`` (PAD_INDEX for padding), so a
    failing step can name the samples it was made of.

    A copy of a real item (rather than an empty one) keeps every tensor well formed, so
    the loss stays finite before the mask zeroes it.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        if idx == PAD_INDEX:
            return {**copy.deepcopy(self.dataset[0]), "sample_mask": 0.0, "sample_index": PAD_INDEX}
        return {**self.dataset[idx], "sample_mask": 1.0, "sample_index": idx}


def identity_collate(batch: list) -> list:
    """Keep the list of items: DPO collation runs later, outside the loader's workers."""
    return batch


def build_dataloader(
    dataset: Dataset,
    sampler: _MegatronBatchSampler,
    collate_fn: Callable | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over ``dataset`` driven by the batch ``sampler``; padding markers become masked items.

    ``collate_fn`` defaults to :func:`identity_collate`, as in NeMo Aligner's DPO recipe.
    """
    return DataLoader(
        PaddedIndexDataset(dataset),
        batch_sampler=sampler,
        collate_fn=collate_fn or identity_collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
