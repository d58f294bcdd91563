"""``nemo-dpo-plot RUN_DIR ...``: PNG curves of runs' ``metrics.jsonl``, written next to it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nemo_dpo.utils.plotting import plot_metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nemo-dpo-plot",
        description="Draw curve_*.png (loss, accuracy, reward margin, rewards, gradient norm, learning rate) "
                    "from RUN_DIR/metrics.jsonl into RUN_DIR. Needs matplotlib (pip install 'nemo-dpo[plot]').")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a run's log folder")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401 - only to refuse early with the fix
    except ImportError:
        parser.error("matplotlib is not installed: pip install 'nemo-dpo[plot]'")
    for run_dir in args.run_dirs:
        if not (run_dir / "metrics.jsonl").is_file():
            parser.error(f"{run_dir}: no metrics.jsonl (give a run's log folder, e.g. results/gpt_dpo)")
    for run_dir in args.run_dirs:
        try:
            written = plot_metrics(run_dir)
        except ValueError as error:  # a malformed metrics.jsonl line, named by file:line
            parser.error(str(error))
        for path, series in written.items():
            print(f"{path}: {', '.join(series)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
