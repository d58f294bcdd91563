"""The same weights give the same outputs and the same training step at every (TP, PP, DP)."""

import pytest
import torch

from layout_workers import forward_and_train_step

VOCAB = 100
LR = 1e-2
WEIGHT_DECAY = 0.1  # layout_workers' AdamW
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
LAYOUTS = [  # (tp, pp, world size)
    (1, 1, 1), (2, 1, 2), (1, 2, 2), (1, 1, 2), (2, 2, 4),
]
MODELS = {
    "gpt2_tied": dict(
        num_layers=4, hidden_size=64, num_attention_heads=4, encoder_seq_length=16,
        normalization="layernorm", activation="gelu", position_embedding_type="learned_absolute",
        share_embeddings_and_output_weights=True, bias=True, make_vocab_size_divisible_by=16,
    ),
    "llama_gqa": dict(
        num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
        encoder_seq_length=16, normalization="rmsnorm", activation="swiglu",
        position_embedding_type="rope", rotary_base=500000, share_embeddings_and_output_weights=False,
        bias=False, make_vocab_size_divisible_by=16,
    ),
}


def assemble(results: list[dict]) -> dict:
    """Full logits, log-probs (batch order) and full weights from every rank's pieces."""
    last = sorted((r for r in results if r["last_stage"] and r["tp"] == 0), key=lambda r: r["dp"])
    logits = torch.cat([o["logits"] for r in last for o in r["outputs"]])
    logprobs = torch.cat([o["logprobs"] for r in last for o in r["outputs"]])
    return dict(logits=logits, logprobs=logprobs, weights=assemble_weights(results),
                initial_weights=assemble_weights(results, "initial_shards"), grad_norm=results[0]["grad_norm"])


def assemble_weights(results: list[dict], shards: str = "shards") -> dict[str, torch.Tensor]:
    """Full tensors by checkpoint key, put together from every rank's ``shards``."""
    weights: dict[str, torch.Tensor] = {}
    for r in results:
        for key, shape, offset, skip, values in r[shards]:
            full = weights.setdefault(key, torch.full(shape, float("nan")))
            index = tuple(slice(o, o + n) for o, n in zip(offset[skip:], values.shape))
            full[(*offset[:skip], *index)] = values
    return weights


@pytest.fixture(scope="module", params=sorted(MODELS))
def reference(request, dist_pool):
    name = request.param
    tokens = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(0))
    tokens[0, 1:5] = VOCAB - 1  # highest real id: the last entry before the vocab padding
    result = assemble(dist_pool.run(1, forward_and_train_step, 1, 1, MODELS[name], VOCAB, tokens, 2, LR))
    return name, tokens, result


@pytest.mark.parametrize("tp,pp,world", LAYOUTS[1:], ids=lambda v: str(v))
def test_layout_matches_single_process(dist_pool, reference, tp, pp, world):
    name, tokens, expected = reference
    got = assemble(dist_pool.run(world, forward_and_train_step, tp, pp, MODELS[name], VOCAB, tokens, 2, LR))
    torch.testing.assert_close(got["logits"], expected["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got["logprobs"], expected["logprobs"], atol=1e-5, rtol=0)
    assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)
    assert got["weights"].keys() == expected["weights"].keys()
    for key, weight in expected["weights"].items():
        actual = got["weights"][key]
        assert not torch.isnan(actual).any(), f"{key} not fully covered by the shards"
        if key in VOCAB_KEYS:
            # TP=2 pads the vocab further; padding rows get no gradient and stay zero.
            assert (actual[VOCAB:] == 0).all() and (weight[VOCAB:] == 0).all(), key
            actual, weight = actual[:VOCAB], weight[:VOCAB]
        torch.testing.assert_close(actual, weight, atol=1e-5, rtol=0, msg=key)


def test_virtual_pipeline_matches_single_process(dist_pool, reference):
    """PP=2 with two virtual stages per rank (interleaved 1F1B), one layer per chunk."""
    name, tokens, expected = reference
    tokens = tokens.repeat(2, 1)  # the interleaved schedule wants microbatches % PP == 0 and >= PP
    expected = assemble(dist_pool.run(1, forward_and_train_step, 1, 1, MODELS[name], VOCAB, tokens, 2, LR))
    got = assemble(dist_pool.run(2, forward_and_train_step, 1, 2, MODELS[name], VOCAB, tokens, 2, LR, 2))
    torch.testing.assert_close(got["logprobs"], expected["logprobs"], atol=1e-5, rtol=0)
    assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)
    for key, weight in expected["weights"].items():
        torch.testing.assert_close(got["weights"][key], weight, atol=1e-5, rtol=0, msg=key)


def test_single_process_step_changes_weights_and_is_finite(reference):
    name, tokens, expected = reference
    assert torch.isfinite(expected["logits"]).all()
    # Untrained model: next-token log-probs are near log(1/VOCAB).
    assert expected["logprobs"].mean().item() == pytest.approx(-torch.log(torch.tensor(VOCAB)).item(), abs=0.5)
    assert expected["grad_norm"] > 0
    assert expected["weights"].keys() == expected["initial_weights"].keys()
    for key, after in expected["weights"].items():
        before = expected["initial_weights"][key]
        if key in VOCAB_KEYS:  # padding rows get no gradient and stay zero
            assert (after[VOCAB:] == 0).all() and (before[VOCAB:] == 0).all(), key
            after, before = after[:VOCAB], before[:VOCAB]
        assert torch.isfinite(after).all(), key
        assert not torch.equal(after, before), f"{key} did not change"
        # AdamW's first update moves each element by at most lr (|m| / sqrt(v) <= 1 after bias
        # correction) on top of the decoupled decay lr * weight_decay * |w|.
        bound = LR * (1 + WEIGHT_DECAY * before.abs()) + 1e-6
        assert ((after - before).abs() <= bound).all(), key
