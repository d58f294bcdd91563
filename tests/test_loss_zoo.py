"""The loss zoo against an independent reimplementation on plain Python floats.

Each reference below is written from the paper's formula (probabilities, odds,
``t = pi / pi_ref``) rather than from the library's log-sigmoid form, pair by
pair with ``math``; the library computes batched tensors.
"""

import math
import sys
import textwrap

import pytest
import torch

from nemo_dpo.losses import (
    LOSS_ZOO,
    PREFERENCE_LOSSES,
    PreferenceLossInputs,
    PreferenceLossSettings,
    build_preference_loss,
    dpo_loss,
    logps_metrics,
    register_loss,
    register_preference_loss,
    resolve_loss,
)

BETA = 0.5
# Three pairs: summed log-probs, response lengths, ground-truth rewards.
POLICY_C, POLICY_R = [-3.0, -5.0, -7.5], [-4.0, -2.0, -7.0]
REF_C, REF_R = [-3.5, -4.0, -8.0], [-3.0, -2.5, -6.0]
LEN_C, LEN_R = [2, 3, 4], [3, 1, 5]
GT_C, GT_R = [2.0, 1.0, 0.0], [1.0, 2.0, 0.5]
GT_SCALE = 0.5
# LD-DPO: sums over each pair's first min(LEN_C, LEN_R) = [2, 1, 4] response tokens.
SHARED_POLICY_C, SHARED_POLICY_R = [-3.0, -2.5, -6.0], [-3.0, -2.0, -6.5]
SHARED_REF_C, SHARED_REF_R = [-3.5, -2.0, -6.5], [-2.0, -2.5, -5.5]
# WPO: summed aligned log-probs log p(y_t) - log sum_v p(v)^2.
WEIGHT_C, WEIGHT_R = [-1.0, -2.0, -0.5], [-2.0, -0.5, -1.5]


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def log_sig(x):
    return math.log(sig(x))


def pairs(pol_c=POLICY_C, pol_r=POLICY_R, ref_c=REF_C, ref_r=REF_R, len_c=LEN_C, len_r=LEN_R):
    return [dict(pc=a, pr=b, rc=c, rr=d, lc=e, lr=f, gc=g, gr=h, wc=i, wr=j)
            for a, b, c, d, e, f, g, h, i, j in zip(pol_c, pol_r, ref_c, ref_r, len_c, len_r, GT_C, GT_R,
                                                    WEIGHT_C, WEIGHT_R)]


def inputs_from(batch, **overrides):
    t = lambda key: torch.tensor([p[key] for p in batch], dtype=torch.float32)  # noqa: E731
    fields = dict(
        policy_chosen_logps=t("pc"), policy_rejected_logps=t("pr"), beta=BETA,
        reference_chosen_logps=t("rc"), reference_rejected_logps=t("rr"),
        chosen_lengths=torch.tensor([p["lc"] for p in batch]), rejected_lengths=torch.tensor([p["lr"] for p in batch]),
        gt_rewards_chosen=t("gc"), gt_rewards_rejected=t("gr"), gt_reward_scale=GT_SCALE,
        chosen_weighting_logps=t("wc"), rejected_weighting_logps=t("wr"),
    )
    fields.update(overrides)
    return PreferenceLossInputs(**fields)


def score(u, s):
    """f'(t) at t = pi / pi_ref = exp(u), constants dropped (TRL's parametrisation of alpha)."""
    t, kind = math.exp(u), s.get("f_divergence_type", "reverse_kl")
    if kind == "forward_kl":
        return -1.0 / t
    if kind == "js_divergence":
        return math.log(2 * t / (t + 1)) - math.log(2)
    if kind == "alpha_divergence":
        a = s["f_alpha_divergence_coef"]
        return t ** (a - 1) / (a - 1)
    return u


def flip_logistic(z, eps):
    """Expected logistic loss when the label is flipped with probability eps."""
    return -(1 - eps) * log_sig(z) - eps * log_sig(-z)


def kl_bernoulli(a, b):
    return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))


