"""Threads: a step() while other threads run forwards on the same sparse module publishes its masks at once (a
forward sees all old or all new masks, never a mix), and concurrent eval forwards keep the eval cache's byte
count exact (0 once dropped: no phantom bytes filling the bound)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import fx_sparsify as fxs
from fx_sparsify import ops
from fx_sparsify._step_lock import step_lock
from fx_sparsify.passes import update_masks

LAYERS, DIM = 12, 32


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads every microsecond, so a step and forwards interleave finely."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(DIM, DIM) for _ in range(LAYERS)])


def test_a_step_publishes_all_its_masks_at_once(fast_switching: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The masks are written one target after another; a pause after each write (as a slow copy or a busy
    machine makes) widens the window in which a forward saw some layers' new masks and others' old ones."""
    flip = [False]
    write = update_masks._write

    def slow_write(*args: object, **kwargs: object) -> None:
        write(*args, **kwargs)
        time.sleep(0.001)

    monkeypatch.setattr(update_masks, "_write", slow_write)

    def scores(w: torch.Tensor) -> torch.Tensor:  # two mask sets, alternating at each step; weights unchanged
        return 1 / (w.abs() + 1e-3) if flip[0] else w.abs()  # l1 ranks |scores|: inverted, not negated

    sgm = fxs.sparsify_graph(
        _model(),
        {
            "weights": [
                {
                    "target": "type:Linear",
                    "method": "l1_unstructured",
                    "sparsity": 0.5,
                    "scores": scores,
                    "regrow": True,
                }
            ]
        },
    )
    x = torch.randn(4, DIM)
    outputs = []
    for state in (False, True):
        flip[0] = state
        sgm.step()
        with torch.no_grad():
            outputs.append(sgm(x))
    assert not torch.equal(*outputs)
    stop, seen, errors = threading.Event(), [], []

    def forwards() -> None:
        try:
            while not stop.is_set():
                with torch.no_grad():
                    seen.append(sgm(x))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=forwards) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(10):
            flip[0] = bool(i % 2)
            sgm.step()
            before, deadline = len(seen), time.monotonic() + 5
            while len(seen) < before + 2 and time.monotonic() < deadline:  # forwards between steps, however scheduled
                time.sleep(0.001)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors and len(seen) > 10
    mixed = [y for y in seen if not any(torch.equal(y, o) for o in outputs)]
    assert not mixed, f"{len(mixed)} of {len(seen)} forwards ran with a mix of old and new masks"


def test_concurrent_eval_forwards_keep_the_cache_count_exact(fast_switching: None) -> None:
    sgm = fxs.sparsify_graph(
        _model(), {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5}]}
    )
    sgm.step()
    sgm.eval()
    x = torch.randn(4, DIM)
    before = ops.cached_bytes()
    errors = []

    def forwards() -> None:
        try:
            for _ in range(20):
                with torch.no_grad():
                    sgm(x)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    for _ in range(10):  # every round starts cold: each thread misses the cache at once
        with torch.no_grad():
            for p in sgm.parameters():
                p.add_(0)  # a new version: every entry is stale
        threads = [threading.Thread(target=forwards) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        layer_bytes = LAYERS * DIM * DIM * 4
        assert ops.cached_bytes() - before == layer_bytes  # exactly one entry per mask
    assert not errors
    sgm.train()  # drops the module's entries
    assert ops.cached_bytes() == before


def test_a_step_inside_a_forward_of_the_same_module_does_not_wait_on_itself() -> None:
    """A hook inside a forward that calls step() on the same module (the forward holds the module's lock
    shared, the step asks for it alone) proceeds instead of waiting for itself."""
    sgm = fxs.sparsify_graph(
        _model(), {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5}]}
    )
    done = threading.Event()

    def forward_calling_step() -> None:
        with step_lock(sgm).reading():  # what calling sgm(...) holds while its forward runs
            sgm.step()
        done.set()

    threading.Thread(target=forward_calling_step, daemon=True).start()
    assert done.wait(60), "a step() inside a forward of the same module deadlocked"
    assert sgm._fxs.steps == 1
