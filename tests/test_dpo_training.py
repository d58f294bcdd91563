"""DPO end to end on a tiny model: step-0 identities and layout-independent training."""

import math

import pytest
import torch

from dpo_workers import step0_logprobs, synthetic_pairs, train_dpo

LN2_FP32 = torch.tensor(math.log(2), dtype=torch.float32).item()
LAYOUTS = [(1, 1, 1), (2, 1, 2), (1, 2, 2), (1, 1, 2)]


@pytest.mark.parametrize("tp,pp,world", LAYOUTS, ids=str)
def test_step0_reference_equals_policy_and_loss_is_ln2(dist_pool, tp, pp, world):
    items = synthetic_pairs(4)
    results = dist_pool.run(world, step0_logprobs, tp, pp, 2, items)
    for r in results:
        assert torch.equal(r["policy"], r["reference"])  # bitwise
        assert r["loss"] == LN2_FP32  # -logsigmoid(0) in fp32, exactly
        assert r["metrics"]["preference_loss"] == LN2_FP32
        assert r["metrics"]["acc"] == 0.0
        assert r["metrics"]["rewards_all_mean"] == 0.0


@pytest.mark.parametrize("average", [False, True])
def test_sft_term_is_weighted_negative_chosen_logprob(dist_pool, average):
    items = synthetic_pairs(4, seed=5)
    weight = 0.25
    dpo = dict(sft_loss_weight=weight, preference_average_log_probs=average)
    (r,) = dist_pool.run(1, step0_logprobs, 1, 1, 2, items, dpo)
    chosen_logprobs, chosen_labels = r["policy"][:4].double(), r["labels"][:4]
    per_pair = [
        sum(lp for lp, lab in zip(row.tolist(), labels.tolist()) if lab != -100)
        / (sum(lab != -100 for lab in labels.tolist()) if average else 1)
        for row, labels in zip(chosen_logprobs, chosen_labels)
    ]
    sft = -sum(per_pair) / len(per_pair)
    assert r["metrics"]["sft_loss"] == pytest.approx(sft, rel=1e-6)
    assert r["metrics"]["preference_loss"] == LN2_FP32
    assert r["loss"] == pytest.approx(LN2_FP32 + weight * sft, rel=1e-6)


def test_unknown_preference_loss_fails_at_start_listing_valid_names():
    from omegaconf import OmegaConf

    from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel

    cfg = OmegaConf.create({"dpo": {"preference_loss": "dpo_typo"}})
    with pytest.raises(ValueError, match=r"unknown preference_loss 'dpo_typo'; valid names: dpo, ipo, rpo_bwd_kl"):
        MegatronGPTDPOModel(cfg, vocab_size=10)


@pytest.fixture(scope="module")
def single_process_run(dist_pool, tmp_path_factory):
    items = synthetic_pairs(19)
    records = dist_pool.run(1, train_dpo, 1, 1, 2, 4, 5, items, str(tmp_path_factory.mktemp("ref")))[0]["records"]
    return items, records


def _series(records, key):
    return [r[key] for r in records if key in r]


def test_five_steps_train_and_validate(single_process_run):
    _, records = single_process_run
    losses = _series(records, "train/loss")
    assert len(losses) == 5 and losses[0] == LN2_FP32
    assert losses[-1] < losses[0]
    assert _series(records, "train/consumed_samples") == [4, 8, 12, 16, 20]
    assert _series(records, "train/epoch") == [1, 1, 1, 1, 2]  # 19 pairs: 4 steps of 4 per epoch
    lrs = _series(records, "train/lr")
    assert lrs[0] == pytest.approx(5e-3 / 2)  # NeMo warmup: max_lr * (step + 1) / (warmup + 1)
    assert len(_series(records, "val/loss")) == 1
    assert all(0.0 <= a <= 1.0 for a in _series(records, "train/acc"))


@pytest.mark.parametrize("tp,pp,world,micro", [(1, 1, 1, 1), (2, 1, 2, 2), (1, 2, 2, 2), (1, 1, 2, 2)], ids=str)
def test_losses_match_across_layouts(dist_pool, single_process_run, tmp_path, tp, pp, world, micro):
    items, expected = single_process_run
    got = dist_pool.run(world, train_dpo, tp, pp, micro, 4, 5, items, str(tmp_path))[0]["records"]
    for key in ("train/loss", "train/acc", "train/rewards_chosen_mean", "train/grad_norm", "val/loss", "val/acc"):
        assert _series(got, key) == pytest.approx(_series(expected, key), abs=1e-5), key


CHUNKED = dict(log_prob_chunk_size=7)  # a last partial chunk on every micro-batch


@pytest.mark.parametrize("tp,pp,world", [(1, 1, 1), (2, 1, 2), (1, 2, 2)], ids=str)
def test_chunked_logprobs_step0_identities_and_values(dist_pool, tp, pp, world):
    items = synthetic_pairs(4)
    chunked = dist_pool.run(world, step0_logprobs, tp, pp, 2, items, CHUNKED)
    plain = dist_pool.run(world, step0_logprobs, tp, pp, 2, items)
    for c, p in zip(chunked, plain):
        assert torch.equal(c["policy"], c["reference"])  # bitwise
        assert c["loss"] == LN2_FP32
        torch.testing.assert_close(c["policy"], p["policy"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("tp,world", [(1, 1), (2, 2)], ids=str)
def test_chunked_logprobs_train_like_whole_logits(dist_pool, tmp_path, tp, world):
    items = synthetic_pairs(19)
    runs = [dist_pool.run(world, train_dpo, tp, 1, 2, 4, 5, items, str(tmp_path / name), dpo)[0]["records"]
            for name, dpo in (("plain", None), ("chunked", CHUNKED))]
    for key in ("train/loss", "train/acc", "val/loss"):
        assert _series(runs[1], key) == pytest.approx(_series(runs[0], key), abs=1e-6), key
    # Norms of about 5, summed in fp32 over every gradient element: relative, not absolute, agreement.
    assert _series(runs[1], "train/grad_norm") == pytest.approx(_series(runs[0], "train/grad_norm"), rel=1e-6)


def test_chunk_size_must_be_positive():
    from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import DPOSettings

    with pytest.raises(ValueError, match="log_prob_chunk_size=0 must be a positive integer"):
        DPOSettings(log_prob_chunk_size=0)
