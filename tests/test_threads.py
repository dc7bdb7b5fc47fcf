"""Mask work runs on one intra-op thread for tensors too small to gain from more (fx_sparsify/_threads.py):
on a loaded machine every parallel op waited for a worker thread, and step() with 2 threads took 8x 1 thread's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fx_sparsify as fxs
from fx_sparsify._threads import SERIAL_BELOW, serial_below

ROOT = Path(__file__).resolve().parents[1]
VIEWS = (
    "view",
    "split",
    "slice",
    "as_strided",
    "select",
    "_unsafe_view",
    "t",
    "detach",
    "alias",
    "unsqueeze",
    "reshape",
    "expand",
    "squeeze",
    "narrow",
    "permute",
    "transpose",
    "lift_fresh",
    "_local_scalar_dense",
)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_serial_below_small_and_large(two_threads: None) -> None:
    with serial_below(1000):
        assert torch.get_num_threads() == 1
        with serial_below(10):  # nested: the outer call restores
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with serial_below(SERIAL_BELOW):
        assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), serial_below(10):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


class _Count(TorchDispatchMode):
    """Non-view aten ops of a step: all of them, and those run with more than one thread on > 32 Ki entries
    (the size at which torch splits an element-wise op across threads)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.parallel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func._schema.name.removeprefix("aten::")
        if name not in VIEWS:
            self.ops += 1
            size = sum(a.numel() for a in args if isinstance(a, torch.Tensor))
            if torch.get_num_threads() > 1 and size > 32768:
                self.parallel += 1
        return func(*args, **(kwargs or {}))


def _resnet18() -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("shrink_resnet_for_threads", ROOT / "examples" / "shrink_resnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.resnet18().eval()


def test_step_on_resnet18_does_few_large_ops_and_none_parallel(two_threads: None) -> None:
    """The invariant behind the thread-count benchmark (benchmarks/bench_step_threads.py): a step works per
    target in a few large ops (1,722 non-view ops before, 1,127 of them split across threads; 874 and none now),
    and none of its element-wise ops on these layers (at most 2.4 Mi entries) runs split across threads."""
    spec = {
        "weights": [
            {"target": "type:Conv2d", "method": "l1_unstructured", "sparsity": 0.5},
            {"target": "conv1", "method": "dense"},
            {"target": "fc", "method": "2:4"},
        ]
    }
    x = torch.randn(1, 3, 32, 32)
    sgm = fxs.sparsify_graph(_resnet18(), spec, example_inputs=(x,))
    sgm.step()
    counter = _Count()
    with counter:
        sgm.step()
    targets = len(sgm.sparsity())
    assert counter.parallel == 0
    assert counter.ops <= 50 * targets, (counter.ops, targets)
    assert torch.get_num_threads() == 2
