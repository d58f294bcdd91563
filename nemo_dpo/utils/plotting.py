"""PNG curves of a run's ``metrics.jsonl``, written next to it (matplotlib, optional).

Drawn at the end of every run (rank 0) and on demand by ``nemo-dpo-plot RUN_DIR``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nemo_dpo.utils.metrics_file import read_series

log = logging.getLogger(__name__)

# File name -> (title, the metrics.jsonl series it draws when present).
CURVES: dict[str, tuple[str, tuple[str, ...]]] = {
    "curve_loss.png": ("Loss", ("train/loss", "val/loss")),
    "curve_accuracy.png": ("Preference accuracy", ("train/acc", "val/acc")),
    "curve_reward_margin.png": ("Reward margin (chosen - rejected)",
                                ("train/rewards_margin_mean", "val/rewards_margin_mean")),
    "curve_rewards.png": ("Implicit rewards", ("train/rewards_chosen_mean", "train/rewards_rejected_mean",
                                               "val/rewards_chosen_mean", "val/rewards_rejected_mean")),
    "curve_grad_norm.png": ("Gradient norm", ("train/grad_norm",)),
    "curve_learning_rate.png": ("Learning rate", ("train/lr",)),
}


def plot_metrics(run_dir: str | Path) -> dict[Path, list[str]]:
    """Write :data:`CURVES` for ``run_dir/metrics.jsonl`` into ``run_dir``; returns each file written with
    the series it drew (a figure none of whose series was logged is not written).

    Raises ImportError without matplotlib.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI; PNGs render with Agg

    run_dir = Path(run_dir)
    series = read_series(run_dir / "metrics.jsonl")
    written = {}
    for file_name, (title, names) in CURVES.items():
        drawn = [name for name in names if series.get(name)]
        if not drawn:
            continue
        figure = Figure(figsize=(6, 4), layout="constrained")
        axes = figure.subplots()
        for name in drawn:
            steps, values = zip(*series[name])
            # Validation is sparse: markers keep a single point visible.
            axes.plot(steps, values, label=name, marker="o" if name.startswith("val/") else None, markersize=3)
        axes.set(title=title, xlabel="step")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.savefig(run_dir / file_name, dpi=100)
        written[run_dir / file_name] = drawn
    return written


def plot_metrics_or_warn(run_dir: str | Path) -> dict[Path, list[str]]:
    """:func:`plot_metrics`, warning instead of raising: a run never fails because of its pictures."""
    try:
        return plot_metrics(run_dir)
    except ImportError:
        log.warning("no curves drawn: matplotlib is not installed (pip install 'nemo-dpo[plot]')")
    except Exception as error:  # noqa: BLE001 - any plotting failure must leave the trained run intact
        log.warning("no curves drawn for %s: %s: %s", run_dir, type(error).__name__, error)
    return {}
