"""Wall-clock budget for a run (``trainer.max_time``, "DD:HH:MM:SS"), agreed across ranks."""

from __future__ import annotations

import time

from nemo_dpo.parallel.collectives import broadcast_object


def parse_max_time(max_time) -> float | None:
    """Seconds from "DD:HH:MM:SS" (or a number of seconds); None means no limit."""
    if max_time is None:
        return None
    if isinstance(max_time, (int, float)):
        return float(max_time)
    parts = str(max_time).split(":")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"trainer.max_time={max_time!r} must look like DD:HH:MM:SS")
    days, hours, minutes, seconds = map(int, parts)
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


class RunTimer:
    """``start_time()`` then ``is_finished()``; every rank gets rank 0's answer so all stop together."""

    def __init__(self, max_time=None):
        self.max_seconds = parse_max_time(max_time)
        self._start = None

    def start_time(self) -> None:
        self._start = time.monotonic()

    def is_finished(self) -> bool:
        if self.max_seconds is None or self._start is None:
            return False
        return broadcast_object(time.monotonic() - self._start >= self.max_seconds, src=0)
