"""Preference losses against values worked out by hand with `math`.

The pipeline under test is the one the model assembles: per-token log-probs and
a loss mask -> ``masked_sequence_logprobs`` -> ``split_chosen_rejected`` -> a
registered per-pair loss, ``preference_accuracy`` and ``reward_metrics``. Weighting the preference
and SFT terms is the model's job and is tested with the model.
"""

import math

import pytest
import torch

from nemo_dpo.losses import (
    PREFERENCE_LOSSES,
    dpo_loss,
    get_preference_loss,
    masked_sequence_logprobs,
    preference_accuracy,
    register_preference_loss,
    reward_metrics,
    split_chosen_rejected,
)

BUILTIN_LOSSES = ["dpo", "ipo", "rpo_bwd_kl", "rpo_fwd_kl", "rpo_sq"]

# Three pairs. Rows are laid out [chosen x3; rejected x3]. Each row is one masked-out
# prompt token, then its response tokens, then masked-out padding up to WIDTH.
POLICY_TOKENS = [
    [-1.5, -2.5],
    [-2.0, -3.0, -4.0],
    [-3.0],
    [-1.0, -2.0, -1.0, -2.0],
    [-8.0],
    [-1.0, -1.0, -2.0, -1.0, -2.0],
]
REF_TOKENS = [
    [-2.0, -3.0],
    [-2.5, -3.0, -3.0],
    [-3.0],
    [-1.5, -1.0, -1.0, -2.0],
    [-8.5],
    [-2.0, -1.0, -1.0, -1.0, -2.0],
]
WIDTH = 7
# Junk at masked-out positions; the policy's is -inf, which must never leak into a sum.
POLICY_JUNK, REF_JUNK = float("-inf"), -30.0
GT_REWARDS = [3.0, 1.0, 2.0, 1.0, 2.0, 2.0]
GT_SCALE = 0.5
BETA = 0.5

# Worked out by hand from the token lists above.
NUM_TOKENS = [2, 3, 1, 4, 1, 5]
SUMMED_POLICY = [-4.0, -9.0, -3.0, -6.0, -8.0, -7.0]
SUMMED_REF = [-5.0, -8.5, -3.0, -5.5, -8.5, -7.0]
# log-ratio = policy - ref, per row.
SUMMED_CHOSEN_LR = [1.0, -0.5, 0.0]
SUMMED_REJECTED_LR = [-0.5, 0.5, 0.0]
# Averaged: each log-ratio divided by its row's token count.
AVERAGED_CHOSEN_LR = [1.0 / 2, -0.5 / 3, 0.0 / 1]
AVERAGED_REJECTED_LR = [-0.5 / 4, 0.5 / 1, 0.0 / 5]
# gt_reward_scale * (gt_chosen - gt_rejected) = 0.5 * [2, -1, 0]
GT_MARGINS = [1.0, -0.5, 0.0]


def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def hand_pair_loss(name, margin, gt_margin, beta):
    """One pair's loss from its log-ratio margin (chosen - rejected), by hand."""
    if name == "dpo":
        return -math.log(sigmoid(beta * margin))
    if name == "ipo":
        return (margin - 1.0 / (2.0 * beta)) ** 2
    if name == "rpo_sq":
        return (beta * margin - gt_margin) ** 2
    a, b = sigmoid(gt_margin), sigmoid(beta * margin)  # target and model P(chosen wins)
    if name == "rpo_bwd_kl":  # KL(a || b)
        return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))
    if name == "rpo_fwd_kl":  # KL(b || a)
        return b * math.log(b / a) + (1 - b) * math.log((1 - b) / (1 - a))
    raise AssertionError(name)


def hand_logratios(average):
    if average:
        return AVERAGED_CHOSEN_LR, AVERAGED_REJECTED_LR
    return SUMMED_CHOSEN_LR, SUMMED_REJECTED_LR


def t(values, **kwargs):
    return torch.tensor(values, dtype=torch.float32, **kwargs)


def padded(rows, junk):
    """``[6, WIDTH]`` per-token values: a prompt token, the response, padding."""
    return [[junk, *row] + [junk] * (WIDTH - 1 - len(row)) for row in rows]


def loss_mask():
    return torch.tensor([[0] + [1] * len(row) + [0] * (WIDTH - 1 - len(row)) for row in POLICY_TOKENS])


