"""megatron's DistributedOptimizer (ZeRO-1) on CPU/gloo: same updates as the replicated optimizer, half the state."""

import pytest

from dpo_workers import synthetic_pairs, train_dpo

SHARDED = {"name": "distributed_fused_adam"}


def _losses(result):
    return [r["train/loss"] for r in result["records"] if "train/loss" in r]


def test_sharded_state_is_halved_at_dp2_and_losses_match_replicated(dist_pool, tmp_path):
    items = synthetic_pairs(19)
    replicated = dist_pool.run(2, train_dpo, 1, 1, 2, 4, 5, items, str(tmp_path / "replicated"))
    sharded = dist_pool.run(2, train_dpo, 1, 1, 2, 4, 5, items, str(tmp_path / "sharded"), None, 32, SHARDED)
    (single,) = dist_pool.run(1, train_dpo, 1, 1, 2, 4, 5, items, str(tmp_path / "single"), None, 32, SHARDED)
    for got, want in zip(_losses(sharded[0]), _losses(replicated[0]), strict=True):
        assert got == pytest.approx(want, abs=1e-6)
    # Adam's two fp32 moments: all of them on one rank, half on each of two (up to bucket padding).
    assert replicated[0]["state_bytes"] == single["state_bytes"] > 0
    for rank in sharded:
        assert rank["state_bytes"] == pytest.approx(single["state_bytes"] / 2, rel=0.01)
