"""The report's target sparsity counts what each method prunes, and is the target of the last step."""

from __future__ import annotations

import pytest
from torch import nn

import fx_sparsify as fxs


def _row(report: str, name: str) -> list[str]:
    line = next(line for line in report.splitlines() if line.startswith(f"| {name} "))
    return [c.strip() for c in line.strip("|").split("|")]


def test_ln_structured_int_count_is_a_fraction_of_slices() -> None:
    model = nn.Sequential(nn.Linear(4, 2))  # weight 2x4: sparsity=1 prunes one of 2 rows
    sgm = fxs.sparsify_graph(model, {"weights": [{"target": "0", "method": "ln_structured", "sparsity": 1, "dim": 0}]})
    sgm.step()
    target, achieved = _row(sgm.report(), "0.weight")[4:6]
    assert target == achieved == "50.0%"
    assert sgm.target_sparsity()["0.weight"] == pytest.approx(0.5)


def test_block_int_count_is_a_fraction_of_blocks() -> None:
    model = nn.Sequential(nn.Linear(8, 2))  # 2x8 in (1, 4) blocks: 4 blocks
    sgm = fxs.sparsify_graph(model, {"weights": [{"target": "0", "method": "block", "sparsity": 1}]})
    sgm.step()
    assert _row(sgm.report(), "0.weight")[4:6] == ["25.0%", "25.0%"]


def test_global_int_count_is_a_fraction_of_the_group() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))  # 4 + 4 entries, 6 pruned: 75 % of the group
    sgm = fxs.sparsify_graph(model, {"global": [{"targets": ["0", "1"], "method": "l1_unstructured", "sparsity": 6}]})
    sgm.step()
    report = sgm.report()
    assert _row(report, "0.weight")[4] == _row(report, "1.weight")[4] == "75.0%"  # was 150 %
    assert list(sgm.target_sparsity().values()) == [pytest.approx(0.75)] * 2


def test_target_column_shows_the_last_steps_scheduled_sparsity() -> None:
    model = nn.Sequential(nn.Linear(10, 10))
    spec = {
        "weights": [
            {
                "target": "0",
                "method": "l1_unstructured",
                "sparsity": 0.5,
                "schedule": {"kind": "linear", "start": 0.1, "end": 0.5, "steps": 4},
            }
        ]
    }
    sgm = fxs.sparsify_graph(model, spec)
    assert "target sparsity: the first step's" in sgm.report()
    assert _row(sgm.report(), "0.weight")[4] == "10.0%"  # the first step will aim for 10 %
    sgm.step()
    report = sgm.report()
    assert "target sparsity: the last step's" in report
    assert _row(report, "0.weight")[4:6] == ["10.0%", "10.0%"]  # target of the step that made the masks
    sgm.step()
    assert _row(sgm.report(), "0.weight")[4:6] == ["20.0%", "20.0%"]
