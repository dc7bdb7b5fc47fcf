"""Stage: fold the masks into the constants and return a plain ``torch.fx.GraphModule`` (SPEC §6).

Squash is a sequence of small passes over a copy of the sparse module; the sparse module itself is
left as it was:

1. ``fold_weight_masks``: ``weight ← weight * mask`` under the weight's own name; mask nodes removed.
2. ``restore_module_calls``: functional calls made by the weight pass become ``call_module`` again.
3. ``strip``: our meta key dropped, dead nodes eliminated; mask buffers are not carried over.

The result's ``state_dict`` has the original model's keys and shapes, so
``model.load_state_dict(squashed.state_dict())`` works on the user's eager model.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch.fx import GraphModule

from .. import ops
from .._meta import META_KEY, info_of
from .._modules import attach_tensor, find_tensor
from ._runner import PassResult, finish

if TYPE_CHECKING:
    from ..sparse_graph_module import SparseGraphModule, SparsityState

__all__ = ["squash", "fold_weight_masks", "restore_module_calls", "strip"]


def fold_weight_masks(gm: GraphModule, state: SparsityState) -> PassResult:
    """Multiply every masked weight by its mask in place; bypass and drop the mask nodes."""
    with torch.no_grad():
        for record in state.targets.values():
            if record.kind in ("weight", "embedding"):
                weight = gm.get_parameter(record.param)
                weight.mul_(gm.get_buffer(record.buffer).to(weight.dtype))
    names = []
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is ops.apply_mask:
            node.replace_all_uses_with(node.args[0])
            names.append(node.name)
            gm.graph.erase_node(node)
    return finish(gm, names)


def restore_module_calls(gm: GraphModule) -> PassResult:
    """Turn each functional call that replaced a leaf module call back into ``call_module``."""
    graph = gm.graph
    names = []
    for node in list(graph.nodes):
        info = info_of(node)
        if info is None or info.module is None:
            continue
        args = tuple(node.args[i] for i in info.arg_positions)
        kwargs = {**{k: node.args[i] for k, i in info.kwarg_positions}, **node.kwargs}
        with graph.inserting_before(node):
            new = graph.create_node("call_module", info.module, args, kwargs, name=info.module.replace(".", "_"))
        new.meta = {k: v for k, v in node.meta.items() if k != META_KEY}
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        names.append(new.name)
    return finish(gm, names)


def strip(gm: GraphModule) -> PassResult:
    """Drop our meta key and the nodes nothing uses any more."""
    for node in gm.graph.nodes:
        node.meta.pop(META_KEY, None)
    gm.graph.eliminate_dead_code()
    return finish(gm, [])


def _match_state_keys(out: GraphModule, source: GraphModule, keys: tuple[str, ...]) -> None:
    """Make ``out.state_dict()`` have exactly the original model's keys.

    Re-attaches parameters/buffers the graph does not reference (unused, tied aliases) and makes
    buffers the original did not save (export lifts non-persistent buffers) non-persistent again.
    """
    wanted = set(keys)
    for name, _ in list(out.named_buffers(remove_duplicate=False)):
        if name not in wanted:
            owner, _, leaf = name.rpartition(".")
            out.get_submodule(owner)._non_persistent_buffers_set.add(leaf)
    have = set(out.state_dict().keys())
    for key in keys:
        if key not in have:
            value = find_tensor(source, key)
            assert value is not None, f"{key} vanished from the sparse module"
            attach_tensor(out, key, value)


def squash(sgm: SparseGraphModule) -> GraphModule:
    """A plain GraphModule with the masks of ``sgm`` folded into its constants."""
    work = copy.deepcopy(sgm)
    state = work._fxs
    fold_weight_masks(work, state)
    restore_module_calls(work)
    strip(work)
    out = GraphModule(work, work.graph, class_name=state.class_name)
    _match_state_keys(out, work, state.state_keys)
    out.train(sgm.training)
    return out
