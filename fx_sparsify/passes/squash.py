"""Stage: fold the masks into the constants and return a plain ``torch.fx.GraphModule`` (SPEC §6).

:func:`fold_masks` runs small passes over a :func:`shallow_copy` of the sparse module (own graph and
module attributes, shared tensors: new memory only for the weights that change); the sparse module
itself is left as it was, except that one built with ``inplace=True`` gives up its pruned weight values
(SPEC §15):

1. ``fold_weight_masks``: ``weight ← weight * mask`` under the weight's own name; mask nodes removed.
2. ``fold_activation_masks``: a mask constant over all but the consumer's input feature / channel is
   folded into the consuming ``Linear`` columns / ``Conv`` input channels (``W·diag(m)``); any other
   mask stays as ``x * mask`` with the mask a named non-persistent constant buffer. Observers go.
3. ``restore_module_calls``: functional calls made by the weight pass become ``call_module`` again.
4. ``strip``: our meta key dropped, dead nodes eliminated; mask buffers are not carried over.

The result's ``state_dict`` has the original model's keys and shapes, so
``model.load_state_dict(squashed.state_dict())`` works on the user's eager model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from .. import ops
from .._export_capture import quiet_deepcopy
from .._masks import is_masked, masked_copy, zero_pruned_
from .._meta import META_KEY, info_of
from .._modules import attach_tensor, find_tensor
from ..mha import MHA_CALL, OP_CALL_ARGS, OP_TENSORS, attention_call, attention_module
from ..state import SparsityState, TargetRecord
from ._runner import PassResult, eliminate_dead_code, finish, run_passes
from .layer_index import LayerIndex

__all__ = [
    "fold_masks",
    "fold_weight_masks",
    "fold_activation_masks",
    "activation_fold",
    "restore_module_calls",
    "strip",
    "shallow_copy",
    "replace_tensor",
]


def fold_weight_masks(gm: GraphModule, state: SparsityState) -> PassResult:
    """Give every masked weight its masked value (+0.0 where pruned); bypass and drop the mask nodes.

    ``gm`` is a :func:`shallow_copy`: its tensors are the sparse module's. A weight whose pruned entries
    are already +0.0 (``"mode": "inplace"``) stays shared; otherwise it is zeroed in place for a module
    built with ``inplace=True`` (``state.inplace``: the sparse module's pruned values are given up, its
    outputs stay the same) and replaced by a new masked tensor when not, so the sparse module is unchanged.
    """
    spend = state.inplace
    with torch.no_grad():
        for record in state.targets.values():
            if record.kind in ("weight", "embedding"):
                weight, mask = gm.get_parameter(record.param), gm.get_buffer(record.buffer)  # type: ignore[arg-type]
                if is_masked(weight, mask):
                    continue
                if spend and _prunes_dead_values(record):
                    zero_pruned_(weight, mask)
                else:
                    replace_tensor(gm, weight, nn.Parameter(masked_copy(weight, mask), weight.requires_grad))
    folded = {}
    for node in list(gm.graph.nodes):
        info = info_of(node)
        if info is not None and info.role == "weight_mask":
            node.replace_all_uses_with(node.args[0])
            folded[node.name] = {"fate": "folded"}
            gm.graph.erase_node(node)
    return finish(gm, folded)


#: layer type → position, counted from the right of the input, of the dim its weight's columns read
FOLDABLE: dict[type[nn.Module], int] = {nn.Linear: 0, nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def _per_channel(mask: Tensor, from_right: int) -> Tensor | None:
    """The per-channel vector of ``mask`` if it is constant over everything but that channel dim."""
    if mask.dim() <= from_right:
        flat = mask.reshape(-1)
        return flat[:1] if bool((flat == flat[0]).all()) else None
    axis = mask.dim() - 1 - from_right
    grid = mask.movedim(axis, 0).reshape(mask.shape[axis], -1)
    return grid[:, 0] if bool((grid == grid[:, :1]).all()) else None


def activation_fold(
    gm: GraphModule, state: SparsityState, record: TargetRecord, index: LayerIndex | None = None
) -> Tensor | None:
    """The vector to fold into ``record.layer``'s weight columns, or None when folding is not exact."""
    if record.layer_type not in FOLDABLE or getattr(record.rule, "features", None) is not None:
        return None
    weight_name = f"{record.layer}.weight" if record.layer else "weight"
    canonical = state.aliases.get(weight_name)
    if sum(1 for c in state.aliases.values() if c == canonical) != 1:
        return None  # a tied weight has other uses that must not see the mask
    if len((index or LayerIndex(gm, state.aliases))(record.layer or "")) != 1:
        return None  # several call sites: fold only when there is exactly one
    return _per_channel(gm.get_buffer(record.buffer), FOLDABLE[record.layer_type])


