"""A step publishes its masks at once: forwards in other threads never see some new masks and some old ones.

``step()`` writes the new masks target by target (every one computed first, so a failing step changes
nothing); a forward running meanwhile in another thread would read a mix. :class:`StepLock` is a
readers-writer lock per sparse module: forwards share it, a step takes it alone, and a step waiting for it
keeps new forwards out (it does not starve). The thread that holds it for a step may run forwards inside
(calibration inputs replayed by a sequential SparseGPT step), and a step from a hook inside a forward waits
for the other threads' forwards only (a second such step in another thread meanwhile would wait for the
first's forward, which waits for it: that one is a ``RuntimeError``). Under ``torch.compile`` / strict
``torch.export`` tracing no lock is taken: a traced graph holds no Python lock.

The other methods of a sparse module take the same lock (:func:`shared`, :func:`exclusive`): what reads the masks
(``forward`` called directly, ``squash``, ``masks()``, ``state_dict``) shares it with forwards, what rewrites them or
the weights or modes (``load_state_dict``, ``.to()`` / ``.half()``, ``train()`` / ``eval()``) holds it alone.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import nn

__all__ = ["StepLock", "step_lock", "shared", "exclusive"]

F = TypeVar("F", bound=Callable[..., Any])


class StepLock:
    """Many readers (forwards) or one writer (a step); a waiting writer goes before new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None  # the thread id of the step holding it
        self._waiting = 0
        self._upgrading = 0  # of those waiting, the threads inside a forward of their own (a step from a hook)
        self._mine = threading.local()  # .reads: this thread's forwards under way (a step inside one of them)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._writer == me or getattr(self._mine, "reads", 0) > 0:  # inside this thread's own step or forward
            yield  # (sgm.forward inside sgm(...), a module's own call inside a hook): a waiting step must not block it
            return
        with self._cond:
            while self._writer is not None or self._waiting:
                self._cond.wait()
            self._readers += 1
        self._mine.reads = getattr(self._mine, "reads", 0) + 1
        try:
            yield
        finally:
            self._mine.reads -= 1
            with self._cond:
                self._readers -= 1
                if not self._readers or self._upgrading:  # a step from inside a forward waits for the others only
                    self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._writer == me:  # a step inside a step (a hook): already held
            yield
            return
        own = getattr(self._mine, "reads", 0)  # a step from a hook inside this thread's forward: not a wait on itself
        with self._cond:
            if own and self._upgrading:  # each would wait for the other's forward to end: a deadlock
                raise RuntimeError(
                    "a step (or load_state_dict, .to(), train()) from inside its forward in this thread while another "
                    "thread waits to do one from inside its forward: each would wait for the other's forward to end. "
                    "Call it outside the forwards (between calls), or from one thread only"
                )
            self._waiting += 1
            self._upgrading += bool(own)
            try:
                while self._writer is not None or self._readers > own:
                    self._cond.wait()
            finally:
                self._waiting -= 1
                self._upgrading -= bool(own)
            self._writer = me
        try:
            yield
        finally:
            with self._cond:
                self._writer = None
                self._cond.notify_all()


_LOCKS: weakref.WeakKeyDictionary[nn.Module, StepLock] = weakref.WeakKeyDictionary()
_MADE = threading.Lock()


def step_lock(module: nn.Module) -> StepLock:
    """The module's lock (made at its first use; copies and unpickled modules get their own)."""
    lock = _LOCKS.get(module)
    if lock is None:
        with _MADE:
            lock = _LOCKS.setdefault(module, StepLock())
    return lock


def _holding(how: Callable[[StepLock], contextlib.AbstractContextManager[None]]) -> Callable[[F], F]:
    def decorate(method: F) -> F:
        @functools.wraps(method)
        def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if torch.compiler.is_compiling():  # traced by torch.compile / strict torch.export: no Python lock
                return method(self, *args, **kwargs)
            with how(step_lock(self)):
                return method(self, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


#: decorator: the method runs holding its module's lock shared, as forwards do (it waits for a step in progress; a
#: step waits for it): for what reads the masks and weights (``forward`` called directly, ``squash``, ``state_dict``)
shared = _holding(lambda lock: lock.reading())
#: decorator: the method runs holding its module's lock alone, as a step does (forwards in flight finish first, new
#: ones wait): for what rewrites the masks, weights or modes (``load_state_dict``, ``.to()``, ``train()``)
exclusive = _holding(lambda lock: lock.writing())
