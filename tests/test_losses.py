"""Preference losses against values worked out by hand with `math`."""

import math

import pytest
import torch

from nemo_dpo.losses import (
    PREFERENCE_LOSSES,
    dpo_loss,
    get_preference_loss,
    masked_sequence_logprobs,
    preference_loss_and_metrics,
    register_preference_loss,
)

BUILTIN_LOSSES = ["dpo", "ipo", "rpo_bwd_kl", "rpo_fwd_kl", "rpo_sq"]

# Three pairs. Rows are laid out [chosen x3; rejected x3]; log-probs are sums over tokens.
POLICY = [-4.0, -9.0, -3.0, -6.0, -8.0, -7.0]
REF = [-5.0, -8.5, -3.0, -5.5, -8.5, -7.0]
NUM_TOKENS = [2, 3, 1, 4, 1, 5]
GT_REWARDS = [3.0, 1.0, 2.0, 1.0, 2.0, 2.0]
GT_SCALE = 0.5
BETA = 0.5

# Worked out by hand from the rows above: log-ratio = policy - ref, per row.
SUMMED_CHOSEN_LR = [1.0, -0.5, 0.0]
SUMMED_REJECTED_LR = [-0.5, 0.5, 0.0]
# Averaged: each log-ratio divided by its row's token count.
AVERAGED_CHOSEN_LR = [1.0 / 2, -0.5 / 3, 0.0 / 1]
AVERAGED_REJECTED_LR = [-0.5 / 4, 0.5 / 1, 0.0 / 5]
# gt_reward_scale * (gt_chosen - gt_rejected) = 0.5 * [2, -1, 0]
GT_MARGINS = [1.0, -0.5, 0.0]
# SFT loss: minus the mean chosen log-prob, (-4 - 9 - 3) / 3 summed, (-2 - 3 - 3) / 3 averaged.
SUMMED_SFT = 16.0 / 3
AVERAGED_SFT = 8.0 / 3


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


def hand_mean_loss(name, chosen_lr, rejected_lr, beta=BETA):
    pairs = [
        hand_pair_loss(name, c - r, g, beta) for c, r, g in zip(chosen_lr, rejected_lr, GT_MARGINS)
    ]
    return sum(pairs) / len(pairs)


def t(values, **kwargs):
    return torch.tensor(values, dtype=torch.float32, **kwargs)


def run(loss_type="dpo", **kwargs):
    kwargs.setdefault("beta", BETA)
    return preference_loss_and_metrics(
        t(POLICY), t(REF), torch.tensor(NUM_TOKENS), loss_type=loss_type,
        gt_rewards=t(GT_REWARDS), gt_reward_scale=GT_SCALE, **kwargs,
    )


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


@pytest.mark.parametrize("average", [False, True], ids=["summed", "averaged"])
@pytest.mark.parametrize("loss_type", BUILTIN_LOSSES)
def test_per_pair_losses_by_hand(loss_type, average):
    chosen_lr = AVERAGED_CHOSEN_LR if average else SUMMED_CHOSEN_LR
    rejected_lr = AVERAGED_REJECTED_LR if average else SUMMED_REJECTED_LR
    per_pair = get_preference_loss(loss_type)(
        t(chosen_lr), t(rejected_lr), beta=BETA,
        gt_rewards_chosen=t(GT_REWARDS[:3]), gt_rewards_rejected=t(GT_REWARDS[3:]), gt_reward_scale=GT_SCALE,
    )
    expected = [hand_pair_loss(loss_type, c - r, g, BETA) for c, r, g in zip(chosen_lr, rejected_lr, GT_MARGINS)]
    assert per_pair.shape == (3,)
    assert per_pair.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("with_sft", [False, True], ids=["no_sft", "sft"])
