"""The step of ``"method": "sparsegpt"`` targets: masks chosen and the remaining weights updated (SPEC §16).

:func:`update_masks` calls :func:`check_calibrated` before it computes anything (a step without
calibration forwards since the last step is an error naming the targets), then :func:`reconstruct`
per target; it writes the masks and the weights only once every target is computed. The algorithm
itself is :func:`fx_sparsify.methods.sparsegpt.sparsegpt_prune`.

By default every layer is pruned from the statistics of the same calibration forwards (one pass: a
layer's Hessian comes from the outputs of the layers before it as they were during calibration).
Rules with ``"sequential": true`` are pruned as the reference scripts do, level after level
(:func:`reconstruct_in_order`): the first level (layers no other sequential target feeds) from the
calibration statistics, then, for each next level, the recorded calibration inputs are run again
through the module with the levels before already pruned, and only that level's observers listen.
This costs one more calibration pass per level (a 4-block transformer has 16 levels). During the
user's calibration forwards only the first level's observers listen (the others would be restarted
anyway), so one level's ``in × in`` statistics exist at a time.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterable, Iterator, MutableMapping, Sequence

import torch
from torch import Tensor
from torch.fx import GraphModule

from .. import distributed
from ..hessian import HessianObserver
from ..methods.sparsegpt import sparsegpt_prune
from ..observer import ActivationObserver
from ..state import SparsityState, TargetRecord, current_options, state_of
from .layer_index import LayerIndex, ancestors

__all__ = [
    "replay_calibration",
    "RECONSTRUCTING",
    "check_calibrated",
    "reconstruct",
    "is_sequential",
    "reconstruct_in_order",
    "record_calibration_inputs",
    "solve_all",
    "without_rollback",
    "inputs_kept_by",
]

RECONSTRUCTING = frozenset({"sparsegpt"})  # methods whose step also rewrites the weights that stay
_NOT_SWEEP_OPTIONS = ("hessian_dtype", "sequential")
_ROLLBACK: ContextVar[bool] = ContextVar("fx_sparsify_sequential_rollback", default=True)
Inputs = Sequence[tuple[tuple[Any, ...], dict[str, Any]]]
_KEPT_BY: ContextVar[Inputs | None] = ContextVar("fx_sparsify_calibration_inputs", default=None)


@contextmanager
def inputs_kept_by(source: Inputs) -> Iterator[None]:
    """Within it, calibration forwards keep no copy of their inputs: a sequential step replays ``source``.

    ``source``: the ``(args, kwargs)`` of exactly the calibration forwards run inside the context, which
    the caller keeps (and may read from disk at each replay) until the step. For ``prune_streamed``,
    whose block inputs are held already: the recorded copies doubled them, and held in memory the
    batches it had spilled to disk.
    """
    token = _KEPT_BY.set(source)
    try:
        yield
    finally:
        _KEPT_BY.reset(token)


@contextmanager
def without_rollback() -> Iterator[None]:
    """Within it, a sequential step keeps no copy of the weights and masks to put back if it fails.

    For a caller that throws the module away when ``step()`` raises (``prune_streamed``): the copies are
    one more set of the targets' weights and masks, held through the whole step.
    """
    token = _ROLLBACK.set(False)
    try:
        yield
    finally:
        _ROLLBACK.reset(token)


def check_calibrated(gm: GraphModule, state: SparsityState) -> None:
    """``ValueError`` naming every reconstructing target whose layer saw no forward pass since the last step."""
    if state.calibration.deferred is None and any(is_sequential(r) for r in state.targets.values()):
        _defer_later_levels(gm, state)  # no recorded calibration forward yet (e.g. statistics loaded)
    deferred = state.calibration.deferred or set()
    missing = [
        r.name
        for r in state.targets.values()
        if r.method in RECONSTRUCTING and r.observer not in deferred and int(gm.get_submodule(r.observer).batches) == 0  # type: ignore[arg-type]
    ]
    if missing:
        raise ValueError(
            f"step(): 'sparsegpt' target(s) {', '.join(map(repr, missing))} saw no calibration forward pass since "
            "the last step; run calibration batches through the sparse module (sgm(batch)) before each step()"
        )


def is_sequential(record: TargetRecord) -> bool:
    """A ``sparsegpt`` target of a rule with ``"sequential": true``."""
    return record.method in RECONSTRUCTING and bool(record.rule.options.get("sequential", False))


def reconstruct(gm: GraphModule, record: TargetRecord, options: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(keep-mask, updated weight) of one ``sparsegpt`` target from its layer's accumulated ``X·Xᵀ``."""
    observer: Any = gm.get_submodule(record.observer)  # type: ignore[arg-type]
    weight = gm.get_parameter(record.param)  # type: ignore[arg-type]
    keep = None if getattr(record.rule, "regrow", False) else gm.get_buffer(record.buffer) != 0
    options = {k: v for k, v in options.items() if k not in _NOT_SWEEP_OPTIONS}
    # the statistic's scale does not matter (damp is relative to its mean diagonal): no scaled copy; hessian()
    # rounds the float64 sum over the batches (and ranks) once to the rule's hessian_dtype
    return sparsegpt_prune(weight, observer.hessian(), keep=keep, **options)


