"""The step of ``"method": "sparsegpt"`` targets: masks chosen and the remaining weights updated (SPEC §16).

:func:`update_masks` calls :func:`check_calibrated` before it computes anything (a step without
calibration forwards since the last step is an error naming the targets), then :func:`reconstruct`
per target; it writes the masks and the weights only once every target is computed. The algorithm
itself is :func:`fx_sparsify.methods.sparsegpt.sparsegpt_prune`.

All layers are pruned from the statistics of the same calibration forwards (one pass: a layer's
Hessian comes from the outputs of the layers before it as they were during calibration);
``benchmarks/bench_quality.py`` compares this with pruning layer after layer.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.fx import GraphModule

from ..methods.sparsegpt import sparsegpt_prune
from ..state import SparsityState, TargetRecord

__all__ = ["RECONSTRUCTING", "check_calibrated", "reconstruct"]

RECONSTRUCTING = frozenset({"sparsegpt"})  # methods whose step also rewrites the weights that stay


def check_calibrated(gm: GraphModule, state: SparsityState) -> None:
    """``ValueError`` naming every reconstructing target whose layer saw no forward pass since the last step."""
    missing = [
        r.name for r in state.targets.values()
        if r.method in RECONSTRUCTING and int(gm.get_submodule(r.observer).batches) == 0  # type: ignore[arg-type]
    ]
    if missing:
        raise ValueError(
            f"step(): 'sparsegpt' target(s) {', '.join(map(repr, missing))} saw no calibration forward pass since "
            "the last step; run calibration batches through the sparse module (sgm(batch)) before each step()"
        )


def reconstruct(gm: GraphModule, record: TargetRecord, options: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(keep-mask, updated weight) of one ``sparsegpt`` target from its layer's accumulated ``X·Xᵀ``."""
    observer = gm.get_submodule(record.observer)  # type: ignore[arg-type]
    weight = gm.get_parameter(record.param)  # type: ignore[arg-type]
    keep = None if getattr(record.rule, "regrow", False) else gm.get_buffer(record.buffer) != 0
    options = {k: v for k, v in options.items() if k != "hessian_dtype"}
    # the statistic's scale does not matter (damp is relative to its mean diagonal): no scaled copy
    return sparsegpt_prune(weight, observer.stat, keep=keep, **options)
