"""The report: plots and their axes."""

from __future__ import annotations


def test_log_spaced_steps_get_a_log_like_axis() -> None:
    from lmrep.report import log_like_steps

    assert log_like_steps([0, 1, 2, 4, 8, 16, 32, 64, 128, 200])
    assert not log_like_steps([0, 100, 200, 300])
    assert not log_like_steps([0, 1])


def test_panel_grids_leave_the_fewest_empty_slots() -> None:
    from lmrep.report import PANEL_COLUMNS, grid_shape

    assert PANEL_COLUMNS == 3
    assert [grid_shape(n) for n in (1, 2, 3, 4, 5, 6, 7, 9)] == [
        (1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (2, 3), (3, 3), (3, 3)]
    for n in range(1, 20):
        rows, cols = grid_shape(n)
        assert cols <= PANEL_COLUMNS and rows * cols >= n and rows * cols - n < cols
