"""The one ``node.meta`` key fx_sparsify writes, and the small frozen record stored under it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.fx import Node

__all__ = ["META_KEY", "NodeInfo", "annotate", "info_of"]

META_KEY = "fx_sparsify"


@dataclass(frozen=True)
class NodeInfo:
    """What an inserted node is for.

    role: ``"weight_mask"`` (``weight * mask``), ``"embedding_lookup"`` (masked gathered rows),
    ``"module_call"`` (a leaf module call rewritten as a functional call), ``"observer"``,
    ``"activation_mask"``.
    target: the sparsity target name (``"fc1.weight"``, ``"fc2:input"``).
    module: for ``module_call``, the FQN of the module that the call replaced.
    arg_positions / kwarg_positions: where the original call's args and kwargs sit in the new node's
    args, so squash can restore ``call_module`` exactly.
    """

    role: str
    target: str | None = None
    module: str | None = None
    arg_positions: tuple[int, ...] = ()
    kwarg_positions: tuple[tuple[str, int], ...] = ()


def annotate(node: Node, info: NodeInfo) -> Node:
    node.meta[META_KEY] = info
    return node


def info_of(node: Node) -> NodeInfo | None:
    value: Any = node.meta.get(META_KEY)
    return value if isinstance(value, NodeInfo) else None
