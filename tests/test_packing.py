"""Packing, with and without shared prompts: packed micro-batches give the unpacked log-probs, losses, gradients."""

import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from dpo_workers import padded_and_packed_logprobs, synthetic_pairs, train_dpo
from nemo_dpo.data.collate import dpo_custom_collate
from nemo_dpo.data.packing import (
    dense_block_mask,
    first_fit_decreasing,
    pack_padded_batch,
    shared_prompt_lengths,
)
from nemo_dpo.models.nlp.gpt.attention import SDPACoreAttention
from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import PackingSettings
from packing_workers import packing_modes, shared_prompt_logprobs, shared_prompt_step_under_recompute


def test_first_fit_decreasing_fills_bins_in_decreasing_order():
    assert first_fit_decreasing([5, 3, 7, 2, 4], 10) == [[2, 1], [0, 4], [3]]
    with pytest.raises(ValueError, match="pack_tokens=6"):
        first_fit_decreasing([7], 6)


def test_dense_block_mask_of_an_unshared_pair_a_shared_prompt_and_padding():
    # Pair 1: chosen 0-1, rejected 2-4. Pair 2: shared prompt 5-6, chosen part 7, rejected part 8-9. Padding 10.
    blocks = torch.tensor([[0, 0, 0, 2, 3], [0, 5, 2, 1, 2]])
    allowed = ~dense_block_mask(blocks, 1, 11)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)


def _pair(prompt, chosen, rejected, labelled_prompt=0):
    """A collatable item; the last ``labelled_prompt`` prompt tokens are trained on too."""
    item = {"chosen_reward": 1.0, "rejected_reward": 0.0}
    for side, response in (("chosen", chosen), ("rejected", rejected)):
        tokens = torch.tensor(prompt + response)
        labels = tokens.clone()
        labels[:len(prompt) - labelled_prompt] = -100
        item.update({side: tokens, f"{side}_labels": labels, f"{side}_length": len(tokens)})
    return item


def test_shared_prompt_length_stops_at_the_first_difference_or_trained_label():
    batch = dpo_custom_collate([
        _pair([5, 6, 7, 8], [9, 1], [3, 1]),      # prompt of 4: 3 shared, rejected restarts at token 3
        _pair([5, 6, 7], [9, 9, 1], [9, 4, 1]),   # equal first response token: still stops at the label
        _pair([5, 6, 7], [9, 1], [9, 1, 1], 1),   # a trained prompt token stops it earlier
        _pair([5], [9, 1], [4, 1]),               # a one-token prompt: nothing to share
        _pair([5, 6], [9, 1], [9, 2]),            # prompt of 2: 1 shared
    ], eos_id=0)
    assert shared_prompt_lengths(batch).tolist() == [3, 2, 1, 0, 1]
    batch["rejected_position_ids"] = batch["position_ids"] + (torch.arange(batch["chosen"].shape[1]) >= 1)
    assert shared_prompt_lengths(batch).tolist() == [0, 0, 0, 0, 0]  # positions differ from token 1 on


@pytest.mark.parametrize("shared_prompt", [False, True], ids=["unshared", "shared"])
def test_pack_layout_and_round_trip(shared_prompt):
    items = synthetic_pairs(5, seed=4)
    batch = dpo_custom_collate(items, eos_id=0)
    values = torch.randn(10, batch["chosen"].shape[1] - 1)
    # Log-probs of a shared prompt are the same for chosen and rejected, as a forward computes them.
    shared = shared_prompt_lengths(batch)
    rejected_prompt = torch.arange(values.shape[1])[None] < shared[:, None]
    values[5:][rejected_prompt] = values[:5][rejected_prompt]
    batch["ref_policy_log_probs_chosen"], batch["ref_policy_log_probs_rejected"] = values.chunk(2)
    plan = pack_padded_batch(batch, pack_tokens=40, length_multiple=4, shared_prompt=shared_prompt)
    assert sum(mb.num_pairs for mb in plan.micro_batches) == 5
    lengths = torch.cat([batch["chosen_length"], batch["rejected_length"]])
    saved = int(shared.sum()) if shared_prompt else 0
    assert shared.min() >= 2 and plan.counts.shared_prompt_saved == saved
    computed = sum(mb.tokens.shape[1] for mb in plan.micro_batches)
    assert plan.counts.computed == computed and plan.counts.padding == computed - int(lengths.sum()) + saved
    tokens = torch.cat([batch["chosen"], batch["rejected"]])
    for mb in plan.micro_batches:
        assert mb.tokens.shape[0] == 1 and mb.tokens.shape[1] % 4 == 0 and mb.tokens.shape[1] <= 40
        segs = mb.segment_ids[0]
        for k, (_, start, prompt, first, second) in enumerate(mb.blocks.tolist()):
            pair = [p for p in range(5) if torch.equal(mb.tokens[0, start:start + prompt + first],
                                                       tokens[p, :lengths[p]])]
            assert len(pair) == 1 and prompt == (int(shared[pair[0]]) if shared_prompt else 0)
            rejected = mb.tokens[0, start + prompt + first:start + prompt + first + second]
            assert torch.equal(rejected, tokens[5 + pair[0], prompt:lengths[5 + pair[0]]])
            assert (segs[start:start + prompt + first] == k).all() and (segs[start + prompt + first:][:second]
                                                                       == mb.num_pairs + k).all()
            # Positions count on from the prompt in the rejected part.
            assert torch.equal(mb.position_ids[0, start + prompt + first:][:second],
                               torch.arange(prompt, prompt + second))
    # Every trained token is counted once, in one sequence.
    counted = sum(int((mb.target_segments() >= 0).sum()) for mb in plan.micro_batches)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:]
    assert counted == int((labels > -1).sum())
    # Reference log-probs travel with their tokens and come back where they were.
    unpacked = plan.unpack_token_values([mb.ref_logprobs for mb in plan.micro_batches])
    real = torch.arange(values.shape[1])[None] < (lengths[:, None] - 1)
    assert torch.equal(unpacked[real], values[real]) and not unpacked[~real].any()