def _levels(gm: GraphModule, state: SparsityState, records: list[TargetRecord]) -> list[list[TargetRecord]]:
    """``records`` in levels: a target's level is one more than that of any sequential target feeding its input."""
    index = LayerIndex(gm, state.aliases)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    observer_nodes = {
        r.name: [n for n in gm.graph.nodes if n.op == "call_module" and n.target == r.observer] for r in records
    }
    calls = {r.name: set(index(r.param.rpartition(".")[0])) for r in records}  # type: ignore[union-attr]
    level: dict[str, int] = {}
    for r in sorted(records, key=lambda r: min(order[n] for n in observer_nodes[r.name])):
        upstream = set().union(*(ancestors(n) for n in observer_nodes[r.name]))
        feeding = [level[s.name] for s in records if s.name in level and calls[s.name] & upstream]
        level[r.name] = 1 + max(feeding) if feeding else 0
    out: list[list[TargetRecord]] = [[] for _ in range(1 + max(level.values(), default=-1))]
    for r in records:
        out[level[r.name]].append(r)
    return out


def _replay(gm: GraphModule, state: SparsityState, observers: Iterable[str]) -> None:
    """Run the recorded calibration inputs again with only ``observers`` listening (restarted first)."""
    inputs = state.calibration.inputs or []
    if not inputs and not distributed.active():  # under a process group another rank may hold the batches
        raise ValueError(
            "step(): 'sequential' sparsegpt targets need the calibration forwards' inputs, and none were recorded "
            "since the last step; run the calibration batches through the sparse module before step()"
        )
    all_observers = [m for m in gm.modules() if isinstance(m, ActivationObserver)]
    enabled = [m.enabled for m in all_observers]
    skip = {id(m.get_buffer("stat")) for m in all_observers} | {
        id(gm.get_buffer(r.buffer)) for r in state.targets.values()
    }
    buffers = {name: b.clone() for name, b in gm.named_buffers() if id(b) not in skip}  # BatchNorm statistics, ...
    for m in all_observers:
        m.enabled = False
    for name in observers:
        observer: Any = gm.get_submodule(name)
        observer.reset()
        observer.enabled = True
    state.calibration.replaying = True
    try:
        with torch.no_grad():
            for args, kwargs in inputs:
                gm(*args, **kwargs)
    finally:
        state.calibration.replaying = False
        for m, on in zip(all_observers, enabled):
            m.enabled = on
        current = dict(gm.named_buffers())
        for name, value in buffers.items():
            if name in current and current[name].shape == value.shape:
                current[name].copy_(value)
    # the level's sums over ranks
    distributed.sync_observers(gm.get_submodule(name) for name in sorted(observers))  # type: ignore[misc]


def replay_calibration(gm: GraphModule, state: SparsityState, observers: Iterable[str]) -> None:
    """Run the recorded calibration inputs again with only ``observers`` listening (restarted first); for
    other sequential pruners (``channels`` rules with ``"sequential": true``)."""
    _replay(gm, state, observers)