@pytest.mark.parametrize("average", [False, True], ids=["summed", "averaged"])
@pytest.mark.parametrize("loss_type", BUILTIN_LOSSES)
def test_total_loss_by_hand(loss_type, average, with_sft):
    pref_weight, sft_weight = (0.9, 0.7) if with_sft else (1.0, 0.0)
    loss, metrics = run(
        loss_type, preference_loss_weight=pref_weight, sft_loss_weight=sft_weight,
        preference_average_log_probs=average,  # the SFT averaging follows it by default
    )
    if average:
        preference = hand_mean_loss(loss_type, AVERAGED_CHOSEN_LR, AVERAGED_REJECTED_LR)
        sft = AVERAGED_SFT if with_sft else 0.0
    else:
        preference = hand_mean_loss(loss_type, SUMMED_CHOSEN_LR, SUMMED_REJECTED_LR)
        sft = SUMMED_SFT if with_sft else 0.0
    total = pref_weight * preference + sft_weight * sft
    assert loss.shape == ()
    assert loss.item() == pytest.approx(total, rel=1e-5)
    assert metrics["loss"].item() == pytest.approx(total, rel=1e-5)
    assert metrics["preference_loss"].item() == pytest.approx(preference, rel=1e-5)
    assert metrics["sft_loss"].item() == pytest.approx(sft, rel=1e-6)


def test_sft_averaging_is_independent_of_preference_averaging():
    _, metrics = run(sft_loss_weight=1.0, preference_average_log_probs=False, sft_average_log_probs=True)
    assert metrics["sft_loss"].item() == pytest.approx(AVERAGED_SFT, rel=1e-6)
    assert metrics["preference_loss"].item() == pytest.approx(
        hand_mean_loss("dpo", SUMMED_CHOSEN_LR, SUMMED_REJECTED_LR), rel=1e-5
    )
    _, metrics = run(sft_loss_weight=1.0, preference_average_log_probs=True, sft_average_log_probs=False)
    assert metrics["sft_loss"].item() == pytest.approx(SUMMED_SFT, rel=1e-6)


@pytest.mark.parametrize("average", [False, True], ids=["summed", "averaged"])
def test_reward_and_accuracy_metrics_by_hand(average):
    _, metrics = run(preference_average_log_probs=average)
    if average:
        # beta * averaged log-ratios: chosen [0.25, -1/12, 0], rejected [-1/16, 0.25, 0]
        chosen, rejected = [0.25, -1.0 / 12, 0.0], [-1.0 / 16, 0.25, 0.0]
    else:
        # beta * summed log-ratios: chosen [0.5, -0.25, 0], rejected [-0.25, 0.25, 0]
        chosen, rejected = [0.5, -0.25, 0.0], [-0.25, 0.25, 0.0]
    everything = chosen + rejected
    mean_all = sum(everything) / 6
    std_all = math.sqrt(sum((x - mean_all) ** 2 for x in everything) / 5)  # unbiased
    # Only the first pair has chosen > rejected; the tie in the third does not count.
    assert metrics["acc"].item() == pytest.approx(1.0 / 3)
    assert metrics["rewards_chosen_mean"].item() == pytest.approx(sum(chosen) / 3, abs=1e-7)
    assert metrics["rewards_rejected_mean"].item() == pytest.approx(sum(rejected) / 3, abs=1e-7)
    assert metrics["rewards_all_mean"].item() == pytest.approx(mean_all, abs=1e-7)
    assert metrics["rewards_all_std"].item() == pytest.approx(std_all, rel=1e-6)
    assert not any(value.requires_grad for value in metrics.values())


def test_equal_chosen_and_rejected_is_ln2_with_zero_accuracy():
    same = t([-3.0, -5.0, -3.0, -5.0])  # two pairs whose chosen and rejected rows are equal
    loss, metrics = preference_loss_and_metrics(same, t([-1.0, -2.0, -1.0, -2.0]), beta=0.1)
    assert loss.item() == torch.tensor(math.log(2.0), dtype=torch.float32).item()
    assert metrics["acc"].item() == 0.0