def logratios_from_tokens(policy_tokens, average):
    """The model's path: per-token policy - ref, reduced over the mask, split into pairs."""
    ref_tokens = t(padded(REF_TOKENS, REF_JUNK))
    logratios = masked_sequence_logprobs(policy_tokens - ref_tokens, loss_mask(), average=average)
    return split_chosen_rejected(logratios)


def gt_rewards():
    return split_chosen_rejected(t(GT_REWARDS))


def test_masked_sequence_logprobs_sum_and_mean():
    token_logprobs = torch.tensor(
        [[-1.0, -2.0, -3.0], [-0.5, float("-inf"), -4.0], [-7.0, -8.0, -9.0]], dtype=torch.bfloat16
    )
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 0]])
    summed = masked_sequence_logprobs(token_logprobs, mask, average=False)
    averaged = masked_sequence_logprobs(token_logprobs, mask.bool(), average=True)
    assert summed.dtype == averaged.dtype == torch.float32
    # -1 - 2; -0.5 - 4 (the masked -inf must not leak in); an empty row sums to 0.
    assert summed.tolist() == [-3.0, -4.5, 0.0]
    # -3 / 2; -4.5 / 2; an empty row averages to 0, not 0 / 0.
    assert averaged.tolist() == [-1.5, -2.25, 0.0]


def test_fixture_sums_by_hand():
    # The hand-written per-sequence constants really are the token lists' sums and lengths.
    assert [math.fsum(row) for row in POLICY_TOKENS] == SUMMED_POLICY
    assert [math.fsum(row) for row in REF_TOKENS] == SUMMED_REF
    assert [len(row) for row in POLICY_TOKENS] == [len(row) for row in REF_TOKENS] == NUM_TOKENS
    lr = [p - r for p, r in zip(SUMMED_POLICY, SUMMED_REF)]
    assert lr == SUMMED_CHOSEN_LR + SUMMED_REJECTED_LR
    assert [x / n for x, n in zip(lr, NUM_TOKENS)] == AVERAGED_CHOSEN_LR + AVERAGED_REJECTED_LR


