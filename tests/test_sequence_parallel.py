"""Sequence parallelism (``model.sequence_parallel``) gives the losses and gradients of the run without it."""

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from dpo_workers import EOS, synthetic_pairs
from nemo_dpo.data.collate import dpo_custom_collate
from nemo_dpo.models.nlp.gpt.builder import sequence_parallel_setting
from nemo_dpo.training.trainer import sequence_length_multiple
from sequence_parallel_workers import sequence_parallel_steps, single_rank_turns_it_off, unpadded_batch_is_refused

CHUNK = 5
VARIANTS = [(False, None), (True, None), (False, CHUNK), (True, CHUNK)]


def odd_length_pairs(count: int) -> list[dict]:
    """Pairs whose longest sequence has an odd length, so TP=2 needs a padding token."""
    items = synthetic_pairs(count, seed=2)
    assert max(len(item[side]) for item in items for side in ("chosen", "rejected")) % 2 == 1
    return items


def assert_steps_equal(got: dict, expected: dict) -> None:
    assert got["loss"] == pytest.approx(expected["loss"], abs=1e-6)
    for key, value in expected["metrics"].items():
        assert got["metrics"][key] == pytest.approx(value, abs=1e-6), key
    # Sequence parallelism pads the batch (here by one token): compare the positions both have.
    columns = expected["logprobs"].shape[1]
    torch.testing.assert_close(got["logprobs"][:, :columns], expected["logprobs"], atol=1e-6, rtol=0)
    assert got["grads"].keys() == expected["grads"].keys()
    for name, grad in expected["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, atol=1e-6, rtol=0, msg=name)


# dpo_workers' model is Llama-like (RMSNorm, RoPE, no biases); this one has the other norm, biases
# (RowParallelLinear's bias is also summed over TP under SP), learned positions, tied embeddings and q/k norms.
GPT2_LIKE = dict(normalization="layernorm", activation="gelu", position_embedding_type="learned_absolute",
                 share_embeddings_and_output_weights=True, bias=True, qk_layernorm=True)


# With pipeline stages, whole logits only: the chunked path is the same code on the last stage.
@pytest.mark.parametrize("tp,pp,world,model,variants", [
    (2, 1, 2, {}, VARIANTS), (2, 1, 2, GPT2_LIKE, VARIANTS), (2, 2, 4, {}, VARIANTS[:2]),
], ids=["tp2", "tp2-gpt2-like", "tp2-pp2"])
def test_matches_run_without_sequence_parallel(dist_pool, tp, pp, world, model, variants):
    items = odd_length_pairs(4)
    results = dist_pool.run(world, sequence_parallel_steps, tp, pp, 2, items, variants, model)
    for result in results:
        steps = result["steps"]
        plain = steps[(False, None)]
        # The trainer's collate pads the odd length for TP=2 only under sequence parallelism.
        assert plain["length"] % 2 == 1 and steps[(True, None)]["length"] == plain["length"] + 1
        assert not plain["sequence_parallel"] and steps[(True, None)]["sequence_parallel"]
        assert all(step["norms_tagged"] for step in steps.values())
        if pp == 1 or result["pp"] == 1:  # the loss lives on the last stage
            assert plain["metrics"]["rewards_all_mean"] != 0.0 and plain["loss"] > 0
        # Every parameter had a gradient to compare.
        assert all(grad.abs().sum() > 0 for name, grad in plain["grads"].items() if "output_layer" in name)
        for sequence_parallel, chunk in variants[1:]:
            assert_steps_equal(steps[(sequence_parallel, chunk)], plain)


def test_without_padding_the_schedule_refuses(dist_pool):
    message = dist_pool.run(2, unpadded_batch_is_refused, odd_length_pairs(2))[0]
    assert "not a multiple of tensor_model_parallel_size=2" in message and "pad_length_to_multiple_of" in message


@pytest.mark.parametrize("user,tp,sequence_parallel,expected", [
    (None, 2, True, 2), (0, 2, True, 2), (8, 2, True, 8), (3, 2, True, 6), (6, 4, True, 12),
    (None, 2, False, None), (3, 2, False, 3),
])
def test_collate_pads_to_a_multiple_of_tp(user, tp, sequence_parallel, expected):
    config = SimpleNamespace(sequence_parallel=sequence_parallel, tensor_model_parallel_size=tp)
    multiple = sequence_length_multiple(user, config)
    assert multiple == expected
    batch = dpo_custom_collate(odd_length_pairs(4), eos_id=EOS, pad_length_to_multiple_of=multiple)
    longest = max(len(item[side]) for item in odd_length_pairs(4) for side in ("chosen", "rejected"))
    length = batch["chosen"].shape[1]
    assert length >= longest and length - longest < (multiple or 1)
    if multiple:
        assert length % multiple == 0


def test_single_tensor_parallel_rank_turns_it_off_with_a_warning(dist_pool):
    (sequence_parallel, warned), = dist_pool.run(1, single_rank_turns_it_off)
    assert not sequence_parallel
    assert any("sequence_parallel=True needs tensor_model_parallel_size >= 2" in message for message in warned)


def test_setting_is_a_boolean_off_by_default():
    yaml_model = OmegaConf.load("conf/gpt_dpo.yaml").model
    assert yaml_model.sequence_parallel is False
    assert sequence_parallel_setting(yaml_model, 2) is False
    assert sequence_parallel_setting(OmegaConf.create({"sequence_parallel": True}), 2) is True
    with pytest.raises(ValueError, match="model.sequence_parallel"):
        sequence_parallel_setting(OmegaConf.create({"sequence_parallel": "yes"}), 2)
