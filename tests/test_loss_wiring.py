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


def reference_free_model_keeps_no_reference() -> dict:
    from dpo_workers import EOS, VOCAB, model_config
    from nemo_dpo.algorithms.dpo import dpo_custom_collate
    from nemo_dpo.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
    from nemo_dpo.parallel.initialize import ParallelLayout, initialize_parallel

    initialize_parallel(ParallelLayout(1, 1), seed=0)
    model = MegatronGPTDPOModel(model_config(2, 2, preference_loss="simpo"), VOCAB)
    out = {"reference": model.reference_policy}
    with pytest.raises(ValueError, match=r"preference_loss \['simpo'\] is reference-free"):
        model.get_ref_policy_logprobs({})
    with pytest.warns(UserWarning, match="reference weights assigned to ref_policy_state_dict are not kept"):
        model.ref_policy_state_dict = {}
    # Batches without reference log-probs train: the loss never reads them.
    model.prepare_for_training_step()
    out["loss"], _ = model.get_loss_and_metrics(dpo_custom_collate(synthetic_pairs(2), eos_id=EOS), forward_only=False)
    return out


def test_reference_free_model_keeps_no_reference_copy(dist_pool):
    (out,) = dist_pool.run(1, reference_free_model_keeps_no_reference)
    assert out["reference"] is None and math.isfinite(out["loss"])


@pytest.fixture(scope="module")
def mixture_run(dist_pool, tmp_path_factory):
    items = synthetic_pairs(11)
    records = dist_pool.run(1, train_dpo, 1, 1, 2, 4, 5, items, str(tmp_path_factory.mktemp("mix")), MIXTURE)
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
    got = dist_pool.run(2, train_dpo, tp, pp, 2, 4, 5, items, str(tmp_path), MIXTURE)[0]["records"]
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