def _core_attention(dropout=0.0):
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               attention_dropout=dropout)
    return SDPACoreAttention(config, 1, AttnMaskType.causal, "self")


def test_blockwise_attention_equals_the_dense_mask_and_padding_is_finite():
    attention = _core_attention()
    torch.manual_seed(0)
    length = 30
    # Row 0: an unshared pair, a shared-prompt triple, padding; row 1: padding first, then a triple.
    blocks = torch.tensor([[0, 0, 0, 5, 4], [0, 9, 3, 4, 6], [1, 2, 6, 7, 9]])
    q = torch.randn(length, 2, 4, 8, requires_grad=True)
    kv = [torch.randn(length, 2, 2, 8, requires_grad=True) for _ in range(2)]
    blockwise = attention(q, *kv, blocks)
    dense = attention(q, *kv, dense_block_mask(blocks, 2, length))
    real = torch.zeros(length, 2, dtype=torch.bool)  # the blocks' tokens, [s, b] as the output
    for row, start, shared, first, second in blocks.tolist():
        real[start:start + shared + first + second, row] = True
    torch.testing.assert_close(blockwise[real], dense[real], rtol=0, atol=1e-6)
    assert torch.isfinite(blockwise).all() and not blockwise[~real].any()
    grads = torch.autograd.grad(blockwise[real].square().sum(), [q, *kv])
    dense_grads = torch.autograd.grad(dense[real].square().sum(), [q, *kv])
    for got, want in zip(grads, dense_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for bad in (torch.tensor([[0, 0, 0, 5, 4], [0, 8, 3, 4, 6]]), torch.tensor([[0, 20, 3, 4, 6]])):
        with pytest.raises(ValueError, match="overlaps another or passes the row's 30 tokens"):
            attention(q, *kv, bad)
    with pytest.raises(ValueError, match="names row 2 of a batch of 2"):
        attention(q, *kv, torch.tensor([[2, 0, 0, 5, 4]]))


def test_shared_prompt_needs_packing():
    with pytest.raises(ValueError, match="shared_prompt=true needs model.data.packing=true"):
        PackingSettings.from_config({"micro_batch_size": 1, "data": {"shared_prompt": True}})
    with pytest.raises(ValueError, match="model.data.shared_prompt='yes' must be true or false"):
        PackingSettings.from_config({"micro_batch_size": 1, "data": {"packing": True, "shared_prompt": "yes"}})


@pytest.mark.parametrize("tp,pp,world", [(1, 1, 1), (2, 1, 2)])
def test_packed_logprobs_equal_each_sequence_alone(dist_pool, tp, pp, world):
    # Would fail if a token attended across sequences or positions did not restart per sequence.
    out = dist_pool.run(world, padded_and_packed_logprobs, tp, pp, synthetic_pairs(6, seed=2), 60)[0]
    assert max(out["packs"]) > 1  # pairs do share rows
    real = torch.arange(out["padded"].shape[1])[None] < (out["lengths"][:, None] - 1)
    torch.testing.assert_close(out["packed"][real], out["padded"][real], rtol=0, atol=1e-6)


def test_shared_prompt_logprobs_equal_separate_prompt_response_forwards(dist_pool):
    out = dist_pool.run(1, shared_prompt_logprobs, synthetic_pairs(6, seed=2), 60)[0]
    real = torch.arange(out["unpacked"].shape[1])[None] < (out["lengths"][:, None] - 1)
    # Every position of every sequence, the rejected ones' shared prompts included.
    torch.testing.assert_close(out["shared"][real], out["unpacked"][real], rtol=0, atol=1e-6)
    assert out["saved"] > 0
    # Letting the rejected parts see the chosen ones changes their trained log-probs: the test would see it.
    trained_rejected = (out["labels"] > -1) & (torch.arange(12) >= 6)[:, None]
    assert (out["leaky"][trained_rejected] - out["unpacked"][trained_rejected]).abs().min() > 1e-4


LN2_FP32 = float(torch.tensor(2.0).log())
# Two or three pairs a pack (a varying number of micro-batches); one pair a pack with 26 tokens and shared prompts.
MODES = {
    "packed": dict(packing=True, pack_tokens=40),
    "shared_prompt": dict(packing=True, shared_prompt=True, pack_tokens=26),
    "packed_shared_prompt": dict(packing=True, shared_prompt=True, pack_tokens=40),
}
ITEMS = synthetic_pairs(19, seed=5)


@pytest.fixture(scope="module")
def unpacked_run(dist_pool, tmp_path_factory):
    return dist_pool.run(1, train_dpo, 1, 1, 2, 8, 5, ITEMS, str(tmp_path_factory.mktemp("unpacked")))[0]


def test_modes_pack_as_described():
    batch = dpo_custom_collate(ITEMS, eos_id=0)
    for name, data in MODES.items():
        plans = pack_padded_batch(batch, data["pack_tokens"], shared_prompt=data.get("shared_prompt", False))
        pairs = [mb.num_pairs for mb in plans.micro_batches]
        assert (max(pairs) == 1) == (name == "shared_prompt") and sum(pairs) == 19, name


@pytest.mark.parametrize("tp,pp,world", [(1, 1, 1), (2, 1, 2), (1, 2, 2), (1, 1, 2)], ids=str)
def test_packed_training_equals_unpacked(dist_pool, unpacked_run, tmp_path, tp, pp, world):
    expected = unpacked_run
    for name, got in dist_pool.run(world, packing_modes, tp, pp, ITEMS, str(tmp_path), MODES)[0].items():
        assert got["bitwise"] and got["loss0"] == LN2_FP32 and got["acc0"] == 0.0, name
        for key in ("train/loss", "train/acc", "train/sft_loss", "train/rewards_chosen_mean", "train/rewards_all_std",
                    "train/grad_norm", "val/loss", "val/acc"):
            want = [r[key] for r in expected["records"] if key in r]
            assert len(want) == (1 if key.startswith("val") else 5)
            assert [r[key] for r in got["records"] if key in r] == pytest.approx(want, abs=1e-5), (name, key)
        assert got["records"][0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_shared_prompt_packing_under_activation_recompute(dist_pool):
    # The pair blocks reach the attention through megatron's CheckpointFunction (saved, then recomputed).
    recompute = {
        "none": {},
        "selective": dict(activations_checkpoint_granularity="selective"),
        "full": dict(activations_checkpoint_granularity="full", activations_checkpoint_method="uniform",
                     activations_checkpoint_num_layers=1),
    }
    out = dist_pool.run(1, shared_prompt_step_under_recompute, synthetic_pairs(6, seed=3), recompute)[0]
    assert out["none"]["checkpointed"] == 0
    for name in ("selective", "full"):
        assert out[name]["checkpointed"] > 0 and out[name]["loss"] == pytest.approx(out["none"]["loss"], abs=1e-6)
        for got, want in zip(out[name]["grads"], out["none"]["grads"]):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_shared_prompt_packing_with_precomputed_reference_logprobs(dist_pool, unpacked_run, tmp_path):
    # The cache holds get_logprob_batch's padded layout, unpacked from (and packed back into) shared-prompt rows.
    cache = {"directory": str(tmp_path / "cache"), "parts": {}}
    data = MODES["packed_shared_prompt"]
    computed, reused = (dist_pool.run(1, train_dpo, 1, 1, 2, 8, 5, ITEMS, str(tmp_path / name), None, 32, None,
                                      False, data, 0, cache)[0] for name in ("computed", "reused"))
    assert computed["ref_forwards"] > 0 and reused["ref_forwards"] == 0
    for key in ("train/loss", "train/acc", "train/grad_norm", "val/loss", "val/acc"):
        want = [r[key] for r in unpacked_run["records"] if key in r]
        assert [r[key] for r in computed["records"] if key in r] == pytest.approx(want, abs=1e-5), key
        assert [r[key] for r in reused["records"] if key in r] == [r[key] for r in computed["records"] if key in r]


def test_transformer_engine_layers_are_refused_with_packing():
    from omegaconf import OmegaConf

    from nemo_dpo.models.nlp.gpt.builder import build_gpt_model

    cfg = OmegaConf.create({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "transformer_engine": True,
                            "data": {"packing": True}})
    with pytest.raises(ValueError, match="transformer_engine=true with model.data.packing=true: packed pair blocks "
                                         "need megatron-core's local layers"):
        build_gpt_model(cfg, 60)
