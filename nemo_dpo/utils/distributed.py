"""NeMo Aligner's ``nemo_aligner.utils.distributed.Timer``."""

from __future__ import annotations

import math
import time

from nemo_dpo.utils.run_timer import RunTimer

__all__ = ["Timer"]


class Timer(RunTimer):
    """``Timer(duration)`` with ``duration`` "DD:HH:MM:SS" or None (no limit), as ``run_timer`` of DPOTrainer.

    ``is_finished()`` gives every rank rank 0's answer, as NeMo Aligner's does.
    """

    def __init__(self, duration=None):
        super().__init__(duration)
        self.duration = duration

    def get_time_elapsed(self) -> float:
        return time.monotonic() - self._start

    def get_time_remaining(self) -> float:
        return (math.inf if self.max_seconds is None else self.max_seconds) - self.get_time_elapsed()
