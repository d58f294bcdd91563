"""The ``metrics.jsonl`` format: one JSON record per line, ``step``, ``wall_time`` and the metrics by name."""

from __future__ import annotations

import json
import math
from pathlib import Path

# Keys of a record that are not metrics.
RECORD_KEYS = ("step", "wall_time")


def read_series(metrics_file: Path) -> dict[str, list[tuple[int, float]]]:
    """``name -> [(step, value)]`` sorted by step, finite values only.

    A step logged twice (a resumed run redoes the steps after its checkpoint) keeps its newest value.
    """
    by_name: dict[str, dict[int, float]] = {}
    with open(metrics_file, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record["step"])
                # Non-finite values are written as the strings "nan", "inf".
                values = {name: float(value) for name, value in record.items() if name not in RECORD_KEYS}
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{metrics_file}:{number}: not a metrics record ({error})") from None
            for name, value in values.items():
                by_name.setdefault(name, {})[step] = value
    return {name: sorted((s, v) for s, v in points.items() if math.isfinite(v)) for name, points in by_name.items()}
