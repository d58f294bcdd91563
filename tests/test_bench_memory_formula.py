"""The memory formula of benchmarks/bench_memory.py against hand-computed byte counts."""

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"
_SPEC = importlib.util.spec_from_file_location("bench_memory", _PATH)
bench_memory = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("bench_memory", bench_memory)  # dataclasses look their module up
_SPEC.loader.exec_module(bench_memory)

# hidden 8, ffn 16, 2 heads of 4, 1 query group, vocab 100 padded to a multiple of 8 x TP.
SHAPE = bench_memory.Shape(layers=2, hidden=8, ffn=16, heads=2, groups=1, vocab=100, vocab_divisible_by=8)
Layout = bench_memory.Layout


def test_bytes_per_parameter():
    assert bench_memory.static_bytes(1000, "fp32", Layout()) == dict(
        weights=4000, gradients=4000, optimizer=8000, reference=4000, total=20000)
    # bf16: fp32 gradients, 4 master + 8 Adam bytes divided over DP=4 when sharded.
    assert bench_memory.static_bytes(1000, "bf16", Layout(dp=4, sharded_optimizer=True)) == dict(
        weights=2000, gradients=4000, optimizer=3000, reference=2000, total=11000)


def test_parameters_per_rank():
    # Per layer at TP=2: (qkv 8*(2+2)*4 + proj 2*4*8 + mlp 3*8*16) / 2 + two norms of 8 = 304;
    # vocab padded to 112 (multiple of 16): 112*8/2 = 448 per matrix, two matrices, final norm 8.
    assert bench_memory.params_per_rank(SHAPE, Layout(tp=2)) == 2 * 304 + 2 * 448 + 8
    # PP=2: one layer and one vocabulary matrix (+ final norm) on the last stage.
    assert bench_memory.params_per_rank(SHAPE, Layout(tp=2, pp=2)) == 304 + 448 + 8


@pytest.mark.parametrize("recompute, expected", [("none", 3392), ("selective", 3328), ("full", 128)])
def test_layer_activations(recompute, expected):
    # 2 rows of 4 tokens (T=8), bf16: norms 2*(2*8*8*4 + 4*8) = 1088, matmul inputs 2*8*8*2 = 256,
    # RoPE 4*4*4*2 = 128, attention 8*4*2*(3*2 + 3*1) = 576, MLP 5*8*16*2 = 1280, log-sum-exp 4*8*2 = 64.
    assert bench_memory.layer_activation_bytes(SHAPE, 2, 4, 2, 1, recompute) == expected


def test_logits():
    # 2 rows x 3 targets, vocab padded to 104: fp32 softmax 4*6*104 + int64 targets and flags 9*6.
    assert bench_memory.logits_bytes(SHAPE, 2, 4, 2, 1, None) == dict(saved=2550, peak=6 * 6 * 104)
    # Chunks of 2: hidden copy 6*8*2 + targets, max and sum 16*6; logits of 2 tokens at a time.
    assert bench_memory.logits_bytes(SHAPE, 2, 4, 2, 1, 2) == dict(saved=192, peak=6 * 2 * 104)
