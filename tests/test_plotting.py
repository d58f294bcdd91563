"""curve_*.png from metrics.jsonl: which series each picture draws, and a run never failing over pictures."""

import json
import logging
import sys

import pytest

from nemo_dpo.cli.plot import main as plot_main
from nemo_dpo.utils.metrics_file import read_series
from nemo_dpo.utils.plotting import CURVES, plot_metrics, plot_metrics_or_warn


def write_metrics(folder, records):
    with open(folder / "metrics.jsonl", "w") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")


TRAIN = [{"step": s, "wall_time": 100.0 + s, "train/loss": 0.7 - 0.1 * s, "train/acc": 0.2 * s,
          "train/grad_norm": 2.0, "train/lr": 1e-4 * s} for s in (1, 2, 3)]
VALIDATION = {"step": 3, "wall_time": 104.0, "val/loss": 0.5, "val/acc": 0.75}


def test_read_series_by_step_newest_value_wins_non_finite_dropped(tmp_path):
    # A resumed run logs step 2 again; a NaN loss was written as the string "nan".
    write_metrics(tmp_path, [*TRAIN, VALIDATION, {"step": 2, "wall_time": 200.0, "train/loss": 0.9},
                             {"step": 4, "wall_time": 201.0, "train/loss": "nan"}])
    series = read_series(tmp_path / "metrics.jsonl")
    assert series["train/loss"] == [(1, pytest.approx(0.6)), (2, 0.9), (3, pytest.approx(0.4))]
    assert series["val/acc"] == [(3, 0.75)]
    assert "wall_time" not in series and "step" not in series


def test_each_picture_draws_the_series_present(tmp_path):
    write_metrics(tmp_path, [*TRAIN, VALIDATION])
    written = plot_metrics(tmp_path)
    # No reward was logged: those two pictures are not written.
    assert {path.name: series for path, series in written.items()} == {
        "curve_loss.png": ["train/loss", "val/loss"],
        "curve_accuracy.png": ["train/acc", "val/acc"],
        "curve_grad_norm.png": ["train/grad_norm"],
        "curve_learning_rate.png": ["train/lr"],
    }
    for path in written:
        assert path.parent == tmp_path and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "curve_rewards.png").exists()


def test_drawn_lines_hold_the_logged_values(tmp_path, monkeypatch):
    """What reaches matplotlib is the metrics' own (step, value) points."""
    from matplotlib.axes import Axes

    drawn = {}
    plot = Axes.plot

    def recording_plot(self, x, y, *args, label=None, **kwargs):
        drawn[label] = list(zip(x, y))
        return plot(self, x, y, *args, label=label, **kwargs)

    monkeypatch.setattr(Axes, "plot", recording_plot)
    write_metrics(tmp_path, [*TRAIN, VALIDATION])
    plot_metrics(tmp_path)
    series = read_series(tmp_path / "metrics.jsonl")
    assert drawn == {name: series[name] for name in drawn}
    assert sorted(drawn) == sorted({name for _, names in CURVES.values() for name in names} & set(series))


def test_without_matplotlib_a_run_warns_and_draws_nothing(tmp_path, monkeypatch, caplog):
    write_metrics(tmp_path, TRAIN)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with caplog.at_level(logging.WARNING):
        assert plot_metrics_or_warn(tmp_path) == {}
    assert "matplotlib is not installed" in caplog.text and not list(tmp_path.glob("*.png"))


def test_a_broken_metrics_file_warns_with_its_line(tmp_path, caplog):
    write_metrics(tmp_path, TRAIN)
    with open(tmp_path / "metrics.jsonl", "a") as out:
        out.write('{"step": 4, "train/loss": \n')
    with caplog.at_level(logging.WARNING):
        assert plot_metrics_or_warn(tmp_path) == {}
    assert f"{tmp_path / 'metrics.jsonl'}:4: not a metrics record" in caplog.text


def test_plot_command_refuses_a_folder_without_metrics(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plot_main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"{tmp_path}: no metrics.jsonl" in capsys.readouterr().err