def reference(name, batch, s, beta=BETA):
    """Per-pair losses by hand; ``s`` holds the non-default settings."""
    eps = s.get("label_smoothing", 0.0)
    out = []
    if name in ("aot", "aot_unpaired"):
        if name == "aot":
            xs = sorted(p["pc"] - p["pr"] for p in batch)
            ys = sorted(p["rc"] - p["rr"] for p in batch)
        else:
            xs = sorted(p["pc"] - p["rc"] for p in batch)
            ys = sorted(p["pr"] - p["rr"] for p in batch)
        return [flip_logistic(beta * (x - y), eps) for x, y in zip(xs, ys)]
    if name == "bco_pair":
        rewards = [beta * score(p[k] - p[r], s) for p in batch for k, r in (("pc", "rc"), ("pr", "rr"))]
        delta = s.get("bco_mean", sum(rewards) / len(rewards))
    for p in batch:
        uc, ur = p["pc"] - p["rc"], p["pr"] - p["rr"]
        sc, sr = score(uc, s), score(ur, s)
        z = beta * (sc - sr)
        mean_c, mean_r = p["pc"] / p["lc"], p["pr"] / p["lr"]
        if name == "dpo":
            value = flip_logistic(z, eps)
        elif name == "hinge":
            value = max(0.0, 1.0 - z)
        elif name == "ipo":
            value = (uc - ur - 1 / (2 * beta)) ** 2
        elif name == "rpo_sq":
            value = (beta * (uc - ur) - GT_SCALE * (p["gc"] - p["gr"])) ** 2
        elif name == "rpo_bwd_kl":
            value = kl_bernoulli(sig(GT_SCALE * (p["gc"] - p["gr"])), sig(beta * (uc - ur)))
        elif name == "rpo_fwd_kl":
            value = kl_bernoulli(sig(beta * (uc - ur)), sig(GT_SCALE * (p["gc"] - p["gr"])))
        elif name == "robust":
            value = ((1 - eps) * -log_sig(z) - eps * -log_sig(-z)) / (1 - 2 * eps)
        elif name == "exo_pair":
            q = sig(z)  # model's probability that chosen wins; target [1 - eps, eps]
            value = q * math.log(q / (1 - eps)) + (1 - q) * math.log((1 - q) / eps)
        elif name == "nca_pair":
            value = -log_sig(beta * sc) - 0.5 * log_sig(-beta * sc) - 0.5 * log_sig(-beta * sr)
        elif name == "bco_pair":
            value = -log_sig(beta * sc - delta) - log_sig(delta - beta * sr)
        elif name == "sppo_hard":
            value = (sc - 1 / (2 * beta)) ** 2 + (sr + 1 / (2 * beta)) ** 2
        elif name == "apo_zero":
            value = (1 - sig(beta * uc)) + sig(beta * ur)
        elif name == "apo_down":
            value = sig(beta * uc) + (1 - sig(z))
        elif name == "discopop":
            m = sig(z / s.get("discopop_tau", 0.05))
            value = (1 - m) * -log_sig(z) + m * math.exp(-z)
        elif name == "sigmoid_norm":
            value = -log_sig(beta * (sc / p["lc"] - sr / p["lr"]))
        elif name == "simpo":
            value = flip_logistic(beta * (mean_c - mean_r) - s.get("simpo_gamma", 0.5), eps)
        elif name == "orpo":
            odds = lambda logp: math.exp(logp) / (1 - math.exp(logp))  # noqa: E731
            value = -mean_c - beta * log_sig(math.log(odds(mean_c) / odds(mean_r)))
        elif name == "sft":
            value = -mean_c
        else:
            raise AssertionError(name)
        out.append(value)
    return out


CASES = [
    ("dpo", {}), ("dpo", {"label_smoothing": 0.1}), ("hinge", {}), ("ipo", {}), ("rpo_sq", {}),
    ("rpo_bwd_kl", {}), ("rpo_fwd_kl", {}), ("robust", {"label_smoothing": 0.2}),
    ("exo_pair", {"label_smoothing": 0.1}), ("nca_pair", {}), ("bco_pair", {}), ("sppo_hard", {}),
    ("aot", {}), ("aot", {"label_smoothing": 0.1}), ("aot_unpaired", {"label_smoothing": 0.1}),
    ("apo_zero", {}), ("apo_down", {}), ("discopop", {}), ("discopop", {"discopop_tau": 0.5}),
    ("sigmoid_norm", {}), ("simpo", {}), ("simpo", {"simpo_gamma": 1.2, "label_smoothing": 0.1}),
    ("orpo", {}), ("sft", {}),
    *[(name, {"f_divergence_type": kind, **extra})
      for name in ("dpo", "hinge", "nca_pair", "sppo_hard", "apo_down", "discopop", "sigmoid_norm", "bco_pair")
      for kind, extra in (("forward_kl", {}), ("js_divergence", {}),
                          ("alpha_divergence", {"f_alpha_divergence_coef": 0.5}))],
]


