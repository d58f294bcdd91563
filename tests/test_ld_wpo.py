"""LD-DPO (``ld_alpha``) and WPO weighting (``use_weighting``) in the model, against TRL's formulas recomputed here."""

import math

import pytest
import torch
import torch.nn.functional as F

from dpo_workers import EOS, VOCAB, model_config, synthetic_pairs
from nemo_dpo.algorithms.dpo import dpo_custom_collate
from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import DPOSettings, MegatronGPTDPOModel
from nemo_dpo.models.nlp.gpt.optional_loss_inputs import leading_tokens
from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel

BETA = 0.5  # model_config's ref_policy_kl_penalty


def step0_with_a_distinct_reference(dpo: dict, data: dict | None) -> dict:
    """The first batch's training loss when the reference differs from the policy, and what recomputing it needs."""
    initialize_parallel(ParallelLayout(1, 1), seed=0)
    items = synthetic_pairs(6, seed=3)
    model = MegatronGPTDPOModel(model_config(3, len(items), data=data, **dpo), VOCAB)
    batch = dpo_custom_collate(items, eos_id=EOS)
    policy = model.get_logprob_batch(batch)
    width = policy.shape[1]
    # Any reference unlike the policy, so that the log-ratios are not all 0.
    reference = policy + 0.2 * torch.sin(torch.arange(policy.numel(), dtype=torch.float32)).view_as(policy)[:, :width]
    batch["ref_policy_log_probs_chosen"], batch["ref_policy_log_probs_rejected"] = reference.chunk(2)
    model.prepare_for_training_step()
    loss, _ = model.get_loss_and_metrics(batch, forward_only=False)
    tokens = torch.cat([batch["chosen"], batch["rejected"]])
    with torch.no_grad():
        logits = model.model[0](tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[..., :VOCAB]
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:]
    return dict(loss=loss, policy=policy, reference=reference, labels=labels, logits=logits)


def trl_loss(run: dict, ld_alpha: float | None, use_weighting: bool) -> float:
    """TRL's ``sigmoid`` loss with its LD-DPO and WPO code paths, written out from the papers' formulas."""
    mask = (run["labels"] > -1).double()
    policy, reference = run["policy"].double() * mask, run["reference"].double() * mask
    lengths = mask.sum(1)
    pairs = lengths.shape[0] // 2
    if ld_alpha is None:
        policy_logps, reference_logps = policy.sum(1), reference.sum(1)
    else:
        position = mask.cumsum(1)
        shared_length = torch.minimum(lengths[:pairs], lengths[pairs:]).repeat(2).unsqueeze(1)
        front, tail = mask * (position <= shared_length), mask * (position > shared_length)
        policy_logps = (policy * front).sum(1) + ld_alpha * (policy * tail).sum(1)
        reference_logps = (reference * front).sum(1) + ld_alpha * (reference * tail).sum(1)
    ratios = policy_logps - reference_logps
    loss = -F.logsigmoid(BETA * (ratios[:pairs] - ratios[pairs:]))
    if use_weighting:
        probs = torch.softmax(run["logits"].double(), dim=-1)[:, :-1]
        aligned = (run["policy"].double() - (probs ** 2).sum(-1).log()) * mask
        weights = torch.exp(aligned.sum(1) / lengths)
        loss = loss * weights[:pairs] * weights[pairs:]
    return float(loss.mean())


CASES = [
    ({"ld_alpha": 0.4}, None),
    ({"use_weighting": True}, None),
    ({"ld_alpha": 0.4, "use_weighting": True}, None),
    ({"ld_alpha": 0.4, "use_weighting": True, "log_prob_chunk_size": 7}, None),
    ({"ld_alpha": 0.4, "use_weighting": True}, {"packing": True, "pack_tokens": 40}),
    ({"ld_alpha": 0.4, "use_weighting": True}, {"packing": True, "pack_tokens": 40, "shared_prompt": True}),
]


@pytest.mark.parametrize("dpo,data", CASES, ids=["ld", "wpo", "ld+wpo", "ld+wpo-chunked", "ld+wpo-packed", "ld+wpo-shared-prompt"])
def test_loss_equals_trl_formulas(dist_pool, dpo, data):
    (run,) = dist_pool.run(1, step0_with_a_distinct_reference, dpo, data)
    expected = trl_loss(run, dpo.get("ld_alpha"), dpo.get("use_weighting", False))
    assert run["loss"] == pytest.approx(expected, abs=1e-6)
    # The setting changes the loss: plain DPO on the same log-probs differs.
    assert abs(trl_loss(run, None, False) - expected) > 1e-3
    assert math.isfinite(run["loss"])


def test_leading_tokens_keeps_the_first_n_of_each_sequence():
    # Two rows; row 0 holds sequences 0 and 2 back to back, row 1 holds 1 and 3 with gaps.
    segments = torch.tensor([[-1, 0, 0, 0, 2, 2, -1],
                             [1, -1, 1, 1, 3, -1, 3]])
    kept = leading_tokens(segments, torch.tensor([2, 1, 5, 0]))
    assert kept.tolist() == [[-1, 0, 0, -1, 2, 2, -1],
                             [1, -1, -1, -1, -1, -1, -1]]


def test_ld_alpha_needs_summed_log_probs():
    with pytest.raises(ValueError, match="ld_alpha re-weights summed log-probs"):
        DPOSettings.from_config({"ld_alpha": 0.5, "preference_average_log_probs": True})
    assert DPOSettings.from_config({"ld_alpha": 0.5, "use_weighting": True}).use_weighting
