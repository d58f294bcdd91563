"""Sequence packing: packed micro-batches give the unpacked log-probs, losses and gradients."""

import math

import pytest
import torch

from dpo_workers import padded_and_packed_logprobs, step0_logprobs, synthetic_pairs, train_dpo
from nemo_dpo.data.collate import dpo_custom_collate
from nemo_dpo.data.packing import block_causal_mask, first_fit_decreasing, pack_padded_batch


def test_first_fit_decreasing_fills_bins_in_decreasing_order():
    assert first_fit_decreasing([5, 3, 7, 2, 4], 10) == [[2, 1], [0, 4], [3]]
    with pytest.raises(ValueError, match="pack_tokens=6"):
        first_fit_decreasing([7], 6)


def test_block_causal_mask_blocks_other_sequences_and_the_future():
    allowed = ~block_causal_mask(torch.tensor([[0, 0, 1, 1, 1, -1]]))[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)


def test_pack_layout_and_round_trip():
    items = synthetic_pairs(5, seed=4)
    batch = dpo_custom_collate(items, eos_id=0)
    values = torch.randn(10, batch["chosen"].shape[1] - 1)
    batch["ref_policy_log_probs_chosen"], batch["ref_policy_log_probs_rejected"] = values.chunk(2)
    plan = pack_padded_batch(batch, pack_tokens=40, length_multiple=4)
    assert sum(mb.num_pairs for mb in plan.micro_batches) == 5
    lengths = torch.cat([batch["chosen_length"], batch["rejected_length"]])
    for mb in plan.micro_batches:
        assert mb.tokens.shape[0] == 1 and mb.tokens.shape[1] % 4 == 0 and mb.tokens.shape[1] <= 40
        segs = mb.segment_ids[0]
        for seq in range(2 * mb.num_pairs):
            where = (segs == seq).nonzero().flatten()
            assert torch.equal(mb.position_ids[0, where], torch.arange(len(where)))  # positions restart
            # Trained tokens of each sequence: those of its padded row.
            assert (mb.target_segments() == seq).sum() > 0
    # Every trained token is counted once, in one sequence.
    counted = sum(int((mb.target_segments() >= 0).sum()) for mb in plan.micro_batches)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:]
    assert counted == int((labels > -1).sum())
    # Reference log-probs travel with their tokens and come back where they were.
    unpacked = plan.unpack_token_values([mb.ref_logprobs for mb in plan.micro_batches])
    real = torch.arange(values.shape[1])[None] < (lengths[:, None] - 1)
    assert torch.equal(unpacked[real], values[real]) and not unpacked[~real].any()


@pytest.mark.parametrize("tp,pp,world", [(1, 1, 1), (2, 1, 2)])
def test_packed_logprobs_equal_each_sequence_alone(dist_pool, tp, pp, world):
    # Would fail if a token attended across sequences or positions did not restart per sequence.
    out = dist_pool.run(world, padded_and_packed_logprobs, tp, pp, synthetic_pairs(6, seed=2), 60)[0]
    assert max(out["packs"]) > 1  # pairs do share rows
    real = torch.arange(out["padded"].shape[1])[None] < (out["lengths"][:, None] - 1)
    torch.testing.assert_close(out["packed"][real], out["padded"][real], rtol=0, atol=1e-6)


LN2_FP32 = float(torch.tensor(2.0).log())
PACKED = dict(packing=True, pack_tokens=40)  # two or three pairs a pack: a varying number of micro-batches


@pytest.mark.parametrize("tp,pp,world", [(1, 1, 1), (2, 1, 2), (1, 2, 2), (1, 1, 2)], ids=str)
def test_packed_step0_loss_is_ln2_and_acc_0(dist_pool, tp, pp, world):
    for out in dist_pool.run(world, step0_logprobs, tp, pp, 2, synthetic_pairs(8, seed=1), None, 32, PACKED):
        assert torch.equal(out["policy"], out["reference"])  # bitwise
        assert out["loss"] == LN2_FP32 and out["metrics"]["acc"] == 0.0


@pytest.fixture(scope="module")
def unpacked_run(dist_pool, tmp_path_factory):
    items = synthetic_pairs(19, seed=5)
    return items, dist_pool.run(1, train_dpo, 1, 1, 2, 8, 5, items, str(tmp_path_factory.mktemp("unpacked")))[0]


@pytest.mark.parametrize("tp,pp,world", [(1, 1, 1), (2, 1, 2), (1, 2, 2), (1, 1, 2)], ids=str)
def test_packed_training_equals_unpacked(dist_pool, unpacked_run, tmp_path, tp, pp, world):
    items, expected = unpacked_run
    got = dist_pool.run(world, train_dpo, tp, pp, 2, 8, 5, items, str(tmp_path), None, 32, None, False, PACKED)[0]
    for key in ("train/loss", "train/acc", "train/sft_loss", "train/rewards_chosen_mean", "train/rewards_all_std",
                "train/grad_norm", "val/loss", "val/acc"):
        want = [r[key] for r in expected["records"] if key in r]
        assert len(want) == (1 if key.startswith("val") else 5)
        assert [r[key] for r in got["records"] if key in r] == pytest.approx(want, abs=1e-5), key