@pytest.mark.parametrize("average", [False, True], ids=["summed", "averaged"])
def test_sequence_logprobs_and_logratios_by_hand(average):
    policy = t(padded(POLICY_TOKENS, POLICY_JUNK))
    ref = t(padded(REF_TOKENS, REF_JUNK))
    divisors = NUM_TOKENS if average else [1] * 6
    policy_logps = masked_sequence_logprobs(policy, loss_mask(), average=average)
    ref_logps = masked_sequence_logprobs(ref, loss_mask(), average=average)
    assert policy_logps.tolist() == pytest.approx([s / n for s, n in zip(SUMMED_POLICY, divisors)], rel=1e-6)
    assert ref_logps.tolist() == pytest.approx([s / n for s, n in zip(SUMMED_REF, divisors)], rel=1e-6)
    # Reducing the per-token difference (what the model does) gives the hand log-ratios.
    chosen, rejected = logratios_from_tokens(policy, average)
    chosen_lr, rejected_lr = hand_logratios(average)
    assert chosen.tolist() == pytest.approx(chosen_lr, rel=1e-6, abs=1e-7)
    assert rejected.tolist() == pytest.approx(rejected_lr, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("average", [False, True], ids=["summed", "averaged"])
@pytest.mark.parametrize("loss_type", BUILTIN_LOSSES)
def test_per_pair_losses_by_hand(loss_type, average):
    chosen, rejected = logratios_from_tokens(t(padded(POLICY_TOKENS, POLICY_JUNK)), average)
    gt_chosen, gt_rejected = gt_rewards()
    per_pair = get_preference_loss(loss_type)(
        chosen, rejected, beta=BETA,
        gt_rewards_chosen=gt_chosen, gt_rewards_rejected=gt_rejected, gt_reward_scale=GT_SCALE,
    )
    chosen_lr, rejected_lr = hand_logratios(average)
    expected = [hand_pair_loss(loss_type, c - r, g, BETA) for c, r, g in zip(chosen_lr, rejected_lr, GT_MARGINS)]
    assert per_pair.shape == (3,)
    assert per_pair.dtype == torch.float32
    assert per_pair.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert per_pair.mean(0).item() == pytest.approx(sum(expected) / 3, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("average", [False, True], ids=["summed", "averaged"])
def test_reward_and_accuracy_metrics_by_hand(average):
    chosen_lr, rejected_lr = logratios_from_tokens(t(padded(POLICY_TOKENS, POLICY_JUNK)), average)
    metrics = reward_metrics(chosen_lr, rejected_lr, BETA)
    accuracy = preference_accuracy(chosen_lr, rejected_lr)
    if average:
        # beta * averaged log-ratios: chosen [0.25, -1/12, 0], rejected [-1/16, 0.25, 0]
        chosen, rejected = [0.25, -1.0 / 12, 0.0], [-1.0 / 16, 0.25, 0.0]
    else:
        # beta * summed log-ratios: chosen [0.5, -0.25, 0], rejected [-0.25, 0.25, 0]
        chosen, rejected = [0.5, -0.25, 0.0], [-0.25, 0.25, 0.0]
    everything = chosen + rejected
    mean_all = sum(everything) / 6
    std_all = math.sqrt(sum((x - mean_all) ** 2 for x in everything) / 5)  # unbiased
    assert sorted(metrics) == [
        "rewards_all_mean", "rewards_all_std", "rewards_chosen_mean", "rewards_rejected_mean",
    ]
    # Only the first pair has chosen > rejected; the tie in the third does not count.
    assert accuracy.item() == pytest.approx(1.0 / 3)
    assert metrics["rewards_chosen_mean"].item() == pytest.approx(sum(chosen) / 3, abs=1e-7)
    assert metrics["rewards_rejected_mean"].item() == pytest.approx(sum(rejected) / 3, abs=1e-7)
    assert metrics["rewards_all_mean"].item() == pytest.approx(mean_all, abs=1e-7)
    assert metrics["rewards_all_std"].item() == pytest.approx(std_all, rel=1e-6)


def test_metrics_are_detached_and_accuracy_ignores_beta_sign():
    chosen = t([1.0, -2.0], requires_grad=True)
    rejected = t([0.0, 0.0], requires_grad=True)
    metrics = reward_metrics(chosen, rejected, -0.5)
    accuracy = preference_accuracy(chosen, rejected)
    assert not accuracy.requires_grad and not any(value.requires_grad for value in metrics.values())
    assert accuracy.item() == 0.5  # compares log-ratios, not beta-scaled rewards
    assert metrics["rewards_chosen_mean"].item() == pytest.approx(-0.5 * (1.0 - 2.0) / 2)


def test_equal_chosen_and_rejected_is_ln2_with_zero_accuracy():
    # Two pairs whose chosen and rejected rows are identical token for token.
    policy = t([[-1.0, -2.0], [-2.0, -3.0], [-1.0, -2.0], [-2.0, -3.0]])
    ref = t([[-0.5, -0.5], [-1.0, -1.0], [-0.5, -0.5], [-1.0, -1.0]])
    chosen, rejected = split_chosen_rejected(masked_sequence_logprobs(policy - ref, torch.ones(4, 2), average=False))
    loss = dpo_loss(chosen, rejected, beta=0.1).mean(0)
    assert loss.item() == torch.tensor(math.log(2.0), dtype=torch.float32).item()
    assert preference_accuracy(chosen, rejected).item() == 0.0


def test_unknown_loss_error_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_preference_loss("dpoo")
    message = str(err.value)
    assert "'dpoo'" in message
    for name in BUILTIN_LOSSES:
        assert name in message


def test_custom_registered_loss_is_used():
    @register_preference_loss("test_hinge")
    def hinge(chosen_logratios, rejected_logratios, *, beta, **_):
        return torch.relu(1.0 - beta * (chosen_logratios - rejected_logratios))

    try:
        assert get_preference_loss("test_hinge") is hinge
        chosen, rejected = logratios_from_tokens(t(padded(POLICY_TOKENS, POLICY_JUNK)), average=False)
        per_pair = get_preference_loss("test_hinge")(chosen, rejected, beta=BETA)
        # beta * margins = 0.5 * [1.5, -1, 0] -> hinge [0.25, 1.5, 1.0]
        assert per_pair.tolist() == pytest.approx([0.25, 1.5, 1.0])
        with pytest.raises(ValueError, match="already registered"):
            register_preference_loss("test_hinge")(hinge)
        with pytest.raises(ValueError, match="already registered"):
            register_preference_loss("dpo")(hinge)
        assert get_preference_loss("dpo") is dpo_loss
    finally:
        PREFERENCE_LOSSES.pop("test_hinge")


def test_builtin_names():
    assert sorted(PREFERENCE_LOSSES) == BUILTIN_LOSSES


@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("loss_type", BUILTIN_LOSSES)
def test_huge_logratios_stay_finite(loss_type, beta):
    # Log-ratios of magnitude 1e4 both ways, and ground-truth margins as large.
    policy = t([[5e3, 5e3], [-5e3, -5e3], [-5e3, -5e3], [5e3, 5e3]], requires_grad=True)
    chosen, rejected = split_chosen_rejected(
        masked_sequence_logprobs(policy - torch.zeros(4, 2), torch.ones(4, 2), average=False)
    )
    gt_chosen, gt_rejected = split_chosen_rejected(t([1e4, -1e4, -1e4, 1e4]))
    loss = get_preference_loss(loss_type)(
        chosen, rejected, beta=beta, gt_rewards_chosen=gt_chosen, gt_rewards_rejected=gt_rejected,
    ).mean(0)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(policy.grad).all()
    assert all(torch.isfinite(value) for value in reward_metrics(chosen, rejected, beta).values())


@pytest.mark.parametrize("average", [False, True], ids=["summed", "averaged"])
def test_dpo_gradient_by_hand(average):
    policy = t(padded(POLICY_TOKENS, POLICY_JUNK), requires_grad=True)
    chosen, rejected = logratios_from_tokens(policy, average)
    dpo_loss(chosen, rejected, beta=BETA).mean(0).backward()
    chosen_lr, rejected_lr = hand_logratios(average)
    tokens = NUM_TOKENS if average else [1] * 6
    per_token = [0.0] * 6
    for i, (c, r) in enumerate(zip(chosen_lr, rejected_lr)):
        # d/dx [-logsigmoid(beta x)] = -beta sigmoid(-beta x), x = margin; the mean over 3 pairs
        # divides by 3 and averaging divides each row by its token count.
        dmargin = -BETA * sigmoid(-BETA * (c - r)) / 3
        per_token[i] = dmargin / tokens[i]
        per_token[3 + i] = -dmargin / tokens[3 + i]
    # Every masked-in token of a row gets its row's gradient; masked-out positions get none.
    expected = padded([[g] * len(row) for g, row in zip(per_token, POLICY_TOKENS)], 0.0)
    assert torch.isfinite(policy.grad).all()
    for got, want in zip(policy.grad.tolist(), expected):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_dpo_loss_gradient_single_pair():
    margin = t([0.8], requires_grad=True)
    dpo_loss(margin, torch.zeros(1), beta=0.3).sum().backward()
    assert margin.grad.item() == pytest.approx(-0.3 * sigmoid(-0.3 * 0.8), rel=1e-6)


@pytest.mark.parametrize("loss_type", ["rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl"])
def test_rpo_needs_ground_truth_rewards(loss_type):
    chosen, rejected = t(SUMMED_CHOSEN_LR), t(SUMMED_REJECTED_LR)
    loss_fn = get_preference_loss(loss_type)
    with pytest.raises(ValueError, match="ground-truth rewards"):
        loss_fn(chosen, rejected, beta=BETA)
    with pytest.raises(ValueError, match="ground-truth rewards"):
        loss_fn(chosen, rejected, beta=BETA, gt_rewards_chosen=t(GT_REWARDS[:3]))


def test_odd_row_counts_raise():
    with pytest.raises(ValueError, match="even number of rows"):
        split_chosen_rejected(t(SUMMED_POLICY[:5]))
    with pytest.raises(ValueError, match="even number of rows"):
        split_chosen_rejected(t(padded(POLICY_TOKENS[:5], 0.0)))
    chosen, rejected = split_chosen_rejected(t(SUMMED_POLICY))
    assert chosen.tolist() == SUMMED_POLICY[:3] and rejected.tolist() == SUMMED_POLICY[3:]
