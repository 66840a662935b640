"""The evaluation report's charts: each metric on its own scale."""

import pytest

from l2t.report import ROWS, axis_limits

ROW = {row.label: row for row in ROWS}


def test_a_metric_near_zero_is_drawn_on_the_metric_range_not_the_data_range():
    assert axis_limits(ROW["BLEU-4"], [3e-14, 2e-14]) == (0.0, 1.0)
    assert axis_limits(ROW["POPE accuracy (yes/no)"], [0.5, None]) == (0.0, 1.0)


def test_an_open_ended_metric_grows_its_axis_and_a_signed_one_is_left_to_the_data():
    assert axis_limits(ROW["CIDEr-D"], [0.2, 0.4]) == (0.0, pytest.approx(1.15))
    assert axis_limits(ROW["CIDEr-D"], [2.0, None]) == (0.0, pytest.approx(2.3))
    assert axis_limits(ROW["VC per token, image removed (nats)"], [-0.1, 0.3]) is None