def _fold_into_weight(weight: Tensor, vector: Tensor) -> Tensor:
    """``weight`` with its input columns / channels multiplied by ``vector``: a new tensor (the sparse
    module may share ``weight``)."""
    if weight.dim() == 2 or vector.numel() == 1:
        return weight * vector.to(weight.dtype) + 0.0  # + 0.0: pruned columns hold +0.0, never -0.0
    groups = vector.numel() // weight.shape[1]
    grouped = weight.view(groups, weight.shape[0] // groups, weight.shape[1], *weight.shape[2:])
    return (grouped * vector.to(weight.dtype).view(groups, 1, weight.shape[1], *([1] * (weight.dim() - 2))) + 0.0).view(
        weight.shape
    )


def fold_activation_masks(gm: GraphModule, state: SparsityState) -> PassResult:
    """Fold activation masks into the consuming weights where exact; keep the rest as constants."""
    graph = gm.graph
    done: dict[str, dict[str, str]] = {}
    index = LayerIndex(gm, state.aliases)
    for node in list(graph.nodes):
        info = info_of(node)
        if info is None or info.role != "activation_mask":
            continue
        record = state.targets[info.target]  # type: ignore[index]
        x = node.args[0]
        vector = activation_fold(gm, state, record, index)
        if vector is not None:
            with torch.no_grad():
                weight = gm.get_parameter(f"{record.layer}.weight" if record.layer else "weight")
                replace_tensor(gm, weight, nn.Parameter(_fold_into_weight(weight, vector), weight.requires_grad))
            node.replace_all_uses_with(x)
            done[record.name] = {"fate": "folded"}
        else:
            constant = gm.get_buffer(record.buffer)
            if record.rule.features is not None:  # type: ignore[union-attr]
                constant = _dense_feature_mask(gm, record, constant)
            setattr(gm, record.buffer, constant)
            with graph.inserting_before(node):
                mul = graph.call_function(torch.mul, (x, graph.get_attr(record.buffer)))
            node.replace_all_uses_with(mul)
            done[record.name] = {"fate": "kept as constant"}
        graph.erase_node(node)
    for node in list(graph.nodes):
        info = info_of(node)
        if info is not None and info.role == "observer":
            node.replace_all_uses_with(node.args[0])
            done[node.name] = {"fate": "removed"}
            graph.erase_node(node)
    return finish(gm, done)


def _dense_feature_mask(gm: GraphModule, record: TargetRecord, mask: Tensor) -> Tensor:
    """Per-feature masks as one multiplier: the masking op applied to ones of the observed input shape."""
    observer: Any = gm.get_submodule(record.observer)  # type: ignore[arg-type]
    if observer.input_shape is None:
        raise ValueError(
            f"squash(): the per-feature mask of {record.name!r} needs the input's shape; run one forward pass "
            "through the sparse module before squash()"
        )
    rule: Any = record.rule  # an activation rule (features, feature_dim)
    dense = ops.mask_activation(
        torch.ones(observer.input_shape, dtype=mask.dtype, device=mask.device), mask, rule.features, rule.feature_dim
    )
    return dense[0] if bool((dense == dense[:1]).all()) else dense


def restore_module_calls(gm: GraphModule, state: SparsityState) -> PassResult:
    """Turn each functional call that replaced a leaf module call back into ``call_module``, and each attention
    captured as one op (:data:`~fx_sparsify.mha.MHA_CALL`) into an ``nn.MultiheadAttention`` call (a
    torch.export of the result traces it into torch's own ops: no custom op to register when loading)."""
    graph = gm.graph
    restored = {}
    for node in list(graph.nodes):
        if MHA_CALL is not None and node.op == "call_function" and node.target is MHA_CALL:
            restored[node.name] = _attention_call(gm, node)
            continue
        info = info_of(node)
        if info is None or info.role not in ("module_call", "embedding_lookup"):
            continue
        args = tuple(node.args[i] for i in info.arg_positions)
        kwargs = {**{k: node.args[i] for k, i in info.kwarg_positions}, **node.kwargs}
        module = info.module
        assert module is not None, node.format_node()  # module calls are annotated with their module
        with graph.inserting_before(node):
            new = graph.create_node("call_module", module, args, kwargs, name=module.replace(".", "_"))
        new.meta = {k: v for k, v in node.meta.items() if k != META_KEY}
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        restored[new.name] = {"module": module}
    return finish(gm, restored)


def _attention_call(gm: GraphModule, node: Node) -> dict[str, str]:
    """Replace an attention op by a call of an ``nn.MultiheadAttention`` holding its tensors, at the path its
    tensors have (``layers.0.self_attn``); a plain function call where they are not the attributes of one
    module (then a pickle of the result cannot re-trace it)."""
    getters = {name: node.args[i] for i, name in OP_TENSORS.items()}
    paths = {name: str(g.target) for name, g in getters.items() if isinstance(g, Node) and g.op == "get_attr"}
    prefix = paths.get("out_proj.weight", "").removesuffix(".out_proj.weight")
    whole = all(g is None or paths.get(name) == f"{prefix}.{name}" for name, g in getters.items())
    if not prefix or prefix == paths.get("out_proj.weight") or not whole:
        node.target = attention_call
        return {"function": "attention_call"}
    tensors = {name: None if name not in paths else find_tensor(gm, paths[name]) for name in OP_TENSORS.values()}
    module = attention_module(tensors, node.args[7], node.args[8], node.args[18], node.args[19])  # type: ignore[arg-type]
    owner, _, leaf = prefix.rpartition(".")
    setattr(gm.get_submodule(owner), leaf, module)
    args = tuple(node.args[i] for i in (0, 1, 2))
    kwargs = {name: node.args[i] for i, name in OP_CALL_ARGS.items() if i > 2}
    with gm.graph.inserting_before(node):
        new = gm.graph.create_node("call_module", prefix, args, kwargs, name=prefix.replace(".", "_"))
    new.meta = {k: v for k, v in node.meta.items() if k != META_KEY}
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return {"module": prefix}


def strip(gm: GraphModule, state: SparsityState) -> PassResult:
    """Drop our meta key and the nodes nothing uses any more."""
    for node in gm.graph.nodes:
        node.meta.pop(META_KEY, None)
    changed = eliminate_dead_code(gm)  # in-place ops whose result is unused stay
    return finish(gm, {"dead code": {}} if changed else {})


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


def _order_like(out: nn.Module, keys: tuple[str, ...]) -> None:
    """Order each module's submodules as the original model's ``state_dict`` keys name them: a GraphModule
    creates them in the order its graph first names them, and an attention that squash turns back into a
    module call (named after its inputs are computed) would otherwise come after the layers that follow it."""
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        parts = key.split(".")
        for j in range(1, len(parts)):
            first.setdefault(".".join(parts[:j]), i)
    for name, module in out.named_modules():
        prefix = f"{name}." if name else ""
        module._modules = dict(sorted(module._modules.items(), key=lambda kv: first.get(prefix + kv[0], len(keys))))


def _match_versions(out: GraphModule, versions: dict[str, int]) -> None:
    """Give ``out``'s modules the ``_version`` the original model's modules had, so that
    ``out.state_dict()`` carries the same metadata: a module whose ``_load_from_state_dict`` reads it
    (torchvision's MNASNet rebuilds its old layout for version < 2) would otherwise misread the weights."""
    for prefix, version in versions.items():
        try:
            module = out.get_submodule(prefix)
        except AttributeError:  # a module the capture did not keep: it records no metadata of its own
            continue
        if getattr(module, "_version", None) != version:
            module._version = version


def _prunes_dead_values(record: TargetRecord) -> bool:
    """True when nothing of ``record`` ever reads its pruned weights again (no regrow, ste or scores)."""
    rule = record.rule
    return record.module is None and getattr(rule, "gradient", "mask") == "mask" and not getattr(rule, "regrow", False)


def _mirror(module: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    """A shallow copy of ``module`` and its submodules: own attribute, parameter, buffer and module dicts,
    the same tensors. A submodule reached twice is mirrored once."""
    if id(module) in memo:
        return memo[id(module)]
    new = module.__class__.__new__(module.__class__)
    memo[id(module)] = new
    new.__dict__.update(module.__dict__)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    new._modules = {k: None if m is None else _mirror(m, memo) for k, m in module._modules.items()}
    return new


def shallow_copy(gm: GraphModule) -> GraphModule:
    """A GraphModule with its own graph, modules and attributes that shares every tensor with ``gm``.

    Squash edits this copy's graph and module attributes freely; it never writes into a shared tensor
    (a changed weight is a new tensor put in place with :func:`replace_tensor`), so ``gm`` is unchanged
    and squash allocates memory only for what it changes (SPEC §15).
    """
    work = GraphModule(nn.Module(), torch.fx.Graph())
    memo: dict[int, nn.Module] = {}
    work._modules = {k: None if m is None else _mirror(m, memo) for k, m in gm._modules.items()}
    work._parameters = dict(gm._parameters)
    work._buffers = dict(gm._buffers)
    work._non_persistent_buffers_set = set(gm._non_persistent_buffers_set)
    work.graph = quiet_deepcopy(gm.graph)  # copies nodes (their meta shallowly), no tensor
    work.training = gm.training
    return work


def replace_tensor(gm: nn.Module, old: Tensor, new: Tensor) -> None:
    """Put ``new`` wherever ``gm``'s modules hold ``old`` as a parameter or buffer (tied uses included)."""
    for module in gm.modules():
        replaced = False
        for table in (module._parameters, module._buffers):
            for key, value in table.items():
                if value is old:
                    table[key] = new  # type: ignore[assignment]  # a buffer, or the parameter's new tensor
                    replaced = True
        if replaced and isinstance(module, nn.RNNBase):  # its _flat_weights list still held the old tensors
            module._init_flat_weights()


def fold_masks(gm: GraphModule, state: SparsityState) -> PassResult:
    """A plain GraphModule (the result's ``gm``) with the masks of ``gm`` (described by ``state``) folded into
    its constants; ``created`` gathers what the stages did.

    New tensors only for the weights that change; everything else is shared with ``gm``. A sparse module
    built with ``inplace=True`` gives up its pruned weight values instead (zeroed in place and shared).
    """
    ops.drop_cache([gm.get_buffer(r.buffer) for r in state.targets.values() if r.kind != "activation"])
    work = shallow_copy(gm)
    done = run_passes(work, state, [fold_weight_masks, fold_activation_masks, restore_module_calls, strip])
    out = GraphModule(work, work.graph, class_name=state.class_name)
    out._tracer_cls = out.graph._tracer_cls = None  # unpickling re-traces: export's tracer cannot, fx's can
    _match_state_keys(out, work, state.state_keys)
    _order_like(out, state.state_keys)
    _match_versions(out, getattr(state, "versions", {}))  # a state pickled before the field existed has none
    out.train(gm.training)
    return PassResult(out, True, {name: made for result in done for name, made in result.created.items()})
