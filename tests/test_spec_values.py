"""Spec values that used to fail only at some later step() are refused when the spec is built."""

from __future__ import annotations

import math

import pytest

import fx_sparsify as fxs

BASE = {"target": "fc1", "method": "l1_unstructured", "sparsity": 0.5}


@pytest.mark.parametrize(
    "schedule,error,match",
    [
        ({"kind": "linear", "start": 0.0, "end": 1.5, "steps": 10}, ValueError, r"'end' is a sparsity.*got 1.5"),
        ({"kind": "linear", "start": -0.1, "end": 0.5, "steps": 10}, ValueError, r"'start' is a sparsity"),
        ({"kind": "linear", "start": 0.0, "end": 0.5, "steps": "10"}, TypeError, r"'steps' is a number of steps.*str"),
        (
            {"kind": "linear", "start": 0.0, "end": 0.5, "steps": 0},
            ValueError,
            r"'steps' is a number of steps, an int >= 1",
        ),
        ({"kind": "linear", "start": 0.0, "end": math.nan, "steps": 10}, ValueError, r"'end' is a sparsity"),
        ({"kind": "cubic", "init_sparsity": 2.0}, ValueError, r"'init_sparsity' is a sparsity.*got 2.0"),
        ({"kind": "cubic", "total_steps": math.nan}, TypeError, r"'total_steps' is a number of steps.*nan"),
        ({"kind": "cubic", "delta_step": 2.5}, TypeError, r"'delta_step' is a number of steps"),
        ({"kind": "cubic", "init_step": -1}, ValueError, r"'init_step' is a number of steps, an int >= 0"),
        ({"kind": "cubic", "initially_zero": "yes"}, TypeError, r"'initially_zero' must be True or False"),
    ],
)
def test_bad_schedules_fail_when_the_spec_is_built(schedule: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=rf"weights rule 'fc1'\['schedule'\]: {match}"):
        fxs.SparsitySpec.from_dict({"weights": [{**BASE, "schedule": schedule}]})


def test_cubic_schedule_needs_a_fractional_final_sparsity() -> None:
    with pytest.raises(TypeError, match=r"final 'sparsity' must be a float.*got int: 50"):
        fxs.SparsitySpec.from_dict({"weights": [{**BASE, "sparsity": 50, "schedule": {"kind": "cubic"}}]})


def test_good_schedules_still_build() -> None:
    fxs.SparsitySpec.from_dict(
        {"weights": [{**BASE, "schedule": {"kind": "cubic", "init_sparsity": 0.1, "total_steps": 5}}]}
    )
    fxs.SparsitySpec.from_dict(
        {"weights": [{**BASE, "schedule": {"kind": "linear", "start": 0, "end": 1, "steps": 3}}]}
    )


@pytest.mark.parametrize(
    "block_shape,error",
    [((0, 4), ValueError), ((-1, 4), ValueError), ((1.5, 4), TypeError), ("ab", TypeError), ((), ValueError)],
)
def test_absurd_block_shapes_fail_when_the_spec_is_built(block_shape: object, error: type) -> None:
    with pytest.raises(error, match=r"weights rule 'fc1'.*block_shape"):
        fxs.SparsitySpec.from_dict(
            {"weights": [{"target": "fc1", "method": "block", "sparsity": 0.5, "block_shape": block_shape}]}
        )
