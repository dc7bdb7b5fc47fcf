"""``sgm.squash_into(model, shrink=...)``: the squashed weights written into the user's own eager model, in place.

:func:`write_into` takes the squashed module. A dense squash is copied into the model's tensors of the same
names and shapes: the model keeps its class, its methods (``save_pretrained``) and its parameter objects (an
optimizer holding them keeps working). A ``squash(shrink=True)`` result resizes the model: the shrunk tensors
replace the model's own (parameter objects are kept, their data shrinks), module
size attributes follow (:data:`fx_sparsify.passes.shrink.REFRESH`), and for a Hugging Face model the
config gets the new widths so that ``save_pretrained`` → ``from_pretrained`` rebuilds the same model:
the feed-forward width field (:data:`_FFN_FIELDS`: ``intermediate_size``, GPT-2's ``n_inner``, OPT's
``ffn_dim``, T5's ``d_ff``, Whisper / BART's ``encoder_ffn_dim`` / ``decoder_ffn_dim``) for MLP neurons,
``num_attention_heads`` / ``num_key_value_heads`` (and ``head_dim``, which never changes) for heads.
That needs every layer reading a field to get the same width: per-layer widths (a ``global`` rule), an
encoder and a decoder that would give one shared field (T5's ``d_ff``) two values, a width the config
has no field for, or heads of a model that derives its head size from ``hidden_size /
num_attention_heads`` (BERT) or of an encoder-decoder model (T5: one head count for both stacks) are
refused, saying why and what to do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from ._modules import find_tensor
from .passes.channels import FUNCTIONS, ChannelPlan, arg_at, node_arg
from .passes.shrink import refresh_attributes
from .report import fate_of
from .roundtrip import needs_take_over
from .state import SparsityState

__all__ = ["write_into"]


def write_into(
    sgm: GraphModule,
    state: SparsityState,
    squashed: GraphModule,
    model: nn.Module,
    keeps: dict[int, Tensor] | None = None,
) -> nn.Module:
    """Write ``squashed`` (the squash of ``sgm``, described by ``state``) into ``model`` in place; return ``model``.

    ``keeps`` (group id → keep vector) says that ``squashed`` is a ``squash(shrink=True)`` result: the model's
    tensors, size attributes and Hugging Face config are resized to it. Without it the shapes must match.
    """
    if keeps is not None:
        return _resize_into(state, squashed, keeps, model)
    return _copy_into(sgm, state, squashed, model)


# The config fields giving a feed-forward width: (width field, its layer-count field, stack). The stack is ""
# for a field that every layer reads, or "encoder" / "decoder" for one that only that stack's layers read
# (their tensor names hold "encoder." / "decoder."). A field listed for both stacks (T5's d_ff) needs the same
# width in both. Fields are matched by the width's value; aliases (config.attribute_map) are resolved.
_FFN_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("intermediate_size", "num_hidden_layers", ""),  # LLaMA, BERT, ViT, Mistral, ...
    ("n_inner", "n_layer", ""),  # GPT-2, GPT-J (None: 4 * n_embd)
    ("ffn_dim", "num_hidden_layers", ""),  # OPT
    ("d_ff", "num_layers", "encoder"),  # T5
    ("d_ff", "num_decoder_layers", "decoder"),
    ("encoder_ffn_dim", "encoder_layers", "encoder"),  # Whisper, BART, Marian, ...
    ("decoder_ffn_dim", "decoder_layers", "decoder"),
)
_UNSET_WIDTH = {"n_inner": lambda config: 4 * config.n_embd}  # a width field left None: the width the model uses


def _stack(name: str, model: nn.Module) -> str:
    """``"encoder"`` / ``"decoder"`` for a tensor of that stack, by its name, else by the model's class name (a
    bare ``WhisperEncoder`` holds its layers at the top), else ``""``."""
    for where in (name.lower(), type(model).__name__.lower() + "."):
        found = [s for s in ("encoder", "decoder") if s + "." in where]
        if found:
            return found[0] if len(found) == 1 else ""
    return ""


def _config_widths(
    plan: ChannelPlan, keeps: dict[int, Tensor], model: nn.Module, shapes: dict[str, Any]
) -> dict[str, int]:
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
    name, alias = type(config).__name__, dict(getattr(config, "attribute_map", None) or {})

    def real(field: str) -> str:
        return alias.get(field, field)

    def width(field: str) -> Any:
        value = getattr(config, field, None)
        return _UNSET_WIDTH[field](config) if value is None and field in _UNSET_WIDTH else value

    # this config's rows of _FFN_FIELDS, named by the attributes it really stores
    rows = list(
        dict.fromkeys((real(f), real(n), s) for f, n, s in _FFN_FIELDS if hasattr(config, f) and hasattr(config, n))
    )
    stacks = {_stack(k, model) for k in shapes}
    found: dict[tuple[str, str, str], list[int]] = {}
    for g in shrinking:
        kept = int(keeps[g.id].sum())
        if g.unit == "head":
            if getattr(config, "head_dim", None) is None:
                raise ValueError(
                    f"squash_into(model, shrink=True): {name} has no 'head_dim', so "
                    f"{type(model).__name__} derives its head size from hidden_size / num_attention_heads and a "
                    "head-pruned model could not be rebuilt by from_pretrained; prune its FFN channels only, or use "
                    "sgm.squash(shrink=True)"
                )
            if {"encoder", "decoder"} <= stacks:
                raise ValueError(
                    f"squash_into(model, shrink=True): group {g.id} ({g.roots[0]}) prunes heads of "
                    f"{type(model).__name__}, an encoder-decoder model whose {name} head count is read by the encoder "
                    "and the decoder (self and cross attention) alike, so from_pretrained could not rebuild it; prune "
                    "its FFN channels only, or use sgm.squash(shrink=True)"
                )
            layers = real("num_hidden_layers")
            found.setdefault((real("num_attention_heads"), layers, ""), []).append(kept * g.heads_per_unit)
            if hasattr(config, "num_key_value_heads"):
                found.setdefault((real("num_key_value_heads"), layers, ""), []).append(
                    kept if g.heads_per_unit > 1 else kept * g.heads_per_unit
                )
            continue
        root = next(m for m in g.members if m.tensor == g.roots[0])
        size, stack = shapes[g.roots[0]][root.dim], _stack(g.roots[0], model)
        fits = [r for r in rows if width(r[0]) == size and (not r[2] or not stack or r[2] == stack)]
        if len(fits) != 1:
            what = (
                "has no field for"
                if not fits
                else "has several fields for (" + ", ".join(f"{f} of the {s or 'all'} layers" for f, _, s in fits) + ")"
            )
            raise ValueError(
                f"squash_into(model, shrink=True): group {g.id} ({g.roots[0]}) changes a width of {size} that "
                f"{name} {what}; the feed-forward width fields resized are "
                f"{', '.join(dict.fromkeys(f for f, _, _ in _FFN_FIELDS))} (by encoder / decoder tensor names where "
                "a config has one per stack), plus head counts; use sgm.squash(shrink=True)"
            )
        found.setdefault(fits[0], []).append(kept)
    out: dict[str, int] = {}
    for field in dict.fromkeys(k[0] for k in found):  # every layer that reads the field, in each stack it has
        for key in dict.fromkeys(
            [r for r in rows if r[0] == field and (not r[2] or r[2] in stacks)] + [k for k in found if k[0] == field]
        ):
            values, n_layers = found.get(key, []), getattr(config, key[1], None)
            if not values or len(set(values)) > 1 or (n_layers is not None and len(values) != n_layers):
                among = f"{n_layers} {key[2] + ' ' if key[2] else ''}layers ({key[1]})"
                rest = f", the others keep {width(field)}" if n_layers is not None and len(values) < n_layers else ""
                raise ValueError(
                    f"squash_into(model, shrink=True): {field} would differ between layers ("
                    + (
                        f"{len(values)} of the {among} get {sorted(set(values))}{rest}"
                        if values
                        else f"the {among} keep {width(field)}"
                    )
                    + "), which one config value cannot describe, so from_pretrained could not reload it; give every "
                    "layer the same widths ('global': false and a rule selecting every layer), or use "
                    "sgm.squash(shrink=True)"
                )
            if out.setdefault(field, values[0]) != values[0]:
                raise ValueError(
                    f"squash_into(model, shrink=True): {field} is one {name} field for both the encoder and the "
                    f"decoder layers, which would get {out[field]} and {values[0]}; give both the same sparsity, or "
                    "use sgm.squash(shrink=True)"
                )
    if real("num_attention_heads") in out:
        out[real("head_dim")] = config.head_dim
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
                out.append(
                    (
                        model.get_submodule(edit.where),
                        edit.path[0],
                        getattr(shrunk.get_submodule(edit.where), edit.path[0]),
                    )
                )
                continue
            node = nodes.get(edit.where)
            if node is None or node.op != "call_function":
                continue
            entry = FUNCTIONS.get(node.target) or FUNCTIONS.get(getattr(node.target, "overloadpacket", None))
            weight = node_arg(node, 1, "weight")
            if (
                entry is None
                or entry[0] != "conv"
                or tuple(edit.path) not in (("args", 6), ("kwargs", "groups"))
                or not isinstance(weight, torch.fx.Node)
                or weight.op != "get_attr"
            ):
                continue  # other call arguments (view shapes of heads) live in the model's forward code
            owner = str(weight.target).rpartition(".")[0]
            module = model.get_submodule(owner)
            if hasattr(module, "groups"):
                out.append((module, "groups", arg_at(node, tuple(edit.path))))
    return out


def _resize_into(state: SparsityState, shrunk: GraphModule, keeps: dict[int, Tensor], model: nn.Module) -> nn.Module:
    """Write ``shrunk`` (a ``squash(shrink=True)`` result) into ``model`` in place and return it."""
    plan = state.channels
    assert plan is not None, "squash_into(shrink=True) without channel groups squashes dense"
    source = shrunk.state_dict()
    missing = [k for k in source if find_tensor(model, k) is None]
    if missing:
        raise ValueError(
            f"squash_into(): the model has no tensor(s) {', '.join(missing[:6])}; pass the model you "
            f"sparsified ({state.class_name})"
        )
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


def _copy_into(sgm: GraphModule, state: SparsityState, squashed: GraphModule, model: nn.Module) -> nn.Module:
    """Copy ``squashed``'s state into ``model``'s own tensors (in place) and return ``model``.

    The model keeps its class, its methods (``save_pretrained``) and its parameter objects (an
    optimizer holding them keeps working). An activation mask that squash keeps as a multiply has no
    place in the eager model: that is an error naming the targets.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"squash_into() takes your eager nn.Module, got {type(model).__name__}")
    kept = [r.name for r in state.targets.values() if r.kind == "activation" and fate_of(sgm, state, r) != "folded"]
    if kept:
        raise ValueError(
            f"squash_into(): the activation mask(s) of {', '.join(map(repr, kept))} cannot be folded into a weight, so "
            "an eager model cannot carry them (squash() keeps them as a multiply in the graph). Use sgm.squash() "
            "instead, or drop those activation rules."
        )
    source = squashed.state_dict()
    missing, wrong = [], []
    destination: dict[str, Tensor] = {}
    for key, value in source.items():
        found = find_tensor(model, key)
        if found is None:
            missing.append(key)
        elif found.shape != value.shape:
            wrong.append(f"{key}: model {tuple(found.shape)} vs squashed {tuple(value.shape)}")
        else:
            destination[key] = found
    if missing or wrong:
        hint = (
            " It carries pruning hooks or parametrizations: remove them first (prune.remove)."
            if needs_take_over(model)
            else ""
        )
        raise ValueError(
            f"squash_into(): the model does not match the squashed module "
            f"({type(model).__name__} vs {state.class_name}): "
            + "; ".join(
                filter(
                    None,
                    [
                        f"missing {', '.join(missing[:6])}" if missing else "",
                        f"shapes differ: {'; '.join(wrong[:6])}" if wrong else "",
                    ],
                )
            )
            + "."
            + hint
        )
    with torch.no_grad():
        for key, tensor in destination.items():
            tensor.copy_(source[key].to(device=tensor.device, dtype=tensor.dtype))
    return model
