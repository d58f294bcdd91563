"""Megatron-style batch samplers: resume, DP slicing, per-epoch shuffling, validation coverage."""

import random

import pytest
import torch

from nemo_dpo.data.collate import dpo_custom_collate
from nemo_dpo.data.samplers import (
    PAD_INDEX,
    MegatronPretrainingBatchSampler,
    MegatronPretrainingRandomBatchSampler,
    build_dataloader,
)


def random_sampler(total=23, consumed=0, mbs=2, gbs=8, rank=0, dp=1, seed=7, drop_last=True):
    return MegatronPretrainingRandomBatchSampler(
        total_samples=total,
        consumed_samples=consumed,
        micro_batch_size=mbs,
        global_batch_size=gbs,
        data_parallel_rank=rank,
        data_parallel_size=dp,
        drop_last=drop_last,
        seed=seed,
    )


def steps(sampler, num_steps):
    """The first ``num_steps`` batches, re-entering ``iter()`` at each epoch end as a trainer does."""
    out = []
    while len(out) < num_steps:
        before = len(out)
        for batch in sampler:
            out.append(batch)
            if len(out) == num_steps:
                break
        assert len(out) > before, "an epoch yielded nothing"
    return out


@pytest.mark.parametrize("dp", [1, 2])
def test_resume_continues_identically(dp):
    total_steps = 12  # 23 samples, gbs 8: 2 steps per epoch, so six epochs
    for rank in range(dp):
        full = steps(random_sampler(rank=rank, dp=dp), total_steps)
        for k in [0, 1, 3, random.Random(dp).randrange(1, total_steps)]:
            resumed = random_sampler(consumed=k * 8, rank=rank, dp=dp)
            assert len(resumed) == 2 - k % 2
            assert steps(resumed, total_steps - k) == full[k:]


def test_dp_slices_partition_each_global_batch():
    single = steps(random_sampler(dp=1), 6)
    per_rank = [steps(random_sampler(rank=r, dp=2), 6) for r in range(2)]
    for step, global_batch in enumerate(single):
        slices = [per_rank[r][step] for r in range(2)]
        assert all(len(s) == 4 for s in slices)  # gbs // dp, i.e. 2 micro-batches of 2
        assert slices == [global_batch[0::2], global_batch[1::2]]  # same samples as DP=1, strided


def test_per_epoch_reshuffle_is_deterministic():
    sampler = random_sampler(total=16, gbs=8)
    epochs = [sum(steps(sampler, 2), []) for _ in range(3)]
    assert all(sorted(e) == list(range(16)) for e in epochs)  # each epoch sees every sample once
    assert epochs[0] != epochs[1] != epochs[2]
    again = random_sampler(total=16, gbs=8)
    assert [sum(steps(again, 2), []) for _ in range(3)] == epochs
    other_seed = random_sampler(total=16, gbs=8, seed=8)
    assert sum(steps(other_seed, 2), []) != epochs[0]


def test_drop_last_skips_leftover_samples():
    sampler = random_sampler(total=23, gbs=8)
    assert len(sampler) == 2 and sampler.samples_per_epoch == 16
    epoch = sum(steps(sampler, 2), [])
    assert len(set(epoch)) == 16 and sampler.consumed_samples == 16
    assert PAD_INDEX not in epoch


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_validation_sampler_covers_every_sample_once(dp):
    total, gbs = 21, 8
    seen = []
    for rank in range(dp):
        sampler = MegatronPretrainingBatchSampler(total, 0, 1, gbs, rank, dp)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 3
        assert all(len(b) == gbs // dp for b in batches)
        assert list(sampler) == batches  # a second pass starts over
        seen += sum(batches, [])
    assert sorted(i for i in seen if i != PAD_INDEX) == list(range(total))
    assert seen.count(PAD_INDEX) == 3 * gbs - total


def test_validation_sampler_order_and_drop_last():
    # Positions 8, 9 are real in the last batch: striding gives each rank one of them.
    assert list(MegatronPretrainingBatchSampler(10, 0, 1, 4, 0, 2)) == [[0, 2], [4, 6], [8, PAD_INDEX]]
    assert list(MegatronPretrainingBatchSampler(10, 0, 1, 4, 1, 2)) == [[1, 3], [5, 7], [9, PAD_INDEX]]
    assert list(MegatronPretrainingBatchSampler(10, 0, 1, 4, 0, 2, drop_last=True)) == [[0, 2], [4, 6]]
    assert list(MegatronPretrainingBatchSampler(10, 4, 1, 4, 0, 2)) == [[4, 6], [8, PAD_INDEX]]


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match="not divisible"):
        random_sampler(mbs=3, gbs=8)
    with pytest.raises(ValueError, match="not a multiple of global_batch_size"):
        random_sampler(consumed=4)
    with pytest.raises(ValueError, match="do not fill one global batch"):
        random_sampler(total=5)
    with pytest.raises(ValueError, match="data_parallel_rank 2"):
        random_sampler(rank=2, dp=2)


class PairDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, idx):
        if idx < 0:
            raise IndexError(idx)
        ids = torch.tensor([idx + 10] * (idx + 1))
        item = {f"{side}{key}": ids for side in ("chosen", "rejected") for key in ("", "_labels")}
        lengths = {"chosen_length": idx + 1, "rejected_length": idx + 1}
        return {**item, **lengths, "chosen_reward": 1.0, "rejected_reward": 0.0}


def test_dataloader_masks_padding():
    sampler = MegatronPretrainingBatchSampler(5, 0, 2, 4, 0, 1)
    batches = list(build_dataloader(PairDataset(), sampler))
    assert [len(b) for b in batches] == [4, 4]
    last = dpo_custom_collate(batches[1], eos_id=2)
    assert last["sample_mask"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert last["chosen"][:, 0].tolist() == [14, 10, 10, 10]  # padding entries are copies of item 0
