"""``sgm.squash_into(model, shrink=True)``: resize the user's own model (and a Hugging Face config) in place.

The shrunk tensors replace the model's own (parameter objects are kept, their data shrinks), module
size attributes follow (:data:`fx_sparsify.passes.shrink.REFRESH`), and for a Hugging Face model the
config gets the new widths so that ``save_pretrained`` → ``from_pretrained`` rebuilds the same model:
``intermediate_size`` for MLP neurons, ``num_attention_heads`` / ``num_key_value_heads`` (and
``head_dim``, which never changes) for heads. That needs every layer to get the same widths: per-layer
widths (a ``global`` rule), a width the config has no field for, or heads of a model that derives its
head size from ``hidden_size / num_attention_heads`` (BERT) are refused, saying why and what to do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from ._modules import find_tensor
from .passes.channel_groups import FUNCTIONS, ChannelGroup, ChannelPlan, _arg, _at
from .passes.shrink import refresh_attributes
from .state import SparsityState

__all__ = ["shrink_into"]


def _config_widths(plan: ChannelPlan, keeps: dict[int, Tensor], model: nn.Module, shapes: dict[str, Any]) -> dict[str, int]:
    """Config field → its new value, or a ``ValueError`` naming why the config cannot describe the widths."""
    config = getattr(model, "config", None)
    shrinking = [g for g in plan.groups if g.removable and g.id in keeps and not bool(keeps[g.id].all())]
    if config is None:
        heads = [g for g in shrinking if g.unit == "head"]
        if heads:
            raise ValueError(
                "squash_into(model, shrink=True): head counts live in your model's forward code (its view shapes), "
                "which cannot be rewritten in place; use sgm.squash(shrink=True), the shrunk graph module"
            )
        return {}
    layers = getattr(config, "num_hidden_layers", None)
    found: dict[str, list[int]] = {}

    def note(field: str, value: int, group: ChannelGroup) -> None:
        found.setdefault(field, []).append(value)

    for g in shrinking:
        kept = int(keeps[g.id].sum())
        if g.unit == "head":
            if getattr(config, "head_dim", None) is None:
                raise ValueError(
                    f"squash_into(model, shrink=True): {type(config).__name__} has no 'head_dim', so "
                    f"{type(model).__name__} derives its head size from hidden_size / num_attention_heads and a "
                    "head-pruned model could not be rebuilt by from_pretrained; prune its FFN channels only, or use "
                    "sgm.squash(shrink=True)"
                )
            note("num_attention_heads", kept * g.heads_per_unit, g)
            if hasattr(config, "num_key_value_heads"):
                note("num_key_value_heads", kept if g.heads_per_unit > 1 else kept * g.heads_per_unit, g)
            continue
        root = next(m for m in g.members if m.tensor == g.roots[0])
        rows = shapes[g.roots[0]][root.dim]
        if rows != getattr(config, "intermediate_size", None):
            raise ValueError(
                f"squash_into(model, shrink=True): group {g.id} ({g.roots[0]}) changes a width of {rows} that "
                f"{type(config).__name__} has no field for (only intermediate_size and head counts are resized); "
                "use sgm.squash(shrink=True)"
            )
        note("intermediate_size", kept, g)
    out = {}
    for field, values in found.items():
        if len(set(values)) > 1 or (layers is not None and len(values) != layers):
            raise ValueError(
                f"squash_into(model, shrink=True): {field} would differ between layers ({sorted(set(values))} over "
                f"{len(values)} of {layers} layers), which one config value cannot describe, so from_pretrained "
                "could not reload it; give every layer the same widths ('global': false and a rule selecting every "
                "layer), or use sgm.squash(shrink=True)"
            )
        out[field] = values[0]
    if "num_attention_heads" in out:
        out["head_dim"] = config.head_dim
    return out


def _module_edits(plan: ChannelPlan, shrunk: GraphModule, model: nn.Module) -> list[tuple[nn.Module, str, Any]]:
    """(module of ``model``, attribute, new value) for every size attribute the shrink rewrote: a module
    attribute in an fx capture, and in an export capture a convolution's ``groups`` call argument (depthwise
    convolutions), which belongs to the module owning that call's weight."""
    nodes = {n.name: n for n in shrunk.graph.nodes}
    out: list[tuple[nn.Module, str, Any]] = []
    for group in plan.groups:
        for edit in group.edits if group.removable else ():
            if edit.kind == "attr":
                out.append((model.get_submodule(edit.where), edit.path[0],
                            getattr(shrunk.get_submodule(edit.where), edit.path[0])))
                continue
            node = nodes.get(edit.where)
            if node is None or node.op != "call_function":
                continue
            entry = FUNCTIONS.get(node.target) or FUNCTIONS.get(getattr(node.target, "overloadpacket", None))
            weight = _arg(node, 1, "weight")
            if entry is None or entry[0] != "conv" or tuple(edit.path) not in (("args", 6), ("kwargs", "groups")) \
                    or not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
                continue  # other call arguments (view shapes of heads) live in the model's forward code
            owner = str(weight.target).rpartition(".")[0]
            module = model.get_submodule(owner)
            if hasattr(module, "groups"):
                out.append((module, "groups", _at(node, tuple(edit.path))))
    return out


def shrink_into(state: SparsityState, shrunk: GraphModule, keeps: dict[int, Tensor], model: nn.Module) -> nn.Module:
    """Write ``shrunk`` (a ``squash(shrink=True)`` result) into ``model`` in place and return it."""
    plan: ChannelPlan = state.extra["channels"]
    source = shrunk.state_dict()
    missing = [k for k in source if find_tensor(model, k) is None]
    if missing:
        raise ValueError(f"squash_into(): the model has no tensor(s) {', '.join(missing[:6])}; pass the model you "
                         f"sparsified ({state.class_name})")
    shapes = {k: tuple(find_tensor(model, k).shape) for k in source}  # type: ignore[union-attr]
    fields = _config_widths(plan, keeps, model, shapes)  # all checks before anything changes
    edits = _module_edits(plan, shrunk, model)
    with torch.no_grad():
        for key, value in source.items():
            tensor = find_tensor(model, key)
            assert tensor is not None
            new = value.to(device=tensor.device, dtype=tensor.dtype)
            if tensor.shape == new.shape:
                tensor.copy_(new)
                continue
            owner, _, leaf = key.rpartition(".")
            module = model.get_submodule(owner)
            if leaf in module._parameters:
                module._parameters[leaf].data = new.clone()  # type: ignore[union-attr]
            else:
                module._buffers[leaf] = new.clone()
    for module, name, value in edits:  # size attributes the shrink rewrote (depthwise groups)
        setattr(module, name, value)
    refresh_attributes(model)
    config = getattr(model, "config", None)
    for field, value in fields.items():
        setattr(config, field, value)
    return model
