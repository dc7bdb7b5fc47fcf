"""Pass: give every targeted parameter one mask node that feeds every use of it.

For ``fc1.weight`` the pass registers a ``torch.bool`` buffer ``fc1_weight_mask`` (all True: keep
everything) on the root and inserts, before the first use::

    %fc1_weight : get_attr[target=fc1.weight]
    %fc1_weight_mask : get_attr[target=fc1_weight_mask]
    %fc1_weight_masked : call_function[target=fx_sparsify.ops.apply_mask](args = (%fc1_weight, %fc1_weight_mask))
    %fc1 : call_function[target=torch.nn.functional.linear](args = (%x, %fc1_weight_masked, %fc1_bias))

Leaf module calls (``Linear``, ``Conv*``, ``Embedding``…) that own a target are rewritten into
functional calls by the table ``FUNCTIONAL``; other leaf modules go through ``ops.module_call``
(``torch.func.functional_call``). Every rewritten node records under ``node.meta["fx_sparsify"]`` how to
restore the original ``call_module``, which squash does. A parameter whose only uses are
``Embedding`` / ``EmbeddingBag`` lookups gets no full-table multiply: the lookup masks the gathered rows.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from .. import ops
from .._meta import NodeInfo, annotate
from .._names import mask_buffer_name, unique_attr
from ..methods import generator_for
from ..select import Selection, WeightTarget
from ..sparsify import Sparsify
from ._runner import PassResult, finish

__all__ = ["insert_weight_masks", "FUNCTIONAL"]

Args = tuple[Any, ...]
# (function, args, positions of the original args, (kwarg name, position) of the original kwargs)
Rewrite = tuple[Callable[..., Any], Args, tuple[int, ...], tuple[tuple[str, int], ...]]
# the first argument is a module of the FUNCTIONAL key's type
Builder = Callable[[Any, Args, dict[str, Any], Callable[[str], Any]], "Rewrite | None"]


def _linear(m: nn.Linear, args: Args, kwargs: dict[str, Any], p: Callable[[str], Any]) -> Rewrite | None:
    if len(args) != 1 or kwargs:
        return None
    return F.linear, (args[0], p("weight"), p("bias")), (0,), ()


def _conv(fn: Callable[..., Any]) -> Builder:
    def build(m: Any, args: Args, kwargs: dict[str, Any], p: Callable[[str], Any]) -> Rewrite | None:
        if len(args) != 1 or kwargs:
            return None
        if m.padding_mode == "zeros":
            return fn, (args[0], p("weight"), p("bias"), m.stride, m.padding, m.dilation, m.groups), (0,), ()
        pad = tuple(m._reversed_padding_repeated_twice)
        return (
            ops.conv_padded,
            (args[0], p("weight"), p("bias"), pad, m.padding_mode, m.stride, m.dilation, m.groups),
            (0,),
            (),
        )

    return build


def _conv_transpose(fn: Callable[..., Any]) -> Builder:
    def build(m: Any, args: Args, kwargs: dict[str, Any], p: Callable[[str], Any]) -> Rewrite | None:
        if len(args) != 1 or kwargs or m.padding_mode != "zeros":
            return None
        return (
            fn,
            (args[0], p("weight"), p("bias"), m.stride, m.padding, m.output_padding, m.groups, m.dilation),
            (0,),
            (),
        )

    return build


def _embedding(m: nn.Embedding, args: Args, kwargs: dict[str, Any], p: Callable[[str], Any]) -> Rewrite | None:
    if len(args) != 1 or kwargs or m.max_norm is not None:
        return None
    tail = (m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)
    mask = p("weight:mask")
    if mask is not None:  # lookup-only table: mask the gathered rows
        return ops.embedding_masked, (args[0], p("weight"), mask, *tail), (0,), ()
    return F.embedding, (args[0], p("weight"), *tail), (0,), ()


def _embedding_bag(m: nn.EmbeddingBag, args: Args, kwargs: dict[str, Any], p: Callable[[str], Any]) -> Rewrite | None:
    names = ("input", "offsets", "per_sample_weights")
    if len(args) > 3 or set(kwargs) - set(names[1:]) or m.max_norm is not None:
        return None
    given = {**dict(zip(names, args)), **kwargs}
    mask = p("weight:mask")
    head = (given["input"], p("weight"), mask) if mask is not None else (given["input"], p("weight"))
    fn = ops.embedding_bag_masked if mask is not None else F.embedding_bag
    at = len(head)  # position of offsets
    new = (
        *head,
        given.get("offsets"),
        m.max_norm,
        m.norm_type,
        m.scale_grad_by_freq,
        m.mode,
        m.sparse,
        given.get("per_sample_weights"),
        m.include_last_offset,
        m.padding_idx,
    )
    keep = tuple((k, at if k == "offsets" else at + 6) for k in names[1:] if k in given)
    return fn, new, (0,), keep


#: Leaf module type → how to call it functionally with its (masked) parameters.
FUNCTIONAL: dict[type[nn.Module], Builder] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv(F.conv1d),
    nn.Conv2d: _conv(F.conv2d),
    nn.Conv3d: _conv(F.conv3d),
    nn.ConvTranspose1d: _conv_transpose(F.conv_transpose1d),
    nn.ConvTranspose2d: _conv_transpose(F.conv_transpose2d),
    nn.ConvTranspose3d: _conv_transpose(F.conv_transpose3d),
    nn.Embedding: _embedding,
    nn.EmbeddingBag: _embedding_bag,
}
LOOKUPS = (nn.Embedding, nn.EmbeddingBag)


def _module_params(gm: GraphModule, fqn: str, aliases: Mapping[str, str]) -> dict[str, str]:
    """Local parameter name → canonical FQN, for the parameters a leaf module owns."""
    mod = gm.get_submodule(fqn)
    prefix = f"{fqn}." if fqn else ""
    return {
        local: aliases.get(prefix + local, prefix + local) for local, _ in mod.named_parameters(remove_duplicate=False)
    }


def insert_weight_masks(gm: GraphModule, selection: Selection) -> PassResult:
    """Insert mask buffers and mask nodes for ``selection.targets`` (canonical FQN → target) into ``gm``.

    The mask node follows the rule's ``gradient``: ``ops.apply_mask`` (``"mask"``), ``ops.apply_mask_ste``
    (``"ste"``), or a :class:`~fx_sparsify.sparsify.Sparsify` module with learnable scores
    (``"supermask"`` / ``"joint"``, buffer ``<module>.mask``). With ``"mode": "inplace"`` only the mask
    buffers are registered: the graph carries no multiply.
    """
    targets, aliases = selection.targets, selection.aliases
    seed, in_graph = selection.spec.seed, selection.spec.mode == "graph"
    graph = gm.graph
    uses: dict[str, list[Node]] = {name: [] for name in targets}
    paths: dict[str, str] = {}  # canonical FQN → a path to the parameter inside gm
    for node in graph.nodes:
        if node.op == "get_attr" and aliases.get(node.target, node.target) in targets:
            uses[aliases.get(node.target, node.target)].append(node)
            paths.setdefault(aliases.get(node.target, node.target), node.target)
        elif node.op == "call_module":
            for local, canonical in _module_params(gm, node.target, aliases).items():
                if canonical in targets and node not in uses[canonical]:
                    uses[canonical].append(node)
                    paths.setdefault(canonical, f"{node.target}.{local}" if node.target else local)
    # an export capture keeps a get_attr for a parameter nothing reads: that is not a use
    unused = [name for name, u in uses.items() if not any(n.op == "call_module" or n.users for n in u)]
    if unused:
        raise ValueError(
            f"target(s) {', '.join(map(repr, unused))} are never used by the captured graph's forward, so a mask "
            "on them would do nothing; exclude them with 'method': 'dense' or select other tensors"
        )

    def lookup_only(name: str) -> bool:
        return all(
            u.op == "call_module"
            and isinstance(gm.get_submodule(str(u.target)), LOOKUPS)
            and _module_params(gm, str(u.target), aliases).get("weight") == name
            for u in uses[name]
        )

    masked: dict[str, Node] = {}
    lookup_masks: dict[str, tuple[Node, Node]] = {}
    created: dict[str, dict[str, str]] = {}
    order = {n: i for i, n in enumerate(graph.nodes)}  # positions of the original nodes
    for name, use_nodes in uses.items():
        first = use_nodes[0]
        gradient = getattr(targets[name].rule, "gradient", "mask")
        param = gm.get_parameter(paths[name])
        buffer = mask_buffer_name(gm, name)
        created[name] = {"param": paths[name]}
        if gradient in ("supermask", "joint"):
            module = _sparsify_module(gm, name, targets[name], param, seed)
            created[name].update(buffer=f"{module}.mask", module=module)
        else:
            # a bool keep-mask: 1 byte per entry, a quarter of an fp32 weight (SPEC §15)
            gm.register_buffer(buffer, torch.ones(param.shape, dtype=torch.bool, device=param.device))
            created[name]["buffer"] = buffer
        if not in_graph:
            continue
        candidates = [u for u in use_nodes if u.op == "call_module"]
        candidates += [user for u in use_nodes if u.op == "get_attr" for user in u.users]
        anchor = min(candidates, key=order.__getitem__)  # the first node that reads the parameter
        with graph.inserting_before(anchor):
            weight = first if first.op == "get_attr" else graph.get_attr(paths[name])
            if gradient in ("supermask", "joint"):
                node = graph.create_node("call_module", created[name]["module"], (weight,), {}, name=f"{buffer}ed")
            else:
                mask = graph.get_attr(buffer)
                if gradient == "mask" and lookup_only(name):
                    lookup_masks[name] = (weight, mask)
                    continue
                fn = ops.apply_mask if gradient == "mask" else ops.apply_mask_ste
                node = graph.create_node("call_function", fn, (weight, mask), name=f"{buffer}ed")
        annotate(node, NodeInfo("weight_mask", target=name))
        masked[name] = node
        for use in use_nodes:
            if use.op == "get_attr":
                use.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)  # noqa: B023 (called here)

    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        params = _module_params(gm, str(node.target), aliases)
        if not any(c in masked or c in lookup_masks for c in params.values()):
            continue
        _rewrite_module_call(gm, node, params, masked, lookup_masks)

    return finish(gm, created)


def _sparsify_module(gm: GraphModule, name: str, target: WeightTarget, param: torch.Tensor, seed: int) -> str:
    """A Sparsify module whose learnable scores (initialised to ``|weight|``) rank the mask."""
    rule = target.rule
    module = Sparsify(
        param.shape,
        sparseness=rule.method,
        backward_mode=getattr(rule, "gradient"),  # noqa: B009 (WeightRule | GlobalRule)
        generator=generator_for(seed, name, param.device),
        **rule.options,
    )
    module.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)
    module.init_scores(param.detach().abs())
    attr = unique_attr(gm, f"{name}_sparsify")
    gm.add_module(attr, module)
    return attr


def _rewrite_module_call(
    gm: GraphModule,
    node: Node,
    local: dict[str, str],
    masked: dict[str, Node],
    lookup_masks: dict[str, tuple[Node, Node]],
) -> None:
    graph = gm.graph
    module = gm.get_submodule(str(node.target))
    with graph.inserting_before(node):

        def param(key: str) -> Any:
            local_name, _, want = key.partition(":")
            canonical = local.get(local_name)
            if canonical is None:
                return None
            if want == "mask":
                return lookup_masks[canonical][1] if canonical in lookup_masks else None
            if canonical in masked:
                return masked[canonical]
            if canonical in lookup_masks:
                return lookup_masks[canonical][0]
            return graph.get_attr(f"{node.target}.{local_name}" if node.target else local_name)

        builder = FUNCTIONAL.get(type(module))
        rewrite = builder(module, node.args, dict(node.kwargs), param) if builder else None
        if rewrite is None:  # the module itself runs, on the masked tensors
            replaced = {}
            for k, c in local.items():
                if c in masked:
                    replaced[k] = masked[c]
                elif c in lookup_masks:  # a table the builders could not rewrite (max_norm, keyword call)
                    whole = graph.create_node(
                        "call_function", ops.apply_mask, lookup_masks[c], name=f"{node.name}_{k}_masked"
                    )
                    annotate(whole, NodeInfo("weight_mask", target=c))
                    replaced[k] = whole
            target = graph.get_attr(str(node.target))
            fn: Callable[..., Any] = ops.module_call
            args: Args = (target, replaced, *node.args)
            positions = tuple(range(2, 2 + len(node.args)))
            kw: tuple[tuple[str, int], ...] = ()
            kwargs = dict(node.kwargs)
        else:
            fn, args, positions, kw = rewrite
            kwargs = {}
        new = graph.create_node("call_function", fn, args, kwargs, name=f"{node.name}_{fn.__name__}")
    role = "embedding_lookup" if fn in (ops.embedding_masked, ops.embedding_bag_masked) else "module_call"
    table = next((c for c in local.values() if c in lookup_masks), None) if role == "embedding_lookup" else None
    annotate(new, NodeInfo(role, target=table, module=str(node.target), arg_positions=positions, kwarg_positions=kw))
    new.meta.update({k: v for k, v in node.meta.items() if k not in new.meta})
    node.replace_all_uses_with(new)
    graph.erase_node(node)
