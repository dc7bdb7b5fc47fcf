"""Pictures (SPEC §13, the optional extra ``viz``: ``pip install fx-sparsify[viz]``).

    >>> sgm.draw("graph.svg")                        # the rewritten graph, mask nodes coloured  # doctest: +SKIP
    >>> sgm.draw("layer1.svg", module="layer1")      # only what runs inside one submodule       # doctest: +SKIP
    >>> fxs.plot_sparsity(sgm, "sparsity.png")       # one bar per target: achieved vs target    # doctest: +SKIP
    >>> fxs.plot_mask(sgm, "fc1.weight", "fc1.png")  # the mask as an image (N:M, block patterns) # doctest: +SKIP

``draw`` uses graphviz through ``pydot`` (as ``torch.fx.passes.graph_drawer.FxGraphDrawer`` does) and
needs graphviz's ``dot`` program; the plots use matplotlib (no pyplot state: a ``Figure`` per call).
Each imports its library on first use, so ``import fx_sparsify`` never needs them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.fx import GraphModule, Node

from ._meta import info_of
from .report import target_sparsity_of
from .state import current_options, state_of

__all__ = ["draw", "plot_sparsity", "plot_mask", "repeated_blocks", "width_notes", "ROLE_COLOURS", "KIND_COLOURS"]

_INSTALL = "pip install fx-sparsify[viz]"

#: fill colour of each inserted node's role (and of the mask buffers) in ``draw``
ROLE_COLOURS: dict[str, str] = {
    "weight_mask": "#f4a261",  # weight * mask
    "mask_buffer": "#ffd6a5",  # the mask constant itself
    "observer": "#8ecae6",  # activation observer
    "activation_mask": "#90be6d",  # x * mask in front of a layer
    "embedding_lookup": "#f4a261",
    "module_call": "#e9edc9",  # a layer call (labelled with its FQN)
}
#: bar colour of each target kind in ``plot_sparsity``
KIND_COLOURS: dict[str, str] = {
    "weight": "#4c72b0",
    "embedding": "#dd8452",
    "activation": "#55a868",
    "tensor": "#8172b3",
}
_LEGEND = {
    "weight_mask": "weight * mask",
    "mask_buffer": "mask buffer",
    "observer": "observer",
    "activation_mask": "x * mask (activation)",
    "module_call": "layer call (FQN)",
}


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise ImportError(f"fx_sparsify's pictures need {module.split('.')[0]}: {_INSTALL}") from None


# --- the graph -------------------------------------------------------------------------------------
def _fn_name(target: Any) -> str:
    return getattr(target, "__name__", None) or str(target)


def _owner_module(node: Node, buffers: Mapping[str, str]) -> str | None:
    """The FQN of the (sub)module a node belongs to, for ``draw(module=...)``."""
    info = info_of(node)
    if info is not None:
        if info.role in ("observer", "activation_mask", "module_call", "embedding_lookup") and info.module is not None:
            return info.module
        if info.target is not None:
            return info.target.rpartition(".")[0] if ":" not in info.target else info.target.split(":")[0]
    if node.op in ("call_module", "get_attr"):
        target = str(node.target)
        if target in buffers:
            return buffers[target].rpartition(".")[0]
        return target if node.op == "call_module" else target.rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return str(path)
    return None


def _inside(owner: str | None, module: str) -> bool:
    return owner is not None and (owner == module or owner.startswith(module + "."))


def width_notes(widths: Mapping[str, Any] | None) -> dict[str, str]:
    """Module path → ``"out_channels 8→4"`` from a ``widths.json`` record (``run``'s ``resized_modules``); for a
    module the result no longer holds (an export capture), its weight's shape ``8x8x3x3→4x8x3x3``."""
    if not widths:
        return {}
    notes: dict[str, str] = {}
    for path, sizes in widths.get("modules", {}).items():
        before = sizes.get("before", {})
        notes[path] = ", ".join(f"{k} {before[k]}→{sizes[k]}" for k in before if k in sizes)
    for key, shape in widths.get("tensors", {}).items():
        owner, _, leaf = key.rpartition(".")
        if leaf == "weight" and owner not in notes:
            old = widths.get("before", {}).get(key) or []
            notes[owner] = f"weight {'x'.join(map(str, old))}→{'x'.join(map(str, shape))}"
    return {k: v for k, v in notes.items() if v}


def _label_and_role(
    gm: GraphModule, node: Node, buffers: Mapping[str, str], notes: Mapping[str, str] | None = None
) -> tuple[str, str | None]:
    label, role = _plain_label_and_role(gm, node, buffers)
    if notes:
        info = info_of(node)
        layer = (
            info.module
            if info is not None and info.role in ("module_call", "embedding_lookup")
            else (str(node.target) if node.op == "call_module" else None)
        )
        stack = node.meta.get("nn_module_stack")
        if layer is None and stack and node.op == "call_function":
            layer = str(list(stack.values())[-1][0])
        if layer is not None and layer in notes:
            label += f"\\n{notes[layer]}"
    return label, role


def _plain_label_and_role(gm: GraphModule, node: Node, buffers: Mapping[str, str]) -> tuple[str, str | None]:
    info = info_of(node)
    if info is not None and info.role in ("module_call", "embedding_lookup"):
        layer = info.module or ""
        kind = type(gm.get_submodule(layer)).__name__ if layer else type(gm).__name__
        return f"{layer} ({kind})\\n{_fn_name(node.target)}", info.role
    if info is not None:
        return f"{node.name}\\n{info.role.replace('_', ' ')}: {info.target}", info.role
    if node.op == "get_attr":
        role = "mask_buffer" if str(node.target) in buffers else None
        return str(node.target), role
    if node.op == "call_module":
        sub = gm.get_submodule(str(node.target))
        return f"{node.target} ({type(sub).__name__})", "module_call"
    if node.op == "call_function" or node.op == "call_method":
        label = f"{node.name}\\n{_fn_name(node.target)}"
        stack = node.meta.get("nn_module_stack")
        if stack:  # the layer it runs in (an export capture has no call_module nodes)
            path, cls = list(stack.values())[-1]
            label += f"\\n@ {path} ({getattr(cls, '__name__', str(cls).rpartition('.')[2])})"
        return label, None
    return node.name, None


def _block_of(owner: str | None) -> str | None:
    """The repeated block a node runs in: the shortest prefix of its module path ending in an index
    (``layer1.0`` of ``layer1.0.conv1``, ``model.layers.3`` of ``model.layers.3.mlp.up_proj``)."""
    if not owner:
        return None
    parts = owner.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def _signature(node: Node, block: str, buffers: Mapping[str, str]) -> tuple[Any, ...]:
    """What a node does, with its block's own path taken out (so ``layer1.1`` and ``layer1.0`` compare equal)."""
    info = info_of(node)
    strip = lambda text: str(text).replace(block + ".", "").replace(block.replace(".", "_") + "_", "")  # noqa: E731
    if info is not None:
        return ("fxs", info.role, strip(info.target or ""), strip(info.module or ""))
    if node.op == "get_attr":
        return ("get_attr", "mask" if str(node.target) in buffers else strip(node.target))
    target = strip(node.target) if node.op in ("call_module",) else _fn_name(node.target)
    return (node.op, target, len(node.all_input_nodes))


def repeated_blocks(gm: GraphModule, nodes: list[Node], buffers: Mapping[str, str]) -> dict[str, str]:
    """Block path → the earlier block it repeats node for node (same ops, roles and layer names within)."""
    members: dict[str, list[Node]] = {}
    for node in nodes:
        block = _block_of(_owner_module(node, buffers))
        if block is not None and node.op not in ("placeholder", "output"):
            members.setdefault(block, []).append(node)
    first: dict[tuple[Any, ...], str] = {}
    repeats: dict[str, str] = {}
    for block, group in members.items():
        signature = tuple(_signature(n, block, buffers) for n in group)
        if len(group) < 3:  # a block of one or two nodes is as small drawn as collapsed
            continue
        if signature in first:
            repeats[block] = first[signature]
        else:
            first[signature] = block
    return repeats


def draw(
    sgm: GraphModule,
    path: str | os.PathLike[str],
    module: str | None = None,
    widths: Mapping[str, Any] | None = None,
    collapse: bool = True,
) -> Path:
    """Write a picture of ``sgm``'s graph to ``path`` (``.svg``, ``.png``, ``.pdf`` or ``.dot``).

    Mask, observer and mask-multiply nodes are coloured (:data:`ROLE_COLOURS`); layer calls are
    labelled with their FQN and class. ``module="layer1"`` draws only the nodes that run inside that
    submodule (inputs from outside appear as dashed nodes), which keeps large models readable.
    Works on a SparseGraphModule and on any ``torch.fx.GraphModule`` (e.g. a squashed one).

    Drawing the whole graph, a block that repeats an earlier one node for node (ResNet's ``layer1.1``
    after ``layer1.0``, a transformer's layers 1..N after layer 0) is one grey node "same as ...";
    ``collapse=False`` draws every node. ``widths`` (``widths.json`` of ``fx-sparsify run --shrink``) adds
    each resized layer's new size to its label (``out_channels 64→32``).
    """
    pydot = _need("pydot")
    path = Path(os.fspath(path))
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("svg", "png", "pdf", "dot"):
        raise ValueError(f"draw(): cannot write {path.name!r}; use a .svg, .png, .pdf or .dot file name")
    if not isinstance(sgm, GraphModule):
        raise TypeError(f"draw() takes a SparseGraphModule or torch.fx.GraphModule, got {type(sgm).__name__}")
    state = sgm.__dict__.get("_fxs")
    buffers = {r.buffer: r.name for r in state.targets.values()} if state is not None else {}
    nodes = list(sgm.graph.nodes)
    if module is not None:
        known = [n for n, _ in sgm.named_modules() if n]
        owners = {n: _owner_module(n, buffers) for n in nodes}
        chosen = [n for n in nodes if _inside(owners[n], module)]
        if not chosen:
            import difflib

            close = difflib.get_close_matches(module, known, n=5, cutoff=0.3)
            raise ValueError(
                f"draw(module={module!r}): no node of the graph runs inside {module!r}; "
                f"closest submodules: {', '.join(close) or '(none)'}"
            )
    else:
        chosen = nodes
    keep = set(chosen)
    title = f"{type(sgm).__name__}" + (f" — {module}" if module else "")
    dot = pydot.Dot(graph_type="digraph", rankdir="TB", label=title, labelloc="t", fontname="Helvetica")
    dot.set_node_defaults(shape="box", style="rounded,filled", fillcolor="white", fontname="Helvetica", fontsize="10")
    outside: set[str] = set()
    notes = width_notes(widths)
    repeats = repeated_blocks(sgm, chosen, buffers) if collapse and module is None else {}
    shown: dict[Node, str] = {}  # node → the id drawn for it (a collapsed block's one node)
    for node in chosen:
        block = _block_of(_owner_module(node, buffers)) if repeats else None
        shown[node] = f"repeat_{block.replace('.', '_')}" if block in repeats else node.name  # type: ignore[union-attr]
    edges: set[tuple[str, str]] = set()
    drawn: set[str] = set()
    for node in chosen:
        name = shown[node]
        if name not in drawn:
            drawn.add(name)
            if name != node.name:
                block = _block_of(_owner_module(node, buffers))
                size = sum(1 for n in chosen if shown[n] == name)
                dot.add_node(
                    pydot.Node(
                        name,
                        label=f'"{block}\\nsame as {repeats[block]} ({size} nodes)"',  # type: ignore[index]
                        fillcolor="#dddddd",
                        style="rounded,filled,dashed",
                    )
                )
            else:
                label, role = _label_and_role(sgm, node, buffers, notes)
                colour = ROLE_COLOURS.get(role or "", "white")
                if node.op in ("placeholder", "output"):
                    colour = "#eeeeee"
                dot.add_node(pydot.Node(name, label=f'"{label}"', fillcolor=colour, tooltip=f'"{node.format_node()}"'))
        for arg in node.all_input_nodes:
            if arg not in keep and arg.name not in outside:
                outside.add(arg.name)
                dot.add_node(pydot.Node(arg.name, label=f'"{arg.name}"', style="dashed", fillcolor="white"))
            source = shown.get(arg, arg.name)
            if source != name and (source, name) not in edges:
                edges.add((source, name))
                dot.add_edge(pydot.Edge(source, name))
    legend = pydot.Cluster("legend", label="legend", fontsize="10", style="dashed")
    for role, text in _LEGEND.items():
        legend.add_node(pydot.Node(f"legend_{role}", label=f'"{text}"', fillcolor=ROLE_COLOURS[role]))
    dot.add_subgraph(legend)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "dot":
        path.write_text(dot.to_string())
        return path
    try:
        data = dot.create(format=fmt)
    except (OSError, FileNotFoundError) as err:
        raise ImportError(
            f"draw() needs graphviz's 'dot' program to render {fmt.upper()} ({err}); install graphviz "
            "(apt-get install graphviz / brew install graphviz / conda install graphviz), or write a .dot file"
        ) from None
    path.write_bytes(data)
    return path


# --- plots -----------------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Any:
    figure_mod = _need("matplotlib.figure")
    _need("matplotlib.backends.backend_agg")
    return figure_mod.Figure(figsize=(width, height), dpi=100, layout="constrained")


def _sparsity_rows(obj: nn.Module) -> list[tuple[str, str, float, float | None]]:
    """(name, kind, achieved, target) per target of a SparseGraphModule, or per floating tensor of a module."""
    state = obj.__dict__.get("_fxs")
    if state is not None:
        achieved = obj.sparsity()  # type: ignore[operator]
        rows = []
        for name, r in state.targets.items():
            target = (
                target_sparsity_of(r.method, current_options(state, r), r.numel)
                if r.kind != "activation"
                else target_sparsity_of(r.method, dict(r.rule.options), max(r.numel, 1))
            )
            rows.append((name, r.kind, achieved[name], target))
        return rows
    rows = []
    for name, t in obj.state_dict().items():
        if t.is_floating_point() and t.dim() >= 1:
            rows.append((name, "tensor", float((t == 0).sum()) / max(t.numel(), 1), None))
    return rows


def plot_sparsity(
    sgm_or_module: nn.Module, path: str | os.PathLike[str], widths: Mapping[str, Any] | None = None
) -> Path:
    """One horizontal bar per target: achieved sparsity (coloured by kind) and the target (a black tick).

    A SparseGraphModule plots its targets; any other module (a squashed one, your eager model) plots the
    fraction of zeros of each floating-point tensor in its ``state_dict``. ``widths`` (``widths.json`` of
    ``fx-sparsify run --shrink``) adds each resized layer's new size to its label.
    """
    if not isinstance(sgm_or_module, nn.Module):
        raise TypeError(
            f"plot_sparsity() takes a SparseGraphModule or an nn.Module, got {type(sgm_or_module).__name__}"
        )
    notes = width_notes(widths)
    rows: list[tuple[Any, ...]] = [
        (f"{name} [{notes[owner]}]" if (owner := name.rpartition(".")[0]) in notes else name, *rest)
        for name, *rest in _sparsity_rows(sgm_or_module)
    ]
    if not rows:
        raise ValueError("plot_sparsity(): nothing to plot (no targets and no floating-point tensors)")
    path = Path(os.fspath(path))
    fig = _figure(8.0, 1.2 + 0.28 * len(rows))
    ax = fig.add_subplot()
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, [r[2] for r in rows], color=[KIND_COLOURS.get(r[1], "grey") for r in rows], height=0.7)
    targets = [(y, r[3]) for y, r in zip(ys, rows) if r[3] is not None]
    if targets:
        ax.scatter(
            [t for _, t in targets], [y for y, _ in targets], marker="|", s=300, color="black", zorder=3, label="target"
        )
    for y, r in zip(ys, rows):
        ax.text(min(r[2], 1.0) + 0.01, y, f"{r[2]:.0%}", va="center", fontsize=8)
    ax.set_yticks(ys, [r[0] for r in rows], fontsize=8)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("sparsity (fraction of zeros)")
    ax.set_title(f"sparsity per target — {type(sgm_or_module).__name__}")
    handles = [_patch(KIND_COLOURS[k], k) for k in dict.fromkeys(r[1] for r in rows) if k in KIND_COLOURS]
    if targets:
        handles.append(ax.collections[-1])
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _patch(colour: str, label: str) -> Any:
    patches = _need("matplotlib.patches")
    return patches.Patch(color=colour, label=label)


