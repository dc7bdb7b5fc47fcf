"""The typed state of a SparseGraphModule (fx_sparsify/state.py): its fields survive copies, and a state
pickled with the earlier string-keyed ``extra`` dict loads into them."""

from __future__ import annotations

import copy
import dataclasses
import io
import pickle
from typing import Any, Callable

import pytest
import torch

import fx_sparsify as fxs
from fx_sparsify.state import Calibration, SparsityState

from models import MLP

SPEC: dict[str, Any] = {
    "weights": [{"target": "fc1", "method": "l1_unstructured", "sparsity": 0.5}],
    "channels": [{"target": "fc2", "sparsity": 0.5}],
}


def _torch_save(sgm: fxs.SparseGraphModule) -> Any:
    buf = io.BytesIO()
    torch.save(sgm, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES: dict[str, Callable[[Any], Any]] = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": _torch_save,
}


@pytest.mark.parametrize("how", list(COPIES))
def test_typed_fields_survive_copies(how: str) -> None:
    model, x = MLP(), torch.randn(4, 16)
    keep = torch.rand(32, 16) > 0.3
    sgm = fxs.sparsify_graph(model, SPEC, example_inputs=(x,), masks={"fc1.weight": keep})
    sgm.step()
    sgm.squash(storage="csr")
    state = sgm._fxs
    assert state.channels is not None and state.storage and state.initial_masks == {"fc1.weight": "initial mask"}
    clone = COPIES[how](sgm)
    copied = clone._fxs
    assert copied is not state
    assert copied.initial_masks == state.initial_masks and copied.reconstructed == state.reconstructed
    assert [c.layer for c in copied.storage] == [c.layer for c in state.storage]
    assert clone.shrink_plan() == sgm.shrink_plan() and clone.report() == sgm.report()
    copied.initial_masks["other"] = "x"  # the copy's containers are its own
    assert "other" not in state.initial_masks


def test_a_state_pickled_with_the_extra_dict_loads_into_the_fields() -> None:
    sgm = fxs.sparsify_graph(MLP(), SPEC, example_inputs=(torch.randn(4, 16),))
    state = sgm._fxs
    old = {
        f.name: getattr(state, f.name)
        for f in dataclasses.fields(SparsityState)
        if f.name in ("spec", "capture", "targets", "state_keys", "class_name", "aliases", "versions", "steps")
    }
    old["extra"] = {
        "channels": state.channels,
        "inplace": True,
        "initial_masks": {"fc1.weight": "adopted"},
        "reconstructed": {"fc1.weight"},
        "deferred_observers": {"fc1_input_observer"},
    }
    legacy = SparsityState.__new__(SparsityState)
    legacy.__dict__.update(old)  # what an earlier version pickled: these attributes and nothing else
    loaded = pickle.loads(pickle.dumps(legacy))
    assert loaded.channels is not None and state.channels is not None
    assert [g.roots for g in loaded.channels.groups] == [g.roots for g in state.channels.groups]
    assert loaded.inplace is True and loaded.initial_masks == {"fc1.weight": "adopted"}
    assert loaded.reconstructed == {"fc1.weight"} and loaded.storage is None and loaded.export_mode is None
    assert loaded.calibration == Calibration(inputs=None, deferred={"fc1_input_observer"})
    assert not hasattr(loaded, "extra") and loaded.adopted_from == {} and loaded.steps == state.steps
