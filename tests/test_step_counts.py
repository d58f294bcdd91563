"""How many steps a DPO run takes: batch limits, steps per epoch, max_steps."""

from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from nemo_dpo.algorithms.dpo import _limit_batches, compute_max_steps, steps_per_epoch
from nemo_dpo.data import MegatronPretrainingRandomBatchSampler


@pytest.mark.parametrize("limit,expected", [
    (1.0, 10), (0.25, 2), (0.0, 0), (0.99, 9),  # a float takes that fraction, rounded down
    (3, 3), (1, 1), (50, 10), (0, 0),            # an int caps the count
])
def test_limit_batches(limit, expected):
    assert _limit_batches(10, limit) == expected


@pytest.mark.parametrize("limit", [1.5, -0.1])
def test_limit_batches_refuses_fractions_outside_0_1(limit):
    with pytest.raises(ValueError, match=r"fractional batch limit must lie in \[0, 1\]"):
        _limit_batches(10, limit)


def sampler(steps: int):
    return SimpleNamespace(steps_per_epoch=steps)


def test_steps_per_epoch_applies_limit_train_batches():
    assert steps_per_epoch(OmegaConf.create({}), sampler(10)) == 10
    assert steps_per_epoch(OmegaConf.create({"limit_train_batches": 0.5}), sampler(10)) == 5
    assert steps_per_epoch(OmegaConf.create({"limit_train_batches": 4}), sampler(10)) == 4


@pytest.mark.parametrize("max_steps,expected", [(None, 30), (-1, 30), (25, 25), (100, 30), (0, 0)])
def test_compute_max_steps_is_epochs_times_steps_capped_by_max_steps(max_steps, expected):
    cfg = OmegaConf.create({"max_epochs": 3, "max_steps": max_steps})
    assert compute_max_steps(cfg, sampler(10)) == expected


def test_compute_max_steps_with_a_real_sampler_and_limit():
    # 100 pairs in global batches of 8, the last partial one dropped: 12 steps an epoch.
    train_sampler = MegatronPretrainingRandomBatchSampler(100, 0, 2, 8, 0, 1, seed=0)
    assert train_sampler.steps_per_epoch == 12
    cfg = OmegaConf.create({"max_epochs": 2, "max_steps": -1, "limit_train_batches": 0.5})
    assert compute_max_steps(cfg, train_sampler) == 12
