"""chunked_vocab_parallel_logprobs against the unchunked output layer + vocab_parallel_logprobs, at TP 1 and 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from nemo_dpo.parallel.logprobs import chunked_vocab_parallel_logprobs, vocab_parallel_logprobs
from test_logprobs import PADDED_VOCAB, REAL_VOCAB

HIDDEN = 6


def make_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 5, HIDDEN, generator=gen)
    weight = torch.randn(PADDED_VOCAB, HIDDEN, generator=gen)
    # Padding rows give large logits: they must not take probability mass.
    weight[REAL_VOCAB:] = hidden.abs().sum() * hidden.mean(dim=(0, 1))
    # Targets on both sides of the TP shard boundary (7 | 8) and at the last real id.
    target = torch.tensor([[0, 7, 8, 12, 3], [7, 8, 7, 8, 12], [1, 2, 11, 12, 0]])
    upstream = torch.rand(target.shape, generator=gen)
    return hidden, weight, target, upstream


def both_paths(hidden, weight, target, upstream, chunk_size):
    """On each rank: (log-probs, hidden grad, weight-shard grad) of the chunked and unchunked paths."""
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = weight.chunk(world, dim=0)[rank]
    results = []
    for chunked in (True, False):
        h, w = hidden.clone().requires_grad_(True), shard.clone().requires_grad_(True)
        if chunked:
            logprobs = chunked_vocab_parallel_logprobs(h, w, target, chunk_size, REAL_VOCAB, group=dist.group.WORLD)
        else:
            logprobs = vocab_parallel_logprobs(F.linear(h, w), target, REAL_VOCAB, group=dist.group.WORLD)
        (logprobs * upstream).sum().backward()
        if not chunked:
            # ColumnParallelLinear's backward all-reduces the input gradient over TP.
            dist.all_reduce(h.grad, group=dist.group.WORLD)
        results.append((logprobs.detach(), h.grad, w.grad))
    return results


# 7 leaves a last partial chunk of 1 (15 tokens); 1 and 15 are the extremes; 100 exceeds the tokens.
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("chunk_size", [1, 7, 15, 100])
def test_matches_unchunked(dist_pool, world, chunk_size):
    hidden, weight, target, upstream = make_inputs()
    for chunked, plain in dist_pool.run(world, both_paths, hidden, weight, target, upstream, chunk_size):
        for got, expected in zip(chunked, plain):
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        assert chunked[0].dtype == torch.float32
        assert (chunked[0] <= 0).all()


def test_padding_rows_get_no_gradient(dist_pool):
    hidden, weight, target, upstream = make_inputs(seed=1)
    (chunked, _), (chunked_last, _) = dist_pool.run(2, both_paths, hidden, weight, target, upstream, 4)
    real_in_last_shard = REAL_VOCAB - PADDED_VOCAB // 2
    assert (chunked_last[2][real_in_last_shard:] == 0).all()
    assert chunked[2].abs().sum() > 0


def test_bf16_inputs_give_fp32_logprobs_and_bf16_grads():
    hidden, weight, target, _ = make_inputs()
    h, w = hidden.bfloat16().requires_grad_(True), weight.bfloat16().requires_grad_(True)
    logprobs = chunked_vocab_parallel_logprobs(h, w, target, 4, REAL_VOCAB)
    expected = vocab_parallel_logprobs(F.linear(h.detach(), w.detach()), target, REAL_VOCAB)
    assert logprobs.dtype == torch.float32
    torch.testing.assert_close(logprobs, expected, atol=1e-6, rtol=0)
    logprobs.sum().backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_chunk_size_must_be_a_positive_int(chunk_size):
    hidden, weight, target, _ = make_inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_vocab_parallel_logprobs(hidden, weight, target, chunk_size)


_PEAK_SCRIPT = """
import re, torch
import torch.nn.functional as F
from nemo_dpo.parallel.logprobs import chunked_vocab_parallel_logprobs, vocab_parallel_logprobs

def kib(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

def peak_growth(logprobs_of):
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from the current RSS
    start = kib("VmRSS")
    logprobs_of(hidden, weight).sum().backward()
    hidden.grad = weight.grad = None
    return kib("VmHWM") - start

torch.set_num_threads(1)
gen = torch.Generator().manual_seed(0)
hidden = torch.randn(1024, 32, generator=gen).requires_grad_(True)
weight = torch.randn(131072, 32, generator=gen).requires_grad_(True)
target = torch.randint(0, 131072, (1024,), generator=gen)
# Chunked first: the whole-logits tensors (512 MiB) are large enough that the allocator maps and
# unmaps them directly, so measuring them second sees their full size.
print(peak_growth(lambda h, w: chunked_vocab_parallel_logprobs(h, w, target, 16)),
      peak_growth(lambda h, w: vocab_parallel_logprobs(F.linear(h, w), target)))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux peak-RSS reset")
def test_peak_memory_at_128k_vocab_is_an_eighth_or_less():
    # 1024 tokens x 128k vocab: 512 MiB per whole fp32 logits tensor, 8 MiB per 16-token chunk.
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], env=env, capture_output=True, text=True, check=True)
    chunked, whole = map(int, done.stdout.split()[-2:])
    print(f"peak RSS growth: chunked {chunked} KiB, whole logits {whole} KiB")
    assert chunked * 8 <= whole
