"""Pass: in front of each targeted layer's input, an observer node and a mask-multiply node (SPEC §5).

For an activation rule on ``fc2`` the pass adds a module ``fc2_input_observer`` (an
:class:`~fx_sparsify.observer.ActivationObserver`), a buffer ``fc2_input_mask`` (a scalar 1 until the
first ``step()``: keep everything, any batch size) and rewires the layer's input::

    %fc2_input_observer : call_module[target=fc2_input_observer](args = (%relu,))
    %fc2_input_mask : get_attr[target=fc2_input_mask]
    %fc2_input_masked : call_function[target=fx_sparsify.ops.mask_activation](args = (%fc2_input_observer,
                                                                                 %fc2_input_mask, None, None))
    %fc2 : call_module[target=fc2](args = (%fc2_input_masked,))

The layer and its input are found by :mod:`.layer_index`: a ``call_module`` node (fx capture) or the op
that consumes its weight (export capture, or a layer traced through), whose input is the operand that
multiplies the weight; a function traced as one call hides the input, and the rule is refused rather
than put on another tensor. Any layer called as a module can be
targeted (``nn.Identity``, activations); squash folds the mask only into layers with a weight.
Weight rules with ``"scores": "wanda"`` get an observer only (``<layer>_input_norm_observer``):
per-input-feature sums of squares for |W|·‖X‖.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .. import ops
from .._meta import NodeInfo, annotate
from .._names import unique_attr
from ..observer import ActivationObserver
from ..select import Selection
from ._runner import PassResult, finish
from .layer_index import LayerIndex, layer_input

__all__ = ["insert_activation_masks", "insert_observer", "activation_target_name"]


def activation_target_name(layer: str) -> str:
    return f"{layer}:input"


def insert_observer(
    gm: GraphModule,
    index: LayerIndex,
    layer: str,
    calls: list[Node],
    observer: ActivationObserver,
    with_mask: bool,
    role_name: str,
) -> dict[str, str]:
    """An observer (and with ``with_mask`` a mask-multiply) in front of ``calls``' input; returns what it created."""
    graph = gm.graph
    carriers = dict(index.weight_uses(layer)) if any(c.op != "call_module" for c in calls) else {}
    inputs = [layer_input(gm, call, layer, carriers.get(call)) for call in calls]  # all found before any edit
    flat = layer.replace(".", "_")
    obs_name = unique_attr(gm, f"{flat}_{role_name}")
    gm.add_module(obs_name, observer)
    observer.name = obs_name
    observer.layer = layer
    created = {"observer": obs_name}
    buffer = None
    if with_mask:
        buffer = unique_attr(gm, f"{flat}_input_mask")
        features = observer.features
        gm.register_buffer(buffer, torch.ones(()) if features is None else torch.ones(len(features)))
        created["buffer"] = buffer
    target = activation_target_name(layer)
    for call, x in zip(calls, inputs):
        with graph.inserting_before(call):
            obs = graph.create_node("call_module", obs_name, (x,), {}, name=obs_name)
            annotate(obs, NodeInfo("observer", target=target, module=layer))
            new_input = obs
            if buffer is not None:
                mask = graph.get_attr(buffer)
                new_input = graph.create_node(
                    "call_function",
                    ops.mask_activation,
                    (obs, mask, observer.features, observer.feature_dim),
                    name=f"{flat}_input_masked",
                )
                annotate(new_input, NodeInfo("activation_mask", target=target, module=layer))
        call.replace_input_with(x, new_input)
    return created


def insert_activation_masks(gm: GraphModule, selection: Selection) -> PassResult:
    """Observers + mask-multiply for ``selection.layers``; observers only for ``selection.norm_layers`` (layer →
    weight target)."""
    layers, norm_layers, aliases = selection.layers, selection.norm_layers, selection.aliases
    created: dict[str, dict[str, str]] = {}
    layer_calls = LayerIndex(gm, aliases)
    for layer, rule in layers.items():
        calls = layer_calls(layer)
        if not calls:
            raise ValueError(
                f"activation rule {rule.target!r}: layer {layer!r} is never called as a module in the captured graph "
                "and has no weight whose use would show its input (the capture traced through it). Keep it as a "
                f"module call with capture='fx' and leaf_modules=[{layer!r}], "
                "or target the layer that consumes its output"
            )
        observer = ActivationObserver(rule.aggregate, rule.reduce, rule.features, rule.feature_dim)
        created[activation_target_name(layer)] = insert_observer(
            gm, layer_calls, layer, calls, observer, True, "input_observer"
        )
    for layer, weight_target in norm_layers.items():
        calls = layer_calls(layer)
        if not calls:
            raise ValueError(f"'scores': 'wanda' on {weight_target!r}: layer {layer!r} is never called in the graph")
        observer = ActivationObserver("sq_sum", "features_sum")
        created[weight_target] = insert_observer(gm, layer_calls, layer, calls, observer, False, "input_norm_observer")
    return finish(gm, created)
