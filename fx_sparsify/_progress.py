"""Progress of long work on stderr: a tqdm bar where tqdm is installed, else one plain line per item.

Used by the command line's calibration loop, by ``step()`` for the per-layer solves of SparseGPT and
reconstruction, and by streamed pruning for its blocks::

    bar = progress(len(layers), "sparsegpt", unit="layer")
    for name in layers:
        ...
        bar.update(1, name)
    bar.close()

``enabled=False`` (``verbose=False`` at the caller) gives a bar that shows nothing.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

__all__ = ["Progress", "progress"]


class Progress(Protocol):
    """What callers use of a bar: ``update(n, note)`` after each item and ``close()`` at the end."""

    def update(self, n: int = 1, note: str = "") -> None: ...

    def close(self) -> None: ...


class _Quiet:
    def update(self, n: int = 1, note: str = "") -> None:
        pass

    def close(self) -> None:
        pass


class _Lines:
    """``what: 3/12 note``, one line per update (no tqdm: logs stay readable)."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.what, self.done = total, what, 0

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        sys.stderr.write(f"{self.what}: {self.done}/{self.total}{' ' + note if note else ''}\n")
        sys.stderr.flush()

    def close(self) -> None:
        pass


class _Bar:
    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def update(self, n: int = 1, note: str = "") -> None:
        if note:
            self.bar.set_postfix_str(note, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def progress(total: int, what: str, enabled: bool = True, unit: str = "it") -> Progress:
    """A progress display for ``total`` items of ``what`` on stderr; nothing when not ``enabled``."""
    if not enabled or total <= 0:
        return _Quiet()
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        return _Lines(total, what)
    return _Bar(tqdm(total=total, desc=what, file=sys.stderr, leave=True, unit=unit))
