"""Pass: in front of each targeted layer's input, an observer node and a mask-multiply node (SPEC §5).

For an activation rule on ``fc2`` the pass adds a module ``fc2_input_observer`` (an
:class:`~fx_sparsify.observer.ActivationObserver`), a buffer ``fc2_input_mask`` (a scalar 1 until the
first ``step()``: keep everything, any batch size) and rewires the layer's input::

    %fc2_input_observer : call_module[target=fc2_input_observer](args = (%relu,))
    %fc2_input_mask : get_attr[target=fc2_input_mask]
    %fc2_input_masked : call_function[target=fx_sparsify.ops.mask_activation](args = (%fc2_input_observer, %fc2_input_mask, None, None))
    %fc2 : call_module[target=fc2](args = (%fc2_input_masked,))

The layer is found as a ``call_module`` node (fx capture) or as the op that consumes its weight
(export capture, or a layer traced through). Weight rules with ``"scores": "wanda"`` get an observer
only (``<layer>_input_norm_observer``): per-input-feature sums of squares for |W|·‖X‖.
"""

from __future__ import annotations

import inspect

from typing import Mapping

import torch
from torch.fx import GraphModule, Node

from .. import ops
from .._meta import NodeInfo, annotate, info_of
from .._names import unique_attr
from ..observer import ActivationObserver
from ..spec import ActivationRule
from ._runner import PassResult, finish

__all__ = ["insert_activation_masks", "LayerIndex", "activation_target_name"]


def activation_target_name(layer: str) -> str:
    return f"{layer}:input"


class LayerIndex:
    """Which nodes run each layer, built in one pass over the graph (lookups stay O(1))."""

    def __init__(self, gm: GraphModule, aliases: Mapping[str, str]) -> None:
        self.aliases = aliases
        self.calls: dict[str, list[Node]] = {}
        self.getters: dict[str, list[Node]] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                self.calls.setdefault(n.target, []).append(n)
            elif n.op == "get_attr":
                self.getters.setdefault(aliases.get(n.target, n.target), []).append(n)

    def __call__(self, layer: str) -> list[Node]:
        """The nodes that run ``layer``: its ``call_module`` nodes, else the ops consuming its weight."""
        if layer in self.calls:
            return list(self.calls[layer])
        weight = self.aliases.get(f"{layer}.weight" if layer else "weight")
        getters = self.getters.get(weight, []) if weight is not None else []
        # a masked weight reaches its ops through its mask node: look through it
        sources = [u for g in getters for u in g.users if _is_weight_mask(u)] + getters
        return [u for g in sources for u in g.users
                if not _is_weight_mask(u) and u.args and isinstance(u.args[0], Node) and u.args[0] is not g]


def _is_weight_mask(node: Node) -> bool:
    info = info_of(node)
    return info is not None and info.role == "weight_mask"


def _input_of(gm: GraphModule, call: Node, layer: str) -> Node:
    """The node a layer call takes as its input: the first argument, positional or by keyword."""
    if call.args and isinstance(call.args[0], Node):
        return call.args[0]
    if call.op == "call_module" and not call.args:
        first = next(iter(inspect.signature(gm.get_submodule(call.target).forward).parameters), None)  # type: ignore[arg-type]
        if isinstance(call.kwargs.get(first), Node):
            return call.kwargs[first]  # type: ignore[index]
    raise ValueError(
        f"activation rule on {layer!r}: the layer's input in the graph is not a tensor argument ({call.format_node()}); "
        "call the layer with its input tensor as the first argument"
    )


def _insert(gm: GraphModule, layer: str, calls: list[Node], observer: ActivationObserver, with_mask: bool,
            role_name: str) -> dict[str, str]:
    graph = gm.graph
    flat = layer.replace(".", "_")
    obs_name = unique_attr(gm, f"{flat}_{role_name}")
    gm.add_module(obs_name, observer)
    observer.name = obs_name
    created = {"observer": obs_name}
    buffer = None
    if with_mask:
        buffer = unique_attr(gm, f"{flat}_input_mask")
        features = observer.features
        gm.register_buffer(buffer, torch.ones(()) if features is None else torch.ones(len(features)))
        created["buffer"] = buffer
    target = activation_target_name(layer)
    for call in calls:
        x = _input_of(gm, call, layer)
        with graph.inserting_before(call):
            obs = graph.create_node("call_module", obs_name, (x,), {}, name=obs_name)
            annotate(obs, NodeInfo("observer", target=target, module=layer))
            new_input = obs
            if buffer is not None:
                mask = graph.get_attr(buffer)
                new_input = graph.create_node(
                    "call_function", ops.mask_activation, (obs, mask, observer.features, observer.feature_dim),
                    name=f"{flat}_input_masked",
                )
                annotate(new_input, NodeInfo("activation_mask", target=target, module=layer))
        call.replace_input_with(x, new_input)
    return created


def insert_activation_masks(
    gm: GraphModule,
    layers: Mapping[str, ActivationRule],
    norm_layers: Mapping[str, str],
    aliases: Mapping[str, str],
) -> PassResult:
    """Observers + mask-multiply for ``layers``; observers only for ``norm_layers`` (layer → weight target)."""
    created: dict[str, dict[str, str]] = {}
    layer_calls = LayerIndex(gm, aliases)
    for layer, rule in layers.items():
        calls = layer_calls(layer)
        if not calls:
            raise ValueError(f"activation rule {rule.target!r}: layer {layer!r} is never called in the captured graph")
        observer = ActivationObserver(rule.aggregate, rule.reduce, rule.features, rule.feature_dim)
        created[activation_target_name(layer)] = _insert(gm, layer, calls, observer, True, "input_observer")
    for layer, weight_target in norm_layers.items():
        calls = layer_calls(layer)
        if not calls:
            raise ValueError(f"'scores': 'wanda' on {weight_target!r}: layer {layer!r} is never called in the graph")
        observer = ActivationObserver("sq_sum", "features_sum")
        created[weight_target] = _insert(gm, layer, calls, observer, False, "input_norm_observer")
    return finish(gm, created)
