"""The report: plots and their axes."""

from __future__ import annotations


def test_log_spaced_steps_get_a_log_like_axis() -> None:
    from lmrep.report import log_like_steps

    assert log_like_steps([0, 1, 2, 4, 8, 16, 32, 64, 128, 200])
    assert not log_like_steps([0, 100, 200, 300])
    assert not log_like_steps([0, 1])
