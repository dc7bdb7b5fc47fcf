"""step()'s table of per-kind strategies: which row computes which target, and a new kind joining as one row."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import torch

import fx_sparsify as fxs
from fx_sparsify.passes import update_masks
from fx_sparsify.passes.update_masks import STEP_STRATEGIES, StepStrategy, StepWork, register_step_strategy, strategy_of
from fx_sparsify.state import TargetRecord

from models import MLP

L1 = {"method": "l1_unstructured", "sparsity": 0.5}


@pytest.fixture
def table() -> Iterator[list[StepStrategy]]:
    """The strategy table, put back as it was after the test."""
    saved = list(STEP_STRATEGIES)
    yield STEP_STRATEGIES
    STEP_STRATEGIES[:] = saved


@pytest.mark.parametrize(
    "spec,target,row",
    [
        ({"weights": [{"target": "fc1", **L1}]}, "fc1.weight", "plain"),
        ({"weights": [{"target": "fc1", **L1, "scores": "wanda"}]}, "fc1.weight", "wanda rows"),
        ({"weights": [{"target": "fc1", **L1, "gradient": "supermask"}]}, "fc1.weight", "module"),
        ({"global": [{"targets": ["fc1", "fc2"], **L1}]}, "fc2.weight", "global"),
        ({"weights": [{"target": "fc1", "method": "sparsegpt", "sparsity": 0.5}]}, "fc1.weight", "reconstructing"),
        (
            {"weights": [{"target": "fc1", "method": "sparsegpt", "sparsity": 0.5, "sequential": True}]},
            "fc1.weight",
            "reconstructing sequential",
        ),
        (
            {"activations": [{"target": "head", "mask": "l1_unstructured", "sparsity": 0.25}]},
            "head:input",
            "activation",
        ),
        ({"channels": [{"target": "fc1", "sparsity": 0.5}]}, "fc1.weight", "channels"),
    ],
)
def test_each_kind_of_target_has_its_row(spec: dict[str, Any], target: str, row: str) -> None:
    sgm = fxs.sparsify_graph(MLP(), spec, example_inputs=(torch.randn(4, 16),))
    assert strategy_of(sgm._fxs.targets[target]).name == row


def _keep_first_half(work: StepWork, record: TargetRecord) -> None:
    keep = torch.zeros(record.shape, dtype=torch.bool)
    keep[: record.shape[0] // 2] = True
    work.new_masks[record.name] = keep


def test_a_new_kind_is_one_registered_row(table: list[StepStrategy]) -> None:
    sgm = fxs.sparsify_graph(MLP(), {"weights": [{"target": "fc1", **L1}, {"target": "fc2", **L1}]})
    row = StepStrategy("first half", lambda r: r.name == "fc2.weight", each=_keep_first_half)
    assert register_step_strategy(row) is row
    assert [s.name for s in table][-2:] == ["first half", "plain"]
    sgm.step()
    keep = sgm.masks()["fc2.weight"]
    assert bool(keep[:16].all()) and not bool(keep[16:].any())
    assert sgm.sparsity()["fc1.weight"] == 0.5  # the other target still by its method


def test_together_rows_see_every_target_they_claimed_once(table: list[StepStrategy]) -> None:
    seen: list[list[str]] = []

    def together(work: StepWork, records: list[TargetRecord]) -> None:
        seen.append([r.name for r in records])
        for r in records:
            work.new_masks[r.name] = torch.ones(r.shape, dtype=torch.bool)

    register_step_strategy(
        StepStrategy("all kept", lambda r: r.name != "head.weight", together=together), before="activation"
    )
    sgm = fxs.sparsify_graph(MLP(), {"weights": [{"target": "type:Linear", **L1}]})
    sgm.step()
    assert seen == [["fc1.weight", "fc2.weight"]]
    assert sgm.sparsity() == {"fc1.weight": 0.0, "fc2.weight": 0.0, "head.weight": 0.5}


def test_a_row_that_raises_leaves_masks_and_step_count(table: list[StepStrategy]) -> None:
    def fail(work: StepWork, record: TargetRecord) -> None:
        raise ValueError("no mask today")

    register_step_strategy(StepStrategy("failing", lambda r: r.name == "head.weight", each=fail))
    sgm = fxs.sparsify_graph(MLP(), {"weights": [{"target": "type:Linear", **L1}]})
    with pytest.raises(ValueError, match=r"step\(\): target 'head.weight': no mask today"):
        sgm.step()
    assert sgm._fxs.steps == 0 and all(bool(m.all()) for m in sgm.masks().values())


def test_registration_refuses_a_second_row_of_a_name_and_an_unknown_position(table: list[StepStrategy]) -> None:
    with pytest.raises(ValueError, match="'plain' is already registered; pass override=True"):
        register_step_strategy(StepStrategy("plain", lambda r: True))
    with pytest.raises(KeyError, match="before='nowhere'.*rows: activation, global, channels"):
        register_step_strategy(StepStrategy("new", lambda r: False), before="nowhere")
    with pytest.raises(TypeError, match="takes a StepStrategy, got dict"):
        register_step_strategy({"name": "x"})  # type: ignore[arg-type]
    plain = StepStrategy("plain", lambda r: True, each=_keep_first_half)
    register_step_strategy(plain, override=True)
    assert table[-1] is plain and [s.name for s in update_masks.STEP_STRATEGIES].count("plain") == 1
