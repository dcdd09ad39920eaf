"""The search space (space): knob ranges and grids, their ends and steps in decimal, repeated values
refused, the spread points of an axis."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest

from stabilitycheck.config import Config
from stabilitycheck.errors import ConfigError
from stabilitycheck.space import Axis, Space


def test_a_float_knob_range_keeps_its_upper_end_when_the_step_divides_it_in_decimal() -> None:
    """0.1:0.7 step 0.1 is the seven points 0.1, 0.2, ..., 0.7 (decimal arithmetic: 0.6 / 0.1 = 6);
    float division gives 5.999999999999999, whose floor dropped 0.7 from the grid."""
    axis = Axis.range("init_scale", 0.1, 0.7, 0.1)
    assert list(axis.values) == [k / 10 for k in range(1, 8)]


def test_a_float_knob_range_without_a_step_has_16_points_from_lo_to_hi() -> None:
    """Axis.range's documented default: 16 points, lo and hi included (15 steps of (hi - lo) / 15)."""
    values = list(Axis.range("init_scale", 0.5, 2.0).values)
    assert len(values) == 16 and values[0] == 0.5 and values[-1] == 2.0
    assert all(math.isclose(b - a, 0.1) for a, b in itertools.pairwise(values))


def test_a_knob_grid_with_a_repeated_value_is_refused() -> None:
    """A grid must be strictly ascending: a repeated value is a ConfigError, not a second probe of
    one point (the descent's one-step-lower neighbour would be the point itself)."""
    from stabilitycheck.errors import ConfigError

    with pytest.raises(ConfigError, match="strictly ascending"):
        Axis("depth", (1, 2, 2, 3))


def test_a_knob_range_of_one_value_is_that_value() -> None:
    """LO == HI is a valid range of one point (a knob pinned on the command line), int or float."""
    assert list(Axis.range("depth", 4, 4).values) == [4]
    assert list(Axis.range("init_scale", 1.5, 1.5).values) == [1.5]


def _linear_mlp(**knobs: Any) -> Config:
    return Config.of("mlp", **{"width": 16, "activation": "linear", "batch_size": 4, "seeds": 1, **knobs})


def test_a_float_range_includes_hi_where_the_step_does_not_divide_it_exactly_in_floats() -> None:
    """Axis.range lo..hi inclusive: (0.7 - 0.1) / 0.2 is 2.9999999999999996 in floats, yet 0.7 is a
    grid point. Oracle: the decimal grid 0.1, 0.3, 0.5, 0.7 by hand."""
    assert (0.7 - 0.1) / 0.2 < 3
    assert list(Axis.range("lr", 0.1, 0.7, 0.2).values) == [0.1, 0.3, 0.5, 0.7]


def test_a_float_range_without_a_step_has_16_points_from_lo_to_hi() -> None:
    """Axis.range's default float grid: 16 points, lo and hi included (0.5..4.0 by 7/30)."""
    values = list(Axis.range("init_scale", 0.5, 4.0).values)
    assert len(values) == 16 and values[0] == 0.5 and values[-1] == pytest.approx(4.0, abs=1e-12)


def test_a_float_grid_slices_like_a_list() -> None:
    """FloatGrid is a Sequence: a slice is that part of the grid, as list slicing gives."""
    grid = Axis.range("init_scale", 0.5, 4.0, 0.25).values
    assert grid[1:3] == [0.75, 1.0]
    assert grid[::7] == list(grid)[::7] == [0.5, 2.25, 4.0]
    assert grid[-2:] == [3.75, 4.0]


def test_an_axis_with_a_repeated_value_is_refused() -> None:
    """An explicit grid must be strictly ascending: a repeated value is not."""
    with pytest.raises(ConfigError, match="strictly ascending"):
        Axis("init_scale", (1.0, 1.0, 2.0))


def test_spread_points_take_the_nearest_index_to_a_quarter_half_and_three_quarters() -> None:
    """spread_points: the corners, then the diagonal at 1/2, 1/4 and 3/4 of every axis. Axes of last
    index 9 and 3: 4.5 -> 4 or 5 and 1.5 -> 1 or 2 (ties either way), 2.25 -> 2 and 0.75 -> 1, 6.75 -> 7
    and 2.25 -> 2 (nearest). Oracle: those fractions by hand; the size is the product of the lengths."""
    space = Space(
        "mlp", _linear_mlp(), (Axis.range("depth", 1, 10), Axis("init_scale", (0.5, 1.0, 2.0, 4.0)))
    )
    points = space.spread_points(extra=0)
    assert points[:2] == [(0, 0), (9, 3)]
    assert points[2][0] in (4, 5) and points[2][1] in (1, 2)
    assert points[3:] == [(2, 1), (7, 2)]
    assert space.size == 40 == len(list(space.grid()))


@pytest.mark.parametrize(("lo", "hi", "step"), [(1, 10**19, None), (1, 2**70, 3), (1.0, 2.0, 1e-30)])
def test_a_grid_of_2_to_the_63_values_or_more_is_a_config_error(
    lo: float, hi: float, step: float | None
) -> None:
    """len() of such a grid overflows: `--knob depth=1:1e30` was 'internal error: OverflowError', exit 3
    (found by an audit); a config error is exit 2 with one line. 2^63 - 2 values still make a grid."""
    with pytest.raises(ConfigError, match="has 2\\^63 grid values or more") as caught:
        Axis.range("depth", lo, hi, step)
    assert "\n" not in str(caught.value)
    assert len(Axis.range("depth", 1, 2**63 - 2).values) == 2**63 - 2
