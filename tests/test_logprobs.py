"""vocab_parallel_logprobs against a plain log_softmax + gather, at TP 1 and 2."""

import torch
import torch.distributed as dist

import pytest

from nemo_dpo.parallel.logprobs import (
    chunked_vocab_parallel_log_sum_squared_probs,
    vocab_parallel_log_sum_squared_probs,
    vocab_parallel_logprobs,
)

PADDED_VOCAB = 16  # 8 per rank at TP=2
REAL_VOCAB = 13  # the last three entries are vocab padding


def reference_logprobs(logits, target, vocab_size):
    return torch.log_softmax(logits[..., :vocab_size].double(), dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)


def make_inputs(scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, PADDED_VOCAB, generator=gen) * scale
    # Padding entries carry large logits: they must not take probability mass.
    logits[..., REAL_VOCAB:] = 50.0
    # Targets on both sides of the TP shard boundary (7 | 8) and at the last real id.
    target = torch.tensor([[0, 7, 8, 12, 3], [7, 8, 7, 8, 12], [1, 2, 11, 12, 0]])
    return logits, target


def shard_logprobs_and_grad(logits, target, vocab_size, upstream):
    """On each rank: log-probs from its vocab shard, and the gradient of its shard."""
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = logits.chunk(world, dim=-1)[rank].clone().requires_grad_(True)
    logprobs = vocab_parallel_logprobs(shard, target, vocab_size, group=dist.group.WORLD)
    (logprobs * upstream).sum().backward()
    return logprobs.detach(), shard.grad


def check_against_reference(results, logits, target, upstream, rtol=0.0):
    expected = reference_logprobs(logits, target, REAL_VOCAB)
    leaf = logits.clone().double().requires_grad_(True)
    (reference_logprobs(leaf, target, REAL_VOCAB) * upstream.double()).sum().backward()
    for logprobs, _ in results:
        assert logprobs.dtype == torch.float32
        torch.testing.assert_close(logprobs.double(), expected, atol=1e-6, rtol=rtol)
    grad = torch.cat([g for _, g in results], dim=-1)
    torch.testing.assert_close(grad.double(), leaf.grad, atol=1e-6, rtol=0)
    assert (grad[..., REAL_VOCAB:] == 0).all()


def test_single_process_matches_log_softmax(dist_pool):
    logits, target = make_inputs()
    upstream = torch.rand(target.shape, generator=torch.Generator().manual_seed(1))
    results = dist_pool.run(1, shard_logprobs_and_grad, logits, target, REAL_VOCAB, upstream)
    check_against_reference(results, logits, target, upstream)


def test_tensor_parallel_matches_log_softmax(dist_pool):
    logits, target = make_inputs()
    upstream = torch.rand(target.shape, generator=torch.Generator().manual_seed(1))
    results = dist_pool.run(2, shard_logprobs_and_grad, logits, target, REAL_VOCAB, upstream)
    check_against_reference(results, logits, target, upstream)


def test_huge_logits_stay_finite(dist_pool):
    logits, target = make_inputs(scale=1e4, seed=3)
    logits[0, 0, :REAL_VOCAB] = -1e4
    logits[0, 0, 0] = 1e4
    upstream = torch.ones(target.shape)
    results = dist_pool.run(2, shard_logprobs_and_grad, logits, target, REAL_VOCAB, upstream)
    for logprobs, grad in results:
        assert torch.isfinite(logprobs).all() and torch.isfinite(grad).all()
        assert (logprobs <= 0).all()
    assert results[0][0][0, 0] == 0.0  # target 0 holds all the mass
    # Log-probs of ~-3e4 carry fp32 round-off of ~1e-3: compare relatively.
    check_against_reference(results, logits, target, upstream, rtol=1e-6)


def test_bf16_logits_accumulate_in_fp32():
    logits, target = make_inputs()
    bf16 = logits.bfloat16().requires_grad_(True)
    logprobs = vocab_parallel_logprobs(bf16, target, REAL_VOCAB)
    assert logprobs.dtype == torch.float32
    expected = reference_logprobs(bf16.detach().float(), target, REAL_VOCAB)
    torch.testing.assert_close(logprobs.double(), expected, atol=1e-6, rtol=0)
    logprobs.sum().backward()
    assert bf16.grad.dtype == torch.bfloat16


def test_unpadded_vocab_default():
    logits, target = make_inputs()
    logits = logits[..., :REAL_VOCAB]
    torch.testing.assert_close(
        vocab_parallel_logprobs(logits, target).double(), reference_logprobs(logits, target, REAL_VOCAB),
        atol=1e-6, rtol=0,
    )


def shard_log_sum_squared(logits, hidden, weight):
    """On each rank: WPO's ``log sum_v p_v ** 2`` from its vocab shard of logits, and chunk by chunk from hidden states."""
    rank, world = dist.get_rank(), dist.get_world_size()
    whole = vocab_parallel_log_sum_squared_probs(logits.chunk(world, dim=-1)[rank], REAL_VOCAB, group=dist.group.WORLD)
    chunked = chunked_vocab_parallel_log_sum_squared_probs(
        hidden, weight.chunk(world, dim=0)[rank], 4, REAL_VOCAB, group=dist.group.WORLD)
    return whole, chunked


@pytest.mark.parametrize("world", [1, 2])
def test_log_sum_squared_probs_match_the_softmax(dist_pool, world):
    logits, _ = make_inputs(scale=8.0)
    gen = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(3, 5, 6, generator=gen), torch.randn(PADDED_VOCAB, 6, generator=gen) * 3
    weight[REAL_VOCAB:] = 10.0  # large padding logits: no probability mass
    for whole, chunked in dist_pool.run(world, shard_log_sum_squared, logits, hidden, weight):
        for got, source in ((whole, logits), (chunked, hidden @ weight.t())):
            probs = torch.softmax(source[..., :REAL_VOCAB].double(), dim=-1)
            assert got.dtype == torch.float32 and not got.requires_grad
            torch.testing.assert_close(got.double(), (probs ** 2).sum(-1).log(), atol=1e-6, rtol=0)