def case_id(case):
    name, settings = case
    return "-".join([name, *(f"{k}={v}" for k, v in settings.items())])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_loss_matches_its_formula(case):
    name, settings = case
    mixture = build_preference_loss(name, settings=PreferenceLossSettings(**settings))
    got = mixture(inputs_from(pairs())).loss
    assert got.shape == (3,) and got.dtype == torch.float32
    assert got.tolist() == pytest.approx(reference(name, pairs(), settings), rel=2e-5, abs=1e-6)


def test_every_registered_loss_is_tested():
    assert {name for name, _ in CASES} == set(LOSS_ZOO)


def test_trl_alias_and_nemo_dpo_agree():
    lr_c = [c - r for c, r in zip(POLICY_C, REF_C)]
    lr_r = [c - r for c, r in zip(POLICY_R, REF_R)]
    legacy = dpo_loss(torch.tensor(lr_c), torch.tensor(lr_r), beta=BETA)
    assert resolve_loss("sigmoid") is resolve_loss("dpo")
    assert torch.equal(build_preference_loss("sigmoid")(inputs_from(pairs())).loss, legacy)


def test_alpha_divergence_limits_are_reverse_and_forward_kl():
    batch = inputs_from(pairs())
    at = lambda **s: build_preference_loss("dpo", settings=PreferenceLossSettings(**s))(batch).loss  # noqa: E731
    assert torch.allclose(at(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0), at())
    assert torch.allclose(at(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.0),
                          at(f_divergence_type="forward_kl"))


def test_bco_running_mean_across_batches_and_checkpoint():
    first, second = pairs(), pairs(pol_c=[-1.0, -6.0, -2.0])
    rewards = lambda batch: [BETA * (p[a] - p[b]) for p in batch for a, b in (("pc", "rc"), ("pr", "rr"))]  # noqa: E731
    mean1 = sum(rewards(first)) / 6
    mean2 = (mean1 + sum(rewards(second)) / 6) / 2  # each batch counts once
    loss = build_preference_loss("bco_pair")
    assert loss(inputs_from(first)).loss.tolist() == pytest.approx(reference("bco_pair", first, {}), rel=1e-5)
    saved = loss.state_dict()
    assert saved["bco_pair"]["running_mean"].item() == pytest.approx(mean1)
    got = loss(inputs_from(second)).loss
    assert got.tolist() == pytest.approx(reference("bco_pair", second, {"bco_mean": mean2}), rel=1e-5)
    # Validation does not move the mean.
    loss(inputs_from(second, update_state=False))
    assert loss.state_dict()["bco_pair"]["running_mean"].item() == pytest.approx(mean2)
    # A fresh loss restored from the first state continues exactly as the original did.
    restored = build_preference_loss("bco_pair")
    restored.load_state_dict(saved)
    assert torch.equal(restored(inputs_from(second)).loss, got)
    with pytest.raises(ValueError, match="expected"):
        restored.load_state_dict({})


@pytest.mark.parametrize("name", ["aot", "aot_unpaired", "bco_pair"])
def test_batch_level_losses_with_one_pair(name):
    batch = pairs()[1:2]
    got = build_preference_loss(name)(inputs_from(batch)).loss
    assert got.shape == (1,)
    assert got.tolist() == pytest.approx(reference(name, batch, {}), rel=1e-5)
    if name == "aot":  # sorting one pair changes nothing: plain DPO
        assert got.tolist() == pytest.approx(reference("dpo", batch, {}), rel=1e-5)


