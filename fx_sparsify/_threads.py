"""One thread for element-wise mask work on tensors too small to gain from more.

Every intra-op parallel op wakes torch's worker threads and waits for the slowest. On a machine whose
cores are busy with other jobs, that wait is a scheduler time slice (milliseconds), whatever the op's
size: ``step()`` on a ResNet-18 with torch's default two threads on a loaded two-core machine took 8x
longer than with one. Ranking, packing and masking a layer are memory-bound element-wise passes that
gain little from a second thread below tens of millions of entries, so :func:`serial_below` runs
them on one thread there and leaves larger tensors (and every matrix product: SparseGPT,
reconstruction) to torch's setting.

    with serial_below(weight.numel()):
        keep = prune_smallest(weight, k, absolute=True)
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Iterator, TypeVar

import torch

__all__ = ["SERIAL_BELOW", "serial_below", "serial_when_small"]

#: element count under which mask work runs on one thread (16 Mi: a 4096 x 4096 weight still uses all)
SERIAL_BELOW = 1 << 24

_LOCAL = threading.local()  # nesting depth in this Python thread: only the outermost call switches

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def serial_below(numel: int, limit: int | None = None) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(1)`` when ``numel`` is under ``limit`` (default
    :data:`SERIAL_BELOW`); the thread count is restored after, also when the body raises."""
    threads = torch.get_num_threads()
    small = numel < (SERIAL_BELOW if limit is None else limit)
    depth: int = getattr(_LOCAL, "depth", 0)
    if threads == 1 or not small or depth:
        yield
        return
    _LOCAL.depth = 1
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _LOCAL.depth = 0


def serial_when_small(fn: F) -> F:
    """Decorator: :func:`serial_below` sized by the function's first tensor argument."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None:
            return fn(*args, **kwargs)
        with serial_below(first.numel()):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
