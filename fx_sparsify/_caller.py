"""Warnings at the user's line: the ``stacklevel`` of the first frame outside fx_sparsify."""

from __future__ import annotations

import os
import sys
import types

__all__ = ["user_stacklevel"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the function calling this one that points at the first frame
    outside fx_sparsify (the user's call), however many of our frames lie between."""
    frame: types.FrameType | None = sys._getframe(2)  # 0: here, 1: the function that warns
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE + os.sep):
        frame, level = frame.f_back, level + 1
    return level