def test_ld_alpha_reweights_the_tail():
    alpha = 0.3
    ld = lambda full, shared: [s + alpha * (f - s) for f, s in zip(full, shared)]  # noqa: E731
    batch = pairs(pol_c=ld(POLICY_C, SHARED_POLICY_C), pol_r=ld(POLICY_R, SHARED_POLICY_R),
                  ref_c=ld(REF_C, SHARED_REF_C), ref_r=ld(REF_R, SHARED_REF_R))
    t = lambda values: torch.tensor(values)  # noqa: E731
    inputs = inputs_from(pairs(), policy_chosen_shared_logps=t(SHARED_POLICY_C),
                         policy_rejected_shared_logps=t(SHARED_POLICY_R),
                         reference_chosen_shared_logps=t(SHARED_REF_C), reference_rejected_shared_logps=t(SHARED_REF_R))
    got = build_preference_loss("dpo", settings=PreferenceLossSettings(ld_alpha=alpha))(inputs).loss
    assert got.tolist() == pytest.approx(reference("dpo", batch, {}), rel=1e-5)
    # ld_alpha = 1 is plain DPO.
    plain = build_preference_loss("dpo", settings=PreferenceLossSettings(ld_alpha=1.0))(inputs).loss
    assert plain.tolist() == pytest.approx(reference("dpo", pairs(), {}), rel=1e-5)
    with pytest.raises(ValueError, match="policy_chosen_shared_logps"):
        build_preference_loss("dpo", settings=PreferenceLossSettings(ld_alpha=alpha))(inputs_from(pairs()))


def test_wpo_weighting_multiplies_every_term():
    settings = PreferenceLossSettings(use_weighting=True)
    got = build_preference_loss(["dpo", "sft"], [1.0, 0.5], settings)(inputs_from(pairs()))
    weights = [math.exp(p["wc"] / p["lc"]) * math.exp(p["wr"] / p["lr"]) for p in pairs()]
    dpo, sft = reference("dpo", pairs(), {}), reference("sft", pairs(), {})
    assert got.terms["dpo"].tolist() == pytest.approx([w * v for w, v in zip(weights, dpo)], rel=1e-5)
    assert got.loss.tolist() == pytest.approx([w * (a + 0.5 * b) for w, a, b in zip(weights, dpo, sft)], rel=1e-5)
    # The weight carries no gradient: d loss / d policy logp is the unweighted derivative times the weight.
    inputs = inputs_from(pairs(), policy_chosen_logps=torch.tensor(POLICY_C, requires_grad=True))
    build_preference_loss("dpo", settings=settings)(inputs).loss.sum().backward()
    unweighted = [-BETA * sig(-BETA * ((p["pc"] - p["rc"]) - (p["pr"] - p["rr"]))) for p in pairs()]
    assert inputs.policy_chosen_logps.grad.tolist() == pytest.approx([w * g for w, g in zip(weights, unweighted)],
                                                                     rel=1e-5)


def test_mixture_is_the_weighted_sum_of_its_terms():
    weights = [1.0, 0.5, 0.2]
    out = build_preference_loss(["sigmoid", "bco_pair", "sft"], weights)(inputs_from(pairs()))
    assert list(out.terms) == ["dpo", "bco_pair", "sft"]
    terms = [reference(name, pairs(), {}) for name in ("dpo", "bco_pair", "sft")]
    for name, expected in zip(out.terms, terms):
        assert out.terms[name].tolist() == pytest.approx(expected, rel=1e-5)
    expected = [sum(w * term[i] for w, term in zip(weights, terms)) for i in range(3)]
    assert out.loss.tolist() == pytest.approx(expected, rel=1e-5)
    rpo = build_preference_loss("dpo", settings=PreferenceLossSettings(rpo_alpha=0.7))(inputs_from(pairs()))
    assert rpo.terms["rpo_nll"].tolist() == pytest.approx(terms[2], rel=1e-5)
    assert rpo.loss.tolist() == pytest.approx([a + 0.7 * b for a, b in zip(terms[0], terms[2])], rel=1e-5)


def test_reference_free_losses_need_no_reference():
    for names in (["simpo"], ["orpo"], ["simpo", "sft"]):
        mixture = build_preference_loss(names)
        assert mixture.reference_free
        out = mixture(inputs_from(pairs(), reference_chosen_logps=None, reference_rejected_logps=None))
        assert torch.isfinite(out.loss).all()
    mixture = build_preference_loss(["simpo", "dpo"])
    assert not mixture.reference_free
    with pytest.raises(ValueError, match=r"\['dpo'\] need reference log-probs"):
        mixture(inputs_from(pairs(), reference_chosen_logps=None, reference_rejected_logps=None))