def test_unknown_loss_error_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_preference_loss("dpoo")
    message = str(err.value)
    assert "'dpoo'" in message
    for name in BUILTIN_LOSSES:
        assert name in message
    with pytest.raises(ValueError, match="dpoo"):
        run("dpoo")


def test_custom_registered_loss_is_used():
    @register_preference_loss("test_hinge")
    def hinge(chosen_logratios, rejected_logratios, *, beta, **_):
        return torch.relu(1.0 - beta * (chosen_logratios - rejected_logratios))

    try:
        assert get_preference_loss("test_hinge") is hinge
        loss, _ = run("test_hinge")
        # beta * margins = 0.5 * [1.5, -1, 0] -> hinge [0.25, 1.5, 1.0]
        assert loss.item() == pytest.approx((0.25 + 1.5 + 1.0) / 3)
        with pytest.raises(ValueError, match="already registered"):
            register_preference_loss("test_hinge")(hinge)
    finally:
        PREFERENCE_LOSSES.pop("test_hinge")


def test_builtin_names():
    assert sorted(PREFERENCE_LOSSES) == BUILTIN_LOSSES


@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("loss_type", BUILTIN_LOSSES)
def test_huge_logratios_stay_finite(loss_type, beta):
    policy = t([1e4, -1e4, -1e4, 1e4], requires_grad=True)  # log-ratios of magnitude 1e4 both ways
    loss, metrics = preference_loss_and_metrics(
        policy, torch.zeros(4), beta=beta, loss_type=loss_type, gt_rewards=t([1e4, -1e4, -1e4, 1e4]),
        sft_loss_weight=0.1,
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(policy.grad).all()
    assert all(torch.isfinite(value) for value in metrics.values())


@pytest.mark.parametrize("average", [False, True], ids=["summed", "averaged"])
def test_dpo_gradient_by_hand(average):
    policy = t(POLICY, requires_grad=True)
    sft_weight = 0.7
    loss, _ = preference_loss_and_metrics(
        policy, t(REF), torch.tensor(NUM_TOKENS), beta=BETA, sft_loss_weight=sft_weight,
        preference_average_log_probs=average,
    )
    loss.backward()
    chosen_lr = AVERAGED_CHOSEN_LR if average else SUMMED_CHOSEN_LR
    rejected_lr = AVERAGED_REJECTED_LR if average else SUMMED_REJECTED_LR
    tokens = NUM_TOKENS if average else [1] * 6
    expected = [0.0] * 6
    for i, (c, r) in enumerate(zip(chosen_lr, rejected_lr)):
        # d/dx [-logsigmoid(beta x)] = -beta sigmoid(-beta x), x = margin; the mean over 3 pairs
        # divides by 3 and averaging divides each row by its token count.
        dmargin = -BETA * sigmoid(-BETA * (c - r)) / 3
        expected[i] = dmargin / tokens[i] - sft_weight / 3 / tokens[i]  # SFT: d(-mean chosen logp)
        expected[3 + i] = -dmargin / tokens[3 + i]
    assert policy.grad.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_dpo_loss_gradient_single_pair():
    margin = t([0.8], requires_grad=True)
    dpo_loss(margin, torch.zeros(1), beta=0.3).sum().backward()
    assert margin.grad.item() == pytest.approx(-0.3 * sigmoid(-0.3 * 0.8), rel=1e-6)


@pytest.mark.parametrize("loss_type", ["rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl"])
def test_rpo_needs_ground_truth_rewards(loss_type):
    with pytest.raises(ValueError, match="ground-truth rewards"):
        preference_loss_and_metrics(t(POLICY), t(REF), beta=BETA, loss_type=loss_type)


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_tokens"):
        preference_loss_and_metrics(t(POLICY), t(REF), beta=BETA, preference_average_log_probs=True)
    with pytest.raises(ValueError, match="even number of rows"):
        preference_loss_and_metrics(t(POLICY[:5]), t(REF[:5]), beta=BETA)