#: plot_mask draws at most this many rows / columns cell by cell; larger masks get an overview + a crop
CROP = 64


def _as_matrix(mask: torch.Tensor) -> torch.Tensor:
    """2-D view of a mask: rows = first dim, columns = everything else (so N:M along the last dim shows)."""
    mask = mask.detach().to("cpu", torch.float32)
    if mask.dim() == 0:
        return mask.reshape(1, 1)
    if mask.dim() == 1:
        return mask.reshape(1, -1)
    return mask.reshape(mask.shape[0], -1)


def plot_mask(sgm: Any, target: str, path: str | os.PathLike[str]) -> Path:
    """The keep-mask of ``target`` as an image: kept entries dark, pruned light.

    A conv weight ``(out, in, kh, kw)`` is shown as ``out`` rows of ``in·kh·kw`` columns. A mask larger
    than :data:`CROP` along either side gets two panels: the density over the whole tensor (average of
    blocks) and its top-left ``CROP`` × ``CROP`` corner cell by cell, where N:M and block patterns show.
    ``sgm`` is a SparseGraphModule or a dict of target name → mask.
    """
    if isinstance(sgm, Mapping):
        masks = dict(sgm)
    else:
        state_of(sgm)  # a TypeError for anything else
        masks = sgm.masks()
    if target not in masks:
        import difflib

        close = difflib.get_close_matches(target, list(masks), n=5, cutoff=0.3)
        raise KeyError(f"plot_mask(): no target {target!r}; targets: {', '.join(close or list(masks)[:8])}")
    mask = masks[target]
    if isinstance(mask, list):  # per-feature activation masks: one row each
        mask = torch.stack([m.reshape(-1) for m in mask])
    matrix = _as_matrix(mask)
    colors = _need("matplotlib.colors")
    cmap = colors.ListedColormap(["#f1f1f1", "#1d3557"])  # pruned, kept
    rows, cols = matrix.shape
    path = Path(os.fspath(path))
    density = float(matrix.mean())
    title = f"{target}: {tuple(mask.shape)}, {1 - density:.1%} pruned"
    if rows <= CROP and cols <= CROP:
        fig = _figure(min(2.0 + cols * 0.12, 12.0), min(1.5 + rows * 0.12, 12.0))
        ax = fig.add_subplot()
        ax.imshow(matrix.numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        ax.set_title(title, fontsize=9)
    else:
        fig = _figure(12.0, 6.0)
        overview, crop = fig.subplots(1, 2)
        pooled = torch.nn.functional.adaptive_avg_pool2d(matrix[None, None], (min(rows, 256), min(cols, 256)))[0, 0]
        shown = overview.imshow(pooled.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        overview.set_title(f"kept fraction over the whole {rows}×{cols}", fontsize=9)
        fig.colorbar(shown, ax=overview, fraction=0.046)
        corner = matrix[:CROP, :CROP]
        crop.imshow(corner.numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        crop.set_title(f"top-left {corner.shape[0]}×{corner.shape[1]}, cell by cell", fontsize=9)
        fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