def test_equal_chosen_and_rejected():
    same = pairs(pol_r=POLICY_C, ref_r=REF_C, len_r=LEN_C)
    for name, settings in CASES:
        got = build_preference_loss(name, settings=PreferenceLossSettings(**settings))(inputs_from(same)).loss
        assert got.tolist() == pytest.approx(reference(name, same, settings), rel=2e-5, abs=1e-6), name
    dpo = build_preference_loss("sigmoid")(inputs_from(same)).loss
    assert dpo.tolist() == [torch.tensor(math.log(2.0)).item()] * 3


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_huge_margins_stay_finite(case):
    name, settings = case
    big = 5e3
    # Log-probs stay <= 0 (ORPO's odds need it); margins of 1e4 both ways, lengths 1 so means are huge too.
    policy_c = torch.tensor([-1e-3, -2 * big, -big], requires_grad=True)
    policy_r = torch.tensor([-2 * big, -1e-3, -big], requires_grad=True)
    inputs = PreferenceLossInputs(
        policy_c, policy_r, BETA, torch.tensor([-big, -big, -2 * big]), torch.tensor([-big, -big, -1e-3]),
        torch.ones(3), torch.ones(3), torch.tensor([1e4, -1e4, 0.0]), torch.tensor([-1e4, 1e4, 0.0]),
    )
    loss = build_preference_loss(name, settings=PreferenceLossSettings(**settings))(inputs).loss
    loss.sum().backward()
    assert torch.isfinite(loss).all(), loss
    # sft never reads the rejected response, so that one may get no gradient at all.
    assert all(g is None or torch.isfinite(g).all() for g in (policy_c.grad, policy_r.grad))
    assert policy_c.grad is not None


@pytest.mark.parametrize("names, settings", [
    (["sigmoid_norm"], {}), (["simpo"], {}), (["orpo"], {}), (["sft"], {}), (["dpo"], {"use_weighting": True}),
])
def test_zero_length_responses_are_refused(names, settings):
    inputs = inputs_from(pairs(len_r=[3, 0, 5]))
    with pytest.raises(ValueError, match=r"pair\(s\) \[1\] have a zero-length"):
        build_preference_loss(names, settings=PreferenceLossSettings(**settings))(inputs)
    with pytest.raises(ValueError, match="needs the input chosen_lengths"):
        build_preference_loss(names, settings=PreferenceLossSettings(**settings))(
            inputs_from(pairs(), chosen_lengths=None, rejected_lengths=None))


def test_unknown_name_lists_every_choice():
    with pytest.raises(ValueError) as err:
        build_preference_loss(["dpo", "sigmod"])
    message = str(err.value)
    assert message.startswith("unknown preference_loss 'sigmod'; valid names: ")
    for name in [*LOSS_ZOO, "sigmoid"]:
        assert name in message


