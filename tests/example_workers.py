"""examples/custom_loss.py run in-process on a test pool worker."""

from __future__ import annotations

import sys
from pathlib import Path

from training_workers import read_metrics

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def custom_loss_example(log_dir: str) -> dict[str, list[dict]]:
    """Each route's logged records (one process)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    import custom_loss

    return {route: read_metrics(folder) for route, folder in custom_loss.main(log_dir).items()}
