"""The layers sparse storage may replace: masked ``Linear``, 1×1 ``Conv`` and GPT-2 ``Conv1D`` calls.

:func:`module_sites` finds them as module calls (fx captures), :func:`function_sites` as ``aten``
calls on ``get_attr`` weights (export captures); :func:`check_uses` keeps a layer dense when its weight
is read elsewhere or tied. Each :class:`Site` says why it must stay dense, when it must.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

__all__ = [
    "FUNCTION_SITES",
    "MODULE_SITES",
    "TRANSPOSED_FUNCTIONS",
    "TRANSPOSED_MODULES",
    "Site",
    "check_uses",
    "conv_problem",
    "function_sites",
    "module_sites",
]

#: classes (module.qualname) whose weight is [in, out] and forward x @ W + b: bitmask storage only
TRANSPOSED_MODULES = ("transformers.pytorch_utils.Conv1D",)
#: export-captured functions that multiply by a transposed weight (the Conv1D's addmm)
TRANSPOSED_FUNCTIONS = (torch.ops.aten.addmm.default,)
#: module type → number of spatial dims (0: Linear)
MODULE_SITES: dict[type[nn.Module], int] = {nn.Linear: 0, nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
#: export-captured function → (spatial dims, positions of (input, weight, bias),
#: positions of (stride, padding, dilation, groups))
FUNCTION_SITES: dict[Any, tuple[int, tuple[int, int, int], tuple[int, int, int, int] | None]] = {
    torch.ops.aten.linear.default: (0, (0, 1, 2), None),
    torch.ops.aten.addmm.default: (0, (1, 2, 0), None),  # GPT-2's Conv1D under export: addmm(b, x, W[in, out])
    torch.ops.aten.conv1d.default: (1, (0, 1, 2), (3, 4, 5, 6)),
    torch.ops.aten.conv2d.default: (2, (0, 1, 2), (3, 4, 5, 6)),
    torch.ops.aten.conv3d.default: (3, (0, 1, 2), (3, 4, 5, 6)),
}


# --- finding the layers -----------------------------------------------------------------------------------
@dataclass
class Site:
    """One layer that may take sparse storage: its module path, weight, bias and graph nodes."""

    layer: str
    weight: Tensor
    bias: Tensor | None
    spatial: int
    nodes: list[Node]
    problem: str | None = None  # why it must stay dense, when it must
    transposed: bool = False  # GPT-2's Conv1D: the weight is [in, out] and the layer computes x @ W + b


def conv_problem(kernel: tuple[int, ...], stride: Any, padding: Any, groups: int) -> str | None:
    ones = tuple(int(s) for s in (stride if isinstance(stride, (tuple, list)) else [stride]))
    pads = (
        padding
        if isinstance(padding, str)
        else tuple(int(p) for p in (padding if isinstance(padding, (tuple, list)) else [padding]))
    )
    if any(k != 1 for k in kernel):
        return f"a {'x'.join(map(str, kernel))} conv (only 1x1 convs are matrix products)"
    if any(s != 1 for s in ones):
        return f"stride {ones} (only stride 1)"
    if not (pads in ("valid", "same") or all(p == 0 for p in pads)):
        return f"padding {pads} (only unpadded 1x1 convs)"
    if groups != 1:
        return f"groups={groups} (only one group)"
    return None


def module_sites(gm: GraphModule) -> dict[str, Site]:
    sites: dict[str, Site] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module: Any = gm.get_submodule(node.target)  # a Linear / Conv (MODULE_SITES)
        spatial = MODULE_SITES.get(type(module))
        transposed = f"{type(module).__module__}.{type(module).__qualname__}" in TRANSPOSED_MODULES
        if spatial is None and not transposed:
            continue
        site = sites.get(node.target)
        if site is None:
            site = sites[node.target] = Site(
                node.target, module.weight, module.bias, spatial or 0, [], transposed=transposed
            )
            if spatial:
                site.problem = conv_problem(module.kernel_size, module.stride, module.padding, module.groups)
            if module._forward_hooks or module._forward_pre_hooks:
                site.problem = "the layer has forward hooks"
        site.nodes.append(node)
    return sites


def function_sites(gm: GraphModule) -> dict[str, Site]:
    """Export captures call ``aten.linear`` / ``aten.convNd`` on ``get_attr`` weights of a holder module."""
    sites: dict[str, Site] = {}
    for node in gm.graph.nodes:
        entry = FUNCTION_SITES.get(node.target) if node.op == "call_function" else None
        if entry is None:
            continue
        spatial, (_, wi, bi), conv = entry
        w = node.args[wi] if len(node.args) > wi else None
        b = node.args[bi] if len(node.args) > bi else node.kwargs.get("bias")
        if not (isinstance(w, Node) and w.op == "get_attr" and str(w.target).endswith(".weight")):
            continue
        layer = str(w.target)[: -len(".weight")]
        if b is not None and not (isinstance(b, Node) and b.op == "get_attr" and b.target == f"{layer}.bias"):
            continue
        transposed = node.target in TRANSPOSED_FUNCTIONS
        if transposed and (
            node.kwargs.get("beta", 1) != 1
            or node.kwargs.get("alpha", 1) != 1
            or w.meta.get("val") is not None
            and w.meta["val"].dim() != 2
        ):
            continue
        site = sites.get(layer)
        if site is None:
            holder: Any = gm.get_submodule(layer)
            site = sites[layer] = Site(
                layer, holder.weight, getattr(holder, "bias", None), spatial, [], transposed=transposed
            )
            others = [n for n, _ in holder.named_children()] + [
                n
                for n, _ in [*holder.named_parameters(recurse=False), *holder.named_buffers(recurse=False)]
                if n not in ("weight", "bias")
            ]
            if others:
                site.problem = f"{layer!r} holds more than the layer's weight and bias ({', '.join(others[:3])})"
        if site.spatial != spatial or site.transposed != transposed:
            site.problem = f"{layer!r} is used both as a linear layer and as a conv (or a Conv1D)"
        if conv is not None:
            si, pi, _, gi = conv
            args = list(node.args) + [None] * 7
            problem = conv_problem(
                tuple(site.weight.shape[2:]),
                args[si] if args[si] is not None else 1,
                args[pi] if args[pi] is not None else 0,
                args[gi] if args[gi] is not None else 1,
            )
            site.problem = site.problem or problem
        site.nodes.append(node)
    return sites


def check_uses(gm: GraphModule, sites: dict[str, Site]) -> None:
    """A weight read anywhere but its layer's calls, or shared with another name, keeps its layer dense."""
    site_nodes = {n for s in sites.values() for n in s.nodes}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        layer, _, attr = node.target.rpartition(".")
        site = sites.get(layer)
        if site is None or attr not in ("weight", "bias"):
            continue
        if any(user not in site_nodes for user in node.users):
            site.problem = site.problem or f"its {attr} is read outside the layer call"
    owners: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for site in sites.values():
        names = owners.get(id(site.weight), [])
        if len(names) > 1:
            site.problem = (
                site.problem or f"its weight is tied to {', '.join(n for n in names if n != site.layer + '.weight')}"
            )
