"""trainer.max_time parsing and the run timer (one process)."""

import pytest

from nemo_dpo.utils.run_timer import RunTimer, parse_max_time


@pytest.mark.parametrize("value,seconds", [
    (None, None),
    ("00:00:00:01", 1.0),
    ("01:02:03:04", 93784.0),  # 86400 + 2 * 3600 + 3 * 60 + 4
    ("00:00:90:00", 5400.0),   # fields are not range-checked
    (" 0:1:0:0 ", 3600.0),
    (90, 90.0),
    (1.5, 1.5),
])
def test_parse_max_time(value, seconds):
    assert parse_max_time(value) == seconds


@pytest.mark.parametrize("bad", ["", "01:00:00", "00:00:00:00:01", "aa:00:00:00", "00:00:00:-1", "00:00:00:1.5",
                                 "1 day"])
def test_parse_max_time_refuses_other_strings(bad):
    with pytest.raises(ValueError, match=r"trainer\.max_time=.* must look like DD:HH:MM:SS"):
        parse_max_time(bad)


def test_timer_without_limit_never_finishes():
    timer = RunTimer(None)
    timer.start_time()
    assert not timer.is_finished()


def test_timer_finishes_once_the_budget_is_spent_and_not_before_it_starts():
    timer = RunTimer(0)
    assert not timer.is_finished()  # not started
    timer.start_time()
    assert timer.is_finished()
    long = RunTimer("01:00:00:00")
    long.start_time()
    assert not long.is_finished()
