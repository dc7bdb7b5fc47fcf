"""Reshapes of channel dims: where a channel slot goes, and which sizes a run-time size expression reads.

- :func:`map_reshape`: the dim, offset and width a channel slot takes through a reshape (or the reason it
  cannot: the reshape cuts across channels);
- :func:`size_reads`: the tensor sizes a size argument computed at run time reads (``x.shape[-1]``,
  ``t.size(1) * 2``), so a reshape whose size on the channel dim reads none of the group's channel dims
  (``reshape(b, t, x.shape[-1])`` with ``x`` the unpruned residual stream) is refused: the shrunk model
  would ask for the old width.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

from torch.fx import Node

__all__ = ["map_reshape", "size_reads"]

_ARITHMETIC = (operator.mul, operator.floordiv, operator.add, operator.sub, operator.neg)


def map_reshape(
    src: tuple[int, ...], dst: tuple[int, ...], d: int, offset: int, width: int, units: int
) -> tuple[int, int, int]:
    """Where dim ``d`` of a ``src``-shaped tensor goes in its ``dst``-shaped reshape: ``(dim, offset, width)``.

    Raises ``ValueError`` (with ``.split`` set for a dim split too finely) when the channels do not map
    onto whole index ranges of one dim.
    """
    prefix = math.prod(src[:d])
    n = src[d]
    # the dst dim holding the first element of src dim d: first dim whose prefix product reaches `prefix`
    a, acc = 0, 1
    while a < len(dst) and (acc < prefix or (acc == prefix and dst[a] == 1 and n != 1)):
        acc *= dst[a]
        a += 1
    if a == len(dst):
        raise ValueError("the reshape moves the channel dim out of place")
    if acc == prefix:  # dst dims a.. hold src dim d alone (same or split) or merge it with later src dims
        b, size = a, 1
        while b < len(dst) and size < n:
            size *= dst[b]
            b += 1
        if size == n:
            inner = math.prod(dst[a + 1 : b])
            if width % inner or offset % inner:
                err = ValueError(f"the reshape splits the channel dim ({n}) into {list(dst[a:b])}")
                err.split = inner // math.gcd(width, inner)  # type: ignore[attr-defined]
                raise err
            return a, offset // inner, width // inner
        # merge: src dims d..e form dst dim a; d is the outermost of them
        e, size = d, 1
        while e < len(src) and size < dst[a]:
            size *= src[e]
            e += 1
        if size == dst[a]:
            inner = math.prod(src[d + 1 : e])
            return a, offset * inner, width * inner
        raise ValueError("the reshape mixes the channel dim with its neighbours")
    # src dims before d merge with d into dst dim a-1: fine only when they are all 1
    raise ValueError("the reshape merges the channel dim under an outer dim")


def size_reads(value: Any, ndim: Callable[[Node], int]) -> list[tuple[Node, int]] | None:
    """The ``(tensor, dim)`` sizes that the run-time size ``value`` reads (``dim`` made non-negative with
    ``ndim``): a size read (``t.shape[i]``, ``t.size(i)``, ``t.size()[i]``) or integer arithmetic (``*``,
    ``//``, ``+``, ``-``) of size reads and constants. None when it is computed any other way."""
    if not isinstance(value, Node):
        return [] if isinstance(value, int) else None
    args: tuple[Any, ...] = tuple(value.args)
    t: Any
    i: Any
    if value.op == "call_method" and value.target == "size" and len(args) == 2:
        t, i = args
    elif value.op == "call_function" and value.target is operator.getitem and isinstance(args[0], Node):
        src: Node = args[0]
        i = args[1]
        shape = src.op == "call_function" and src.target is getattr and src.args[1:] == ("shape",)
        if not (shape or (src.op == "call_method" and src.target == "size" and len(src.args) == 1)):
            return None
        t = src.args[0]
    elif value.op == "call_function" and value.target in _ARITHMETIC and not value.kwargs:
        out: list[tuple[Node, int]] = []
        for a in args:
            part = size_reads(a, ndim)
            if part is None:
                return None
            out += part
        return out
    else:
        return None
    if not isinstance(t, Node) or not isinstance(i, int) or isinstance(i, bool):
        return None
    return [(t, i + ndim(t) if i < 0 else i)]