def test_custom_loss_imported_by_path(tmp_path, monkeypatch):
    (tmp_path / "my_zoo_losses.py").write_text(textwrap.dedent("""
        import torch

        def margin_loss(inputs, settings):
            return torch.relu(0.5 - (inputs.policy_chosen_logps - inputs.policy_rejected_logps))
        margin_loss.reference_free = True

        not_a_function = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        mixture = build_preference_loss(["my_zoo_losses:margin_loss", "dpo"], [1.0, 2.0])
        out = mixture(inputs_from(pairs()))
        custom = [max(0.0, 0.5 - (c - r)) for c, r in zip(POLICY_C, POLICY_R)]
        assert out.terms["my_zoo_losses:margin_loss"].tolist() == pytest.approx(custom)
        assert out.loss.tolist() == pytest.approx([a + 2 * b for a, b in zip(custom, reference("dpo", pairs(), {}))],
                                                  rel=1e-5)
        assert build_preference_loss("my_zoo_losses:margin_loss").reference_free
        for path, why in (("my_zoo_losses:missing", "cannot be imported"), ("no_such_pkg.mod:loss", "cannot be imported"),
                          ("my_zoo_losses:not_a_function", "is not callable")):
            with pytest.raises(ValueError) as err:
                build_preference_loss(path)
            message = str(err.value)
            assert f"preference_loss {path!r} {why}" in message and "valid names: " in message and "\n" not in message
    finally:
        sys.modules.pop("my_zoo_losses", None)


def test_registered_losses_of_both_interfaces():
    @register_loss("test_zoo_margin", reads=("simpo_gamma",))
    def zoo_margin(inputs, settings):
        chosen, rejected = inputs.logratios("test_zoo_margin")
        return torch.relu(settings.simpo_gamma - (chosen - rejected))

    @register_preference_loss("test_legacy_margin")
    def legacy_margin(chosen_logratios, rejected_logratios, *, beta, **_):
        return torch.relu(1.0 - beta * (chosen_logratios - rejected_logratios))

    try:
        margins = [(p["pc"] - p["rc"]) - (p["pr"] - p["rr"]) for p in pairs()]
        zoo = build_preference_loss("test_zoo_margin", settings=PreferenceLossSettings(simpo_gamma=2.0))
        assert zoo(inputs_from(pairs())).loss.tolist() == pytest.approx([max(0.0, 2.0 - m) for m in margins])
        legacy = build_preference_loss("test_legacy_margin")
        assert legacy(inputs_from(pairs())).loss.tolist() == pytest.approx([max(0.0, 1 - BETA * m) for m in margins])
        with pytest.raises(ValueError, match="already registered"):
            register_loss("sigmoid")(zoo_margin)
    finally:
        LOSS_ZOO.pop("test_zoo_margin")
        PREFERENCE_LOSSES.pop("test_legacy_margin")


@pytest.mark.parametrize("names, weights, settings, match", [
    ("dpo", None, {"simpo_gamma": 1.0}, "model.dpo.simpo_gamma is set, but no selected preference_loss"),
    ("ipo", None, {"f_divergence_type": "forward_kl"}, "'ipo' does not support f_divergence_type"),
    ("robust", None, {"label_smoothing": 0.5}, "needs label_smoothing < 0.5"),
    ("exo_pair", None, {}, "needs label_smoothing > 0"),
    ("aot", None, {"use_weighting": True}, "use_weighting cannot be combined"),
    (["dpo", "sigmoid"], None, {}, "lists a loss twice"),
    (["dpo", "sft"], [1.0], {}, "has 1 entries for 2 losses"),
    (["dpo"], [float("nan")], {}, "must be finite"),
    ([], None, {}, "names no loss"),
])
def test_bad_selections_fail_at_build(names, weights, settings, match):
    with pytest.raises(ValueError, match=match):
        build_preference_loss(names, weights, PreferenceLossSettings(**settings))


@pytest.mark.parametrize("settings, match", [
    ({"label_smoothing": 1.0}, "label_smoothing"), ({"discopop_tau": 0.0}, "discopop_tau"),
    ({"f_divergence_type": "kl"}, "f_divergence_type must be one of"), ({"ld_alpha": 1.5}, "ld_alpha"),
    ({"rpo_alpha": -1.0}, "rpo_alpha"),
])
def test_settings_are_validated(settings, match):
    with pytest.raises(ValueError, match=match):
        PreferenceLossSettings(**settings)


def test_inputs_are_validated():
    with pytest.raises(ValueError, match="reference_chosen_logps and reference_rejected_logps"):
        inputs_from(pairs(), reference_rejected_logps=None)
    with pytest.raises(ValueError, match=r"chosen_lengths has shape \(2,\)"):
        inputs_from(pairs(), chosen_lengths=torch.tensor([1, 2]))


def test_logps_metrics():
    metrics = logps_metrics(inputs_from(pairs()))
    assert metrics["logps_chosen_mean"].item() == pytest.approx(sum(POLICY_C) / 3)
    assert metrics["logps_rejected_mean"].item() == pytest.approx(sum(POLICY_R) / 3)
    margins = [BETA * ((p["pc"] - p["rc"]) - (p["pr"] - p["rr"])) for p in pairs()]
    assert metrics["rewards_margin_mean"].item() == pytest.approx(sum(margins) / 3)
    free = logps_metrics(inputs_from(pairs(), reference_chosen_logps=None, reference_rejected_logps=None))
    assert sorted(free) == ["logps_chosen_mean", "logps_rejected_mean"]
