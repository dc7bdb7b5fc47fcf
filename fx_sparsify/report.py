"""The sparsity report: one row per target, as a ``tabulate`` table."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from tabulate import tabulate
from torch.fx import GraphModule

from .methods._selectors import block_grid
from .passes.channels import shrink_summary
from .passes.layer_index import LayerIndex
from .passes.shrink import channel_keeps
from .passes.sparse_storage import storage_table
from .passes.squash import activation_fold
from .state import SparsityState, TargetRecord, current_options, masks_of, sparsity_of

__all__ = ["report_table", "target_sparsity_of", "fate_of"]

HEADERS = ["target", "kind", "method", "shape", "target sparsity", "achieved", "kept", "at squash"]


def _slices(shape: tuple[int, ...], options: dict[str, Any]) -> int:
    dim = options.get("dim", 0)
    return shape[dim % len(shape)] if isinstance(dim, int) and -len(shape) <= dim < len(shape) else math.prod(shape)


def _blocks(shape: tuple[int, ...], options: dict[str, Any]) -> int:
    block = options.get("block_shape", (1, 4))
    block = grid = block_grid(shape, (block,) if isinstance(block, int) else block)
    return math.prod(-(-s // b) for s, b in zip(shape, grid))


#: methods whose int ``sparsity`` counts slices or blocks, not entries: method -> units of a tensor shape
COUNT_UNITS: dict[str, Callable[[tuple[int, ...], dict[str, Any]], int]] = {
    "ln_structured": _slices,
    "random_structured": _slices,
    "block": _blocks,
}


def target_sparsity_of(
    method: str,
    options: dict[str, Any],
    numel: int,
    shape: tuple[int, ...] | None = None,
    group_numel: int | None = None,
) -> float | None:
    """The sparsity a method aims for, where its options say (None when they do not).

    An int ``sparsity`` is a count: of entries (of the whole group for a global rule, ``group_numel``),
    or of the slices / blocks that ``COUNT_UNITS`` methods prune (given ``shape``).
    """
    if "sparsity" in options and options["sparsity"] is not None:
        s = options["sparsity"]
        if isinstance(s, float):
            return float(s)
        if group_numel is not None:
            return s / max(group_numel, 1)
        if shape and len(shape) >= 2 and method in COUNT_UNITS:
            return s / max(COUNT_UNITS[method](tuple(shape), options), 1)
        return s / max(numel, 1)
    if "density" in options and options["density"] is not None:
        return 1.0 - float(options["density"])
    if "n" in options and "m" in options:
        return 1.0 - options["n"] / options["m"]
    if method == "dense":
        return 0.0
    return None


def fate_of(gm: GraphModule, state: SparsityState, record: TargetRecord, index: LayerIndex | None = None) -> str:
    """What squash will do with this target's mask, judged on the current mask."""
    if record.kind != "activation":
        return "folded"
    return "folded" if activation_fold(gm, state, record, index) is not None else "kept as constant"


def _method_text(record: TargetRecord, options: dict[str, Any]) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in options.items() if k not in ("sparsity", "density"))
    return f"{record.method}({opts})" if opts else record.method


def report_table(gm: GraphModule, state: SparsityState) -> str:
    """Render the table; the header line says which capture was used and how many steps ran."""
    achieved = sparsity_of(gm, state)
    masks = masks_of(gm, state)
    index = LayerIndex(gm, state.aliases)
    rows: list[list[Any]] = []
    # the target of the step that made the current masks (before the first step: of the first step)
    shown = dataclasses.replace(state, steps=max(state.steps - 1, 0))
    groups: dict[int, int] = {}
    for r in state.targets.values():
        if r.group is not None:
            groups[r.group] = groups.get(r.group, 0) + r.numel
    for name, record in state.targets.items():
        options = current_options(shown, record)
        target = target_sparsity_of(
            record.method,
            options,
            record.numel,
            record.shape,
            groups.get(record.group) if record.group is not None else None,
        )
        mask = masks[name]
        kept = sum(int(m.sum()) for m in mask) if isinstance(mask, list) else int(mask.sum())
        rows.append(
            [
                name,
                record.kind,
                _method_text(record, options)
                + (" reconstructed" if name in state.reconstructed else "")
                + (
                    " (no bias: the removed channels' mean is not folded)"
                    if state.channels is not None and name in getattr(state.channels, "unbiased", ())
                    else ""
                ),
                "x".join(map(str, record.shape)) or "scalar",
                "-" if target is None else f"{target:.1%}",
                f"{achieved[name]:.1%}",
                kept,
                fate_of(gm, state, record, index),
            ]
        )
        if name in state.initial_masks:  # SPEC §14: "adopted" / "initial mask"
            rows[-1][2] += f" ({state.initial_masks[name]})"
    total = sum(r.numel for r in state.targets.values() if r.kind != "activation")
    zeros = sum(achieved[n] * r.numel for n, r in state.targets.items() if r.kind != "activation")
    head = (
        f"fx_sparsify report: capture={state.capture}, steps={state.steps}, targets={len(rows)}, "
        f"masked weights {zeros / max(total, 1):.1%} zero overall; target sparsity: "
        + ("the last step's" if state.steps else "the first step's")
    )
    table = head + "\n" + tabulate(rows, headers=HEADERS, tablefmt="github")
    if state.storage:  # the last squash(storage=...) (SPEC §11)
        table += "\n\nstorage at the last squash:\n" + storage_table(state.storage)
    plan = state.channels
    if plan is not None:  # SPEC §10: the shrink outcome
        table += "\n" + shrink_summary(gm, plan, channel_keeps(gm, state))
    return table
