"""Threads beyond forwards and step(): a direct ``sgm.forward(...)`` takes the module's lock as ``sgm(...)`` does;
``squash()``, ``masks()`` and ``state_dict()`` read a consistent set of masks (they wait for a step in progress);
``load_state_dict``, ``.to()`` and ``train()`` / ``eval()`` wait for the forwards in flight and keep new ones out
until they are done."""

from __future__ import annotations

import copy
import inspect
import pickle
import threading
import time
from typing import Any, Callable

import pytest
import torch
from torch import nn

import fx_sparsify as fxs
from fx_sparsify._step_lock import step_lock

SPEC = {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5}]}
PAUSE = 0.3  # long enough for a call that does not wait to be over


def _sgm() -> Any:
    torch.manual_seed(0)
    return fxs.sparsify_graph(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), SPEC)


class Call:
    """``fn()`` in a thread; ``done`` once it returned (``result`` / ``error``)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn, self.done, self.result, self.error = fn, threading.Event(), None, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as err:  # pragma: no cover - reported by the test
            self.error = err
        finally:
            self.done.set()

    def finished(self, timeout: float = 30.0) -> bool:
        ok = self.done.wait(timeout)
        assert self.error is None, self.error
        return ok


def _held(sgm: Any, how: str) -> tuple[threading.Event, threading.Event, Call]:
    """Another thread holds the module's lock (``"writing"``: as a step in progress, ``"reading"``: as a forward in
    flight) until the first event is set; the second is set once it holds it."""
    release, holding = threading.Event(), threading.Event()

    def hold() -> None:
        with getattr(step_lock(sgm), how)():
            holding.set()
            release.wait(30)

    call = Call(hold)
    assert holding.wait(30)
    return release, holding, call


@pytest.mark.parametrize(
    "what",
    [
        "forward",
        "squash",
        "masks",
        "state_dict",
        "sparsity",
        "to_torch_prune",
        "deepcopy",
        "pickle",
    ],
)
def test_direct_forward_and_readers_wait_for_a_step_in_progress(what: str) -> None:
    sgm = _sgm()
    sgm.step()
    x = torch.randn(2, 8)
    calls: dict[str, Callable[[], Any]] = {
        "forward": lambda: sgm.forward(x),
        "squash": sgm.squash,
        "masks": sgm.masks,
        "state_dict": sgm.state_dict,
        "sparsity": sgm.sparsity,
        "to_torch_prune": lambda: sgm.to_torch_prune(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))),
        "deepcopy": lambda: copy.deepcopy(sgm),
        "pickle": lambda: pickle.dumps(sgm),
    }
    release, _, holder = _held(sgm, "writing")
    call = Call(calls[what])
    assert not call.done.wait(PAUSE), f"{what} ran while a step held the module"
    release.set()
    assert call.finished() and holder.finished()


def test_readers_run_beside_forwards_in_flight() -> None:
    sgm = _sgm()
    sgm.step()
    x = torch.randn(2, 8)
    release, _, holder = _held(sgm, "reading")
    try:
        for fn in (lambda: sgm.forward(x), sgm.squash, sgm.masks, sgm.state_dict):
            assert Call(fn).finished(10), "a reader waited for a forward"
    finally:
        release.set()
    assert holder.finished()


def _forward_in_flight(sgm: Any, x: torch.Tensor) -> tuple[threading.Event, Call]:
    """A real forward paused inside the module's call (a pre-hook waits) until the event is set."""
    release, entered = threading.Event(), threading.Event()

    def pause(module: nn.Module, args: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            entered.set()
            release.wait(30)

    handle = sgm.register_forward_pre_hook(pause)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return sgm(x)

    call = Call(run)
    assert entered.wait(30)
    handle.remove()
    return release, call


@pytest.mark.parametrize("what", ["load_state_dict", "to", "train", "eval", "apply_masks_inplace"])
def test_writers_wait_for_forwards_in_flight_and_keep_new_ones_out(what: str) -> None:
    sgm = _sgm()
    x = torch.randn(2, 8)
    sgm.step()
    assert not all(bool(m.all()) for m in sgm.masks().values())
    with torch.no_grad():
        before = sgm(x)
    fresh = _sgm()  # unpruned masks: loading them changes the output
    writes: dict[str, Callable[[], Any]] = {
        "load_state_dict": lambda: sgm.load_state_dict(fresh.state_dict()),
        "to": lambda: sgm.to(torch.float64),
        "train": lambda: sgm.train(),
        "eval": lambda: sgm.eval(),
        "apply_masks_inplace": sgm.apply_masks_inplace,
    }
    release, forward = _forward_in_flight(sgm, x)
    write = Call(writes[what])
    assert not write.done.wait(PAUSE), f"{what} ran while a forward was in flight"
    release.set()
    assert forward.finished() and write.finished()
    assert torch.equal(forward.result, before)  # the forward ran entirely before the write
    if what == "load_state_dict":
        assert all(bool(m.all()) for m in sgm.masks().values())


def test_a_forward_waits_for_load_state_dict_in_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    sgm = _sgm()
    sgm.step()
    fresh = _sgm()
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = fresh(x)
    loading, go = threading.Event(), threading.Event()
    original = type(sgm)._load_from_state_dict

    def slow_load(self: Any, *args: Any, **kwargs: Any) -> None:
        loading.set()
        go.wait(30)
        original(self, *args, **kwargs)

    monkeypatch.setattr(type(sgm), "_load_from_state_dict", slow_load)
    load = Call(lambda: sgm.load_state_dict(fresh.state_dict()))
    assert loading.wait(30)
    forward = Call(lambda: sgm(x).detach())
    assert not forward.done.wait(PAUSE), "a forward ran during load_state_dict"
    go.set()
    assert load.finished() and forward.finished()
    assert torch.equal(forward.result, expected)  # all of the loaded state, none of the old


def test_a_forward_inside_a_forward_passes_a_waiting_step() -> None:
    """``sgm(...)`` holds the lock shared and calls the (locked) ``forward``: with a step waiting meanwhile, the
    inner take must not queue behind the step (which waits for the outer one)."""
    sgm = _sgm()
    x = torch.randn(2, 8)
    release, forward = _forward_in_flight(sgm, x)
    step = Call(sgm.step)
    deadline = time.monotonic() + 30
    while not step_lock(sgm)._waiting and time.monotonic() < deadline:  # the step queued
        time.sleep(0.001)
    assert step_lock(sgm)._waiting
    release.set()
    assert forward.finished(30) and step.finished(30), "deadlock: a forward inside a forward behind a waiting step"
    assert sgm._fxs.steps == 1


def test_the_locked_forward_keeps_its_signature_and_exports() -> None:
    sgm = _sgm()
    sgm.step()
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = sgm(x)
    assert list(inspect.signature(sgm.forward).parameters) == ["input"]
    exported = torch.export.export(sgm, (x,), strict=False)
    assert torch.allclose(exported.module()(x), expected)


def test_two_forwards_stepping_from_a_hook_at_once_refuse_instead_of_deadlocking() -> None:
    """A step from a hook inside a forward waits for the other threads' forwards; two such steps at once would each
    wait for the other's forward forever: the second is a RuntimeError (its forward ends), the first then steps."""
    sgm = _sgm()
    both_inside = threading.Barrier(2)

    def step_inside(module: nn.Module, args: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            both_inside.wait(30)
            sgm.step()

    sgm.register_forward_pre_hook(step_inside)
    calls = [Call(lambda: sgm(torch.randn(1, 8))) for _ in range(2)]
    assert all(c.done.wait(30) for c in calls), "deadlock: two forwards each waiting to step"
    errors = [c.error for c in calls if c.error is not None]
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError), errors
    assert "inside its forward" in str(errors[0]) and "outside" in str(errors[0])
    assert sgm._fxs.steps == 1
    with torch.no_grad():
        sgm._forward_pre_hooks.clear()
        assert Call(lambda: sgm(torch.randn(1, 8))).finished(10)  # the lock is free again


def test_a_step_from_a_hook_runs_once_the_other_threads_forward_ends() -> None:
    """A step from a hook inside a forward waits for the forwards of other threads: the end of the last of them
    wakes it (it woke only when no forward at all was left, its own included: it waited forever)."""
    sgm = _sgm()
    other_inside, other_go = threading.Event(), threading.Event()

    def hook(module: nn.Module, args: Any) -> None:
        if threading.current_thread().name == "stepper":
            assert other_inside.wait(30)
            sgm.step()
        elif threading.current_thread().name == "other":
            other_inside.set()
            other_go.wait(30)

    sgm.register_forward_pre_hook(hook)
    x = torch.randn(1, 8)
    threads = {name: threading.Thread(target=lambda: sgm(x), name=name, daemon=True) for name in ("other", "stepper")}
    for t in threads.values():
        t.start()
    assert other_inside.wait(30)
    threads["stepper"].join(PAUSE)
    assert threads["stepper"].is_alive() and sgm._fxs.steps == 0  # the step waits for the other forward
    other_go.set()
    threads["stepper"].join(30)
    assert not threads["stepper"].is_alive(), "the step was never woken after the other forward ended"
    assert sgm._fxs.steps == 1
    threads["other"].join(30)
