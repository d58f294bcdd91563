"""Activation recompute (NeMo's ``activations_checkpoint_*`` keys) gives the plain run's training step."""

import pytest
import torch
from megatron.core.tensor_parallel import random as megatron_random
from omegaconf import OmegaConf

from layout_workers import forward_and_train_step
from nemo_dpo.models.nlp.gpt.builder import recompute_settings
from test_layouts import MODELS, VOCAB, assemble

LR = 1e-2
RECOMPUTE = {
    "selective": dict(activations_checkpoint_granularity="selective"),
    "full_uniform_1": dict(activations_checkpoint_granularity="full", activations_checkpoint_method="uniform",
                           activations_checkpoint_num_layers=1),
    "full_uniform_2": dict(activations_checkpoint_granularity="full", activations_checkpoint_method="uniform",
                           activations_checkpoint_num_layers=2),
    "full_block_2": dict(activations_checkpoint_granularity="full", activations_checkpoint_method="block",
                         activations_checkpoint_num_layers=2),
}
# (tp, pp, world size), recompute setting, dropout: every setting at TP=1 and TP=2; at PP=2 (two
# layers per stage) the settings whose layer groups fill a stage. With dropout, recompute must
# redraw the forward's masks, which needs the RNG state restored.
DROPOUT = dict(hidden_dropout=0.1, attention_dropout=0.1)
CASES = [
    *(((1, 1, 1), name, False) for name in sorted(RECOMPUTE)),
    *(((2, 1, 2), name, False) for name in sorted(RECOMPUTE)),
    ((1, 2, 2), "full_uniform_2", False), ((1, 2, 2), "full_block_2", False),
    ((1, 1, 1), "selective", True), ((1, 1, 1), "full_uniform_1", True), ((2, 1, 2), "full_block_2", True),
]


def counted_train_step(*args) -> dict:
    """forward_and_train_step, also reporting how many times megatron's CheckpointFunction ran."""
    original = megatron_random.CheckpointFunction.forward
    calls = []

    def counting(ctx, *inputs):
        calls.append(1)
        return original(ctx, *inputs)

    megatron_random.CheckpointFunction.forward = staticmethod(counting)
    try:
        result = forward_and_train_step(*args)
    finally:
        megatron_random.CheckpointFunction.forward = staticmethod(original)
    return dict(result, checkpointed=len(calls))


def train_step(dist_pool, tp, pp, world, extra):
    tokens = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(0))
    model = {**MODELS["llama_gqa"], **extra}
    results = dist_pool.run(world, counted_train_step, tp, pp, model, VOCAB, tokens, 2, LR)
    return assemble(results), sum(r["checkpointed"] for r in results)


@pytest.fixture(scope="module")
def plain_runs(dist_pool):
    """The run without recompute at each layout, computed once."""
    runs = {}

    def plain(layout, extra):
        key = (layout, tuple(sorted(extra.items())))
        if key not in runs:
            result, checkpointed = train_step(dist_pool, *layout, extra)
            assert checkpointed == 0
            runs[key] = result
        return runs[key]

    return plain


@pytest.mark.parametrize("layout,name,dropout", CASES, ids=str)
def test_recompute_matches_plain_run(dist_pool, plain_runs, layout, name, dropout):
    model = DROPOUT if dropout else {}
    expected = plain_runs(layout, model)
    if dropout:
        assert expected["grad_norm"] != plain_runs(layout, {})["grad_norm"], "dropout had no effect"
    got, checkpointed = train_step(dist_pool, *layout, {**model, **RECOMPUTE[name]})
    assert checkpointed > 0, "recompute was not used"
    torch.testing.assert_close(got["logprobs"], expected["logprobs"], atol=1e-6, rtol=0)
    assert got["grad_norm"] == pytest.approx(expected["grad_norm"], abs=1e-6)
    assert got["weights"].keys() == expected["weights"].keys()
    for key, weight in expected["weights"].items():
        torch.testing.assert_close(got["weights"][key], weight, atol=1e-6, rtol=0, msg=key)


def test_recompute_off_by_default():
    assert recompute_settings(OmegaConf.create({})) == {}
    yaml_model = OmegaConf.load("conf/gpt_dpo.yaml").model
    assert recompute_settings(yaml_model) == {}


@pytest.mark.parametrize("keys,message", [
    (dict(activations_checkpoint_granularity="partial"), "activations_checkpoint_granularity"),
    (dict(activations_checkpoint_granularity="full"), "activations_checkpoint_method"),
    (dict(activations_checkpoint_granularity="full", activations_checkpoint_method="every"),
     "activations_checkpoint_method"),
    (dict(activations_checkpoint_granularity="full", activations_checkpoint_method="uniform"),
     "activations_checkpoint_num_layers"),
    (dict(activations_checkpoint_granularity="full", activations_checkpoint_method="block",
          activations_checkpoint_num_layers=0), "activations_checkpoint_num_layers"),
    (dict(activations_checkpoint_granularity="selective", activations_checkpoint_method="uniform"),
     "activations_checkpoint_method"),
    (dict(activations_checkpoint_granularity="selective", activations_checkpoint_num_layers=1),
     "activations_checkpoint_num_layers"),
])
def test_invalid_recompute_keys_are_refused(keys, message):
    with pytest.raises(ValueError, match=message) as raised:
        recompute_settings(OmegaConf.create(keys))
    assert "\n" not in str(raised.value)