def reconstruct_in_order(
    gm: GraphModule,
    state: SparsityState,
    records: list[TargetRecord],
    new_masks: MutableMapping[str, Any],
    new_weights: dict[str, Tensor],
    on_solved: Callable[[str], None] | None = None,
) -> None:
    """Prune ``records`` (sequential targets) level after level, writing each level before the next is calibrated.
    ``on_solved(name)`` is called after each target's solve (the step's progress display).

    Fills ``new_masks`` / ``new_weights`` with the module's own mask buffers and weights (written already,
    so no second copy is held). The masks and weights are written as it goes (later levels must see them);
    if anything raises, every one of them is put back as it was (unless in :func:`without_rollback`).
    """
    saved = {}
    if _ROLLBACK.get():
        saved = {
            r.name: (gm.get_parameter(r.param).detach().clone(), gm.get_buffer(r.buffer).clone())  # type: ignore[arg-type]
            for r in records
        }
    try:
        for depth, level in enumerate(_levels(gm, state, records)):
            if depth:
                _replay(gm, state, {r.observer for r in level})  # type: ignore[misc]
            solved = solve_all(gm, state, level)  # each rank solves its share of the level, receives the rest
            for r in level:
                keep, weight = solved.pop(r.name)
                param = gm.get_parameter(r.param)  # type: ignore[arg-type]
                param.copy_(weight)
                mask = gm.get_buffer(r.buffer)
                mask.copy_(keep.to(device=mask.device, dtype=mask.dtype))
                del keep, weight  # the solve's copies go before the next level's replay
                new_masks[r.name], new_weights[r.name] = mask, param  # the step's write is a no-op copy onto itself
                if on_solved is not None:
                    on_solved(r.name)
    except BaseException:
        for name, (weight, mask) in saved.items():
            r = state.targets[name]
            gm.get_parameter(r.param).copy_(weight)  # type: ignore[arg-type]
            gm.get_buffer(r.buffer).copy_(mask)
        raise
    state.calibration.inputs = None


def solve_all(gm: GraphModule, state: SparsityState, records: list[TargetRecord]) -> dict[str, tuple[Tensor, Tensor]]:
    """Target name → (keep-mask, updated weight) of every record, from its layer's ``X·Xᵀ``. Under a process
    group each rank solves its share, balanced by cost, and receives the others' results
    (:func:`fx_sparsify.distributed.solve_split`)."""
    by_name = {r.name: r for r in records}
    solved = distributed.solve_split(
        list(by_name),
        [_solve_cost(gm, r) for r in records],
        lambda name: _solve(gm, state, by_name[name]),
        lambda name: _solve_template(gm, by_name[name]),
    )
    return {name: (keep, weight) for name, (keep, weight) in solved.items()}


def _solve(gm: GraphModule, state: SparsityState, record: TargetRecord) -> tuple[Tensor, Tensor]:
    try:
        return reconstruct(gm, record, current_options(state, record))
    except (ValueError, TypeError) as err:
        raise type(err)(f"step(): target {record.name!r}: {err}") from err


def _solve_cost(gm: GraphModule, record: TargetRecord) -> float:
    """What one SparseGPT solve costs, roughly: the inverse of the ``in × in`` Hessian and the ``out × in²`` sweep."""
    out, inputs = gm.get_parameter(record.param).reshape(record.shape[0], -1).shape  # type: ignore[arg-type]
    return float(inputs * inputs * (inputs + out))


def _solve_template(gm: GraphModule, record: TargetRecord) -> tuple[Tensor, Tensor]:
    """Empty tensors shaped like a solve's (keep-mask, weight): where a rank receives another rank's result."""
    weight = gm.get_parameter(record.param)  # type: ignore[arg-type]
    return torch.empty(weight.shape, dtype=torch.bool, device=weight.device), torch.empty_like(weight)


def _defer_later_levels(gm: GraphModule, state: SparsityState) -> None:
    """Switch off the observers that only sequential targets past the first level read (step() re-runs them)."""
    records = [r for r in state.targets.values() if is_sequential(r)]
    first = {r.observer for r in _levels(gm, state, records)[0]} if records else set()
    others = {r.observer for r in state.targets.values() if r.observer is not None and not is_sequential(r)}
    deferred = {r.observer for r in records} - first - others
    for name in deferred:
        gm.get_submodule(name).enabled = False  # type: ignore[arg-type, assignment]
    state.calibration.deferred = deferred  # type: ignore[assignment]  # names: is_sequential targets have observers


def _record(module: GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Forward pre-hook: keep the inputs of a calibration forward (one where a Hessian observer listens)."""
    state = state_of(module)
    if state.calibration.replaying or not any(m.enabled for m in module.modules() if isinstance(m, HessianObserver)):
        return
    if state.calibration.deferred is None:  # the first calibration forward
        _defer_later_levels(module, state)
    kept = _KEPT_BY.get()
    if kept is not None:  # the caller keeps the inputs: replayed from there
        state.calibration.inputs = kept  # type: ignore[assignment]
        return
    detach = lambda v: v.detach().clone() if isinstance(v, Tensor) else v  # noqa: E731
    if state.calibration.inputs is None:
        state.calibration.inputs = []
    state.calibration.inputs.append((tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()}))


def record_calibration_inputs(gm: GraphModule) -> None:
    """Keep every calibration forward's inputs in the module's state until the next ``step()``."""
    gm.register_forward_pre_hook(_record, with_kwargs=True)
