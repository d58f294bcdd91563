"""GPT builder: config keys reach megatron-core, bad values are named, vocab padding."""

import pytest
import torch
from omegaconf import OmegaConf

from nemo_dpo.models.nlp.gpt.architecture import GPTArchitecture
from nemo_dpo.models.nlp.gpt.builder import build_gpt_model

BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, encoder_seq_length=16)


def build_and_describe(overrides, vocab_size):
    from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel

    initialize_parallel(ParallelLayout(1, 1))
    model = build_gpt_model(OmegaConf.create({**BASE, **overrides}), vocab_size)[0]
    tokens = torch.randint(0, vocab_size, (2, 16))
    logits = model(tokens, torch.arange(16).expand(2, 16), None)
    return dict(
        shapes={name: tuple(p.shape) for name, p in model.named_parameters()},
        logits_shape=tuple(logits.shape),
    )


def padded_vocab_size(vocab_size, divisible_by, tp):
    return GPTArchitecture(1, 64, 4, make_vocab_size_divisible_by=divisible_by).padded_vocab_size(tp, vocab_size)


def test_padded_vocab_size():
    assert padded_vocab_size(100, 16, 1) == 112
    assert padded_vocab_size(100, 16, 2) == 128
    assert padded_vocab_size(128, 128, 1) == 128
    assert GPTArchitecture(1, 64, 4, vocab_size=129).padded_vocab_size(1) == 256  # default multiple: 128


def test_qwen2_style_qkv_bias_only_gqa_untied(dist_pool):
    got = dist_pool.run(1, build_and_describe, dict(
        bias=False, qkv_bias=True, num_query_groups=2, normalization="rmsnorm", activation="swiglu",
        ffn_hidden_size=96, position_embedding_type="rope", share_embeddings_and_output_weights=False,
        make_vocab_size_divisible_by=8,
    ), 100)[0]
    shapes = got["shapes"]
    head_dim = 16
    # q: 4 heads, k and v: 2 groups each.
    assert shapes["decoder.layers.0.self_attention.linear_qkv.weight"] == ((4 + 2 * 2) * head_dim, 64)
    assert shapes["decoder.layers.0.self_attention.linear_qkv.bias"] == ((4 + 2 * 2) * head_dim,)
    assert "decoder.layers.0.self_attention.linear_proj.bias" not in shapes
    assert "decoder.layers.0.mlp.linear_fc1.bias" not in shapes
    assert shapes["decoder.layers.0.mlp.linear_fc1.weight"] == (2 * 96, 64)  # gate and up fused
    assert "decoder.layers.0.input_layernorm.bias" not in shapes  # RMSNorm has no bias
    assert shapes["output_layer.weight"] == (104, 64)
    assert "embedding.position_embeddings.weight" not in shapes
    assert got["logits_shape"] == (2, 16, 104)


def test_gpt2_style_tied_learned_positions(dist_pool):
    shapes = dist_pool.run(1, build_and_describe, dict(make_vocab_size_divisible_by=128), 100)[0]["shapes"]
    assert "output_layer.weight" not in shapes
    assert shapes["embedding.position_embeddings.weight"] == (16, 64)
    assert shapes["decoder.layers.0.mlp.linear_fc1.weight"] == (256, 64)
    assert shapes["decoder.layers.0.self_attention.linear_proj.bias"] == (64,)


@pytest.mark.parametrize("key,value", [("normalization", "batchnorm"), ("activation", "tanh"),
                                       ("position_embedding_type", "alibi")])
def test_unsupported_option_is_named(dist_pool, key, value):
    with pytest.raises(RuntimeError, match=rf"model\.{key}='{value}' is not supported; valid: "):
        dist_pool.run(1, build_and_describe, {key: value}, 100)


def test_qk_layernorm_normalises_each_head(dist_pool):
    base = dict(normalization="rmsnorm", kv_channels=24, num_query_groups=2)
    shapes = dist_pool.run(1, build_and_describe, dict(base, qk_layernorm=True), 100)[0]["shapes"]
    assert shapes["decoder.layers.0.self_attention.q_layernorm.weight"] == (24,)
    assert shapes["decoder.layers.1.self_attention.k_layernorm.weight"] == (24,)
    plain = dist_pool.run(1, build_and_describe, base, 100)[0]["shapes"]
    assert not any("q_layernorm" in name or "k_layernorm" in name for name in plain)
