"""bf16 training: bf16 weights and compute, fp32 log-softmax, fp32 master weights in megatron's optimizer."""

import pytest
import torch

from dpo_workers import bf16_master_weights, step0_logprobs, synthetic_pairs, train_dpo
from test_dpo_training import LN2_FP32

BF16_LAYOUTS = [(2, 1, 2), (1, 2, 2), (1, 1, 2)]
# A DPO-like rate for this tiny model: at 5e-3 (loss 0.69 -> 0.09 in five steps) Adam's
# sign-like first steps amplify bf16 reduction-order noise to 3.4e-3 relative by step 5.
BF16_OPTIM = {"lr": 1e-3}


def _losses(records):
    return [r["train/loss"] for r in records if "train/loss" in r]


@pytest.fixture(scope="module")
def bf16_single_process(dist_pool, tmp_path_factory):
    items = synthetic_pairs(19)
    (result,) = dist_pool.run(1, train_dpo, 1, 1, 2, 4, 5, items, str(tmp_path_factory.mktemp("bf16")), None, "bf16",
                              BF16_OPTIM)
    return items, _losses(result["records"])


@pytest.mark.parametrize("tp,pp,world", BF16_LAYOUTS, ids=str)
def test_bf16_losses_agree_across_layouts(dist_pool, bf16_single_process, tmp_path, tp, pp, world):
    """Five bf16 steps at TP=2, PP=2 and DP=2 give the single process's losses within 2e-3 relative.

    bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 2e-3), and a layout changes the
    order of bf16 reductions, so the losses agree to about one bf16 rounding of the log-probs.
    """
    items, reference = bf16_single_process
    got = _losses(dist_pool.run(world, train_dpo, tp, pp, 2, 4, 5, items, str(tmp_path), None, "bf16",
                                BF16_OPTIM)[0]["records"])
    assert len(got) == len(reference) == 5
    assert reference[0] == LN2_FP32
    for step, (a, b) in enumerate(zip(got, reference)):
        assert a == pytest.approx(b, rel=2e-3), step
    assert reference[-1] < reference[0]  # and it trains


def test_bf16_step0_reference_equals_policy_and_loss_is_exactly_ln2(dist_pool):
    """Same bf16 kernels for policy and reference: bitwise equal fp32 log-probs, log-ratios exactly 0.

    The loss is computed in fp32 from those log-probs, so it is -logsigmoid(0) in fp32
    with no tolerance: bf16 rounds the log-probs of both passes identically.
    """
    (r,) = dist_pool.run(1, step0_logprobs, 1, 1, 2, synthetic_pairs(4), None, "bf16")
    assert r["policy"].dtype == torch.float32
    assert torch.equal(r["policy"], r["reference"])
    assert r["loss"] == LN2_FP32 and r["metrics"]["acc"] == 0.0


def test_fp32_master_weights_keep_updates_below_bf16_resolution(dist_pool):
    """The bf16 weights are their fp32 masters rounded to bf16; tiny updates accumulate in the masters.

    With lr 1e-5 an Adam step moves a weight by about 1e-5, below half a bf16 step (about
    6e-5 at the weights' magnitude of 0.02): after one step most bf16 weights are unchanged
    while their masters moved; after 20 steps the accumulated change shows in the bf16 weights.
    """
    snap = dist_pool.run(1, bf16_master_weights, 20, 1e-5, synthetic_pairs(4, seed=2))[0]
    initial, first_model, first_master = (torch.cat([t.flatten().float() for t in snap[k]])
                                          for k in ("initial", "first_model", "first_master"))
    model, master = torch.cat([t.flatten() for t in snap["model"]]), torch.cat([t.flatten() for t in snap["master"]])
    assert model.dtype == torch.bfloat16 and master.dtype == torch.float32
    assert torch.equal(model, master.to(torch.bfloat16))  # at most bf16 rounding apart
    masters_moved = (first_master != initial).float().mean().item()
    bf16_moved_first = (first_model != initial).float().mean().item()
    assert masters_moved > 0.9 and bf16_moved_first < 0.2
    bf16_moved = (model.float() != initial).float().mean().item()
    assert bf16_moved > 2 * bf16_moved_first  # the small steps added up
    assert (master - initial).abs().mean().item() == pytest.approx(20 * 1e-5, rel=0.5)
