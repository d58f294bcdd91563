"""The loss zoo wired into the model: selection at start-up, mixtures, reference-free runs, loss state."""

import math

import pytest
import torch

from dpo_workers import synthetic_pairs, train_dpo
from nemo_dpo.checkpoint.training_state import read_training_state, write_training_state
from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import DPOSettings

MIXTURE = dict(preference_loss=["sigmoid", "sft"], preference_loss_weights=[1.0, 0.5])


def _series(records, key):
    return [r[key] for r in records if key in r]


def test_settings_select_zoo_losses_and_refuse_what_the_model_cannot_give():
    settings = DPOSettings.from_config({"preference_loss": ["sigmoid", "bco_pair"], "label_smoothing": 0.1})
    assert settings.preference_loss == ("sigmoid", "bco_pair")
    assert settings.build_preference_loss().names == ("dpo", "bco_pair")
    with pytest.raises(ValueError, match="unknown preference_loss 'simpoo'; valid names: dpo, ipo"):
        DPOSettings.from_config({"preference_loss": "simpoo"})
    with pytest.raises(ValueError, match="model.dpo.simpo_gamma is set, but no selected preference_loss"):
        DPOSettings.from_config({"preference_loss": "dpo", "simpo_gamma": 1.0})
    for key, value in (("ld_alpha", 0.5), ("use_weighting", True)):
        with pytest.raises(ValueError, match=f"model.dpo.{key} is not supported yet"):
            DPOSettings.from_config({key: value})
    with pytest.raises(ValueError, match="cannot mix the length-normalised"):
        DPOSettings.from_config({**MIXTURE, "preference_average_log_probs": True})
    DPOSettings.from_config({"preference_loss": "simpo", "preference_average_log_probs": True})


def test_loss_state_is_saved_per_rank(tmp_path):
    states = [{"bco_pair": {"running_mean": torch.tensor(0.25, dtype=torch.float64), "count": torch.tensor(3)}}]
    write_training_state(tmp_path / "state.pt", {"last_epoch": 2}, [{}], states)
    loaded = read_training_state(tmp_path / "state.pt")
    assert loaded["loss"][0]["bco_pair"]["running_mean"].item() == 0.25
    assert loaded["loss"][0]["bco_pair"]["count"].item() == 3


def test_reference_free_loss_never_runs_the_reference(dist_pool, tmp_path):
    items = synthetic_pairs(11)
    (result,) = dist_pool.run(1, train_dpo, 1, 1, 2, 4, 3, items, str(tmp_path), dict(preference_loss="simpo"))
    assert result["ref_forwards"] == 0
    losses = _series(result["records"], "train/loss")
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert _series(result["records"], "train/loss_simpo") == pytest.approx(losses, abs=1e-6)
    assert len(_series(result["records"], "train/logps_chosen_mean")) == 3


@pytest.fixture(scope="module")
def mixture_run(dist_pool, tmp_path_factory):
    items = synthetic_pairs(11)
    records = dist_pool.run(1, train_dpo, 1, 1, 2, 4, 3, items, str(tmp_path_factory.mktemp("mix")), MIXTURE)
    return items, records[0]["records"]


def test_mixture_is_the_weighted_sum_of_its_terms(dist_pool, mixture_run, tmp_path):
    items, records = mixture_run
    singles = {name: dist_pool.run(1, train_dpo, 1, 1, 2, 4, 1, items, str(tmp_path / name),
                                   dict(preference_loss=name))[0]["records"] for name in ("sigmoid", "sft")}
    step0 = {name: _series(r, "train/loss")[0] for name, r in singles.items()}
    assert _series(records, "train/loss")[0] == pytest.approx(step0["sigmoid"] + 0.5 * step0["sft"], abs=1e-6)
    for loss, dpo, sft in zip(*(_series(records, f"train/{k}") for k in ("loss", "loss_dpo", "loss_sft"))):
        assert loss == pytest.approx(dpo + 0.5 * sft, abs=1e-5)
    assert _series(records, "train/rewards_margin_mean")[0] == 0.0  # policy == reference at step 0


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=str)
def test_mixture_trains_identically_across_layouts(dist_pool, mixture_run, tmp_path, tp, pp):
    items, expected = mixture_run
    got = dist_pool.run(2, train_dpo, tp, pp, 2, 4, 3, items, str(tmp_path), MIXTURE)[0]["records"]
    for key in ("train/loss", "train/loss_dpo", "train/loss_sft", "train/logps_chosen_mean", "train/grad_norm",
                "val/loss", "val/acc"):
        assert _series(got, key) == pytest.approx(_series(expected, key), abs=1e-5), key


def test_custom_loss_example_trains_every_route(dist_pool, tmp_path):
    from example_workers import custom_loss_example

    (runs,) = dist_pool.run(1, custom_loss_example, str(tmp_path))
    assert sorted(runs) == ["import", "register", "subclass"]
    for route, records in runs.items():
        losses = _series(records, "train/loss")
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses), route
    # Step 0, policy == reference: -log sigmoid(-1) for the margin loss, relu(1 - 0) for the hinge.
    assert _series(runs["import"], "train/loss")[0] == pytest.approx(-math.log(1 / (1 + math.e)), abs=1e-6)
    assert _series(runs["subclass"], "train/loss")[0] == pytest.approx(1.0, abs=1e-6)
    first_step = next(r for r in runs["register"] if "train/loss" in r)  # after the default run's task metric
    assert "train/loss_mean_logp_margin" in first_step
