"""Stage: recompute every mask from the current values (``gm.step()``).

A weight target ranks its currently masked values (``weight * mask``; a method that ranks raw values,
such as ``topk``, sees pruned entries as ``-inf``), so a pruned entry stays pruned and a repeated step
at the same sparsity changes nothing; ``"regrow": true`` ranks the raw values.
``"scores"`` ranks another tensor (a tensor FQN) or ``scores(weight)`` (a callable) instead. Global
rules rank all their targets' scores together, as ``torch.nn.utils.prune.global_unstructured``.
Random methods draw from a generator seeded by the spec's seed and the target name.

A step is all or nothing: every method's options are checked against its target's shape first, then
every new mask is computed, and only then are masks written and observers restarted, so a step that
raises leaves masks, statistics and the step count as they were.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.fx import GraphModule

from .. import distributed
from .._caller import user_stacklevel
from .._masks import (
    PACK_MIN,
    PendingMask,
    is_masked,
    keep_of,
    masked_copy,
    pending,
    release_freed_memory,
    zero_pruned_,
)
from .._modules import find_tensor
from .._progress import Progress, progress
from .._threads import serial_when_small
from ..methods import PACKED_METHODS, generator_for, get_mask_method, global_masks, keep_mask, refuse_nan
from ..methods.wanda import PER_ROW, per_row_mask
from ..state import SparsityState, TargetRecord, current_options
from .channels import CHANNELS
from .channels.importance import step_channels
from .reconstruct import (
    RECONSTRUCTING,
    check_calibrated,
    is_sequential,
    reconstruct_in_order,
    replay_calibration,
    solve_all,
)

__all__ = [
    "update_masks",
    "weight_scores",
    "check_options",
    "check_targets",
    "apply_masks_inplace",
    "StepStrategy",
    "StepWork",
    "STEP_STRATEGIES",
    "register_step_strategy",
    "strategy_of",
]


def weight_scores(gm: GraphModule, record: TargetRecord) -> Tensor:
    """What ``record``'s method ranks: the (importance) scores, times the mask unless regrowing."""
    weight = gm.get_parameter(record.param).detach()  # type: ignore[arg-type]
    rule = record.rule
    scores_spec: Any = getattr(rule, "scores", None)
    if scores_spec is None:
        scores = weight
    elif scores_spec == "wanda":
        observer: Any = gm.get_submodule(record.observer)  # type: ignore[arg-type]
        (sq_sums,) = observer.reduced()
        scores = weight.abs() * sq_sums.sqrt().to(weight.dtype).unsqueeze(0)
    elif callable(scores_spec):  # a copy: a callable that edits its input in place must not touch the weight
        made = scores_spec(weight.clone())
        if made is None or isinstance(made, (str, bytes, dict)):
            name = getattr(scores_spec, "__name__", type(scores_spec).__name__)
            got = "None" if made is None else type(made).__name__
            raise TypeError(
                f"target {record.name!r}: the scores callable {name!r} returned {got}; it must return a "
                f"tensor of the weight's shape {tuple(weight.shape)} (higher scores are kept)"
            )
        scores = torch.as_tensor(made).detach()
    else:
        found = find_tensor(gm, scores_spec)
        assert found is not None, f"scores {scores_spec!r} were checked at prepare time"
        scores = found.detach()
    if scores.shape != weight.shape:
        raise ValueError(
            f"scores for target {record.name!r} have shape {tuple(scores.shape)}, the weight has "
            f"{tuple(weight.shape)}; importance scores must have the weight's shape"
        )
    if getattr(rule, "regrow", False):
        return scores
    mask = keep_of(gm.get_buffer(record.buffer))
    fill = get_mask_method(record.method).pruned_score
    if fill == 0:
        if is_masked(scores, mask):  # already zero where pruned ("mode": "inplace"): rank it as it is, no copy
            return scores
        return masked_copy(scores, mask)  # no float copy of the mask; temporaries a chunk at a time
    return scores.masked_fill(mask.logical_not(), fill)


def check_options(entries: Iterable[tuple[str, str, tuple[int, ...], dict[str, Any], int | None]]) -> None:
    """Check each method's options against its target's shape; no tensor is touched.

    ``entries`` are ``(target name, method, shape, options, global group or None)``; a global group is
    checked as the one flattened tensor it is ranked as. Raises the method's ``ValueError`` /
    ``TypeError`` prefixed with the target (or the global group).
    """
    groups: dict[int, list[tuple[str, str, tuple[int, ...], dict[str, Any]]]] = {}
    for name, method, shape, options, group in entries:
        if group is None:
            get_mask_method(method).check_shape(shape, options, f"target {name!r}")
        else:
            groups.setdefault(group, []).append((name, method, shape, options))
    for members in groups.values():
        _, method, _, options = members[0]
        total = (sum(math.prod(shape) for _, _, shape, _ in members),)
        get_mask_method(method).check_shape(
            total, options, f"global rule over {', '.join(name for name, *_ in members)}"
        )


def check_targets(state: SparsityState) -> None:
    """:func:`check_options` for every weight target of ``state`` at the current step's options."""
    check_options(
        (r.name, r.method, r.shape, current_options(state, r), r.group)
        for r in state.targets.values()
        if r.kind != "activation" and r.method != CHANNELS
    )


def _check_materialised(gm: GraphModule, state: SparsityState) -> None:
    """Refuse a step over weights on the meta device (a model built without memory has no values to rank)."""
    meta = [r.name for r in state.targets.values() if r.param is not None and gm.get_parameter(r.param).is_meta]
    if meta:
        raise ValueError(
            f"step(): the weights of {', '.join(map(repr, meta[:4]))}{' ...' if len(meta) > 4 else ''} are on the "
            "meta device (no values to rank); load the weights into the model before sparsify_graph "
            "(model.to_empty(device='cpu'), then model.load_state_dict(...)), or prune a checkpoint too large to "
            "load with fx_sparsify.prune_streamed"
        )


def _activation_mask(gm: GraphModule, record: TargetRecord, seed: int) -> Tensor | None:
    """``mask_fn(reduce_fn(aggregated), **options)`` per layer or per selected feature (stacked)."""
    observer: Any = gm.get_submodule(record.observer)  # type: ignore[arg-type]
    if int(observer.batches) == 0:
        warnings.warn(
            f"step(): activation target {record.name!r} saw no forward pass since the last step; its mask is "
            "unchanged. Run calibration batches through the module before step().",
            stacklevel=user_stacklevel(),
        )
        return None
    rule: Any = record.rule  # an ActivationRule
    masks = []
    for stat in observer.reduced():
        refuse_nan(stat, "the input statistics (was a calibration batch NaN?)")
        if callable(rule.mask):
            made = rule.mask(stat, **rule.options)
            made = torch.as_tensor(made) if isinstance(made, (list, tuple)) else made
            mask = keep_mask(made, tuple(stat.shape), f"mask function {getattr(rule.mask, '__name__', rule.mask)!r}")
        else:
            gen = generator_for(seed, record.name, stat.device)
            mask = get_mask_method(rule.mask)(stat, generator=gen, **rule.options)
        masks.append(mask.to(stat.dtype if stat.dtype.is_floating_point else torch.float32))
    return torch.stack(masks) if rule.features is not None else masks[0]


@contextlib.contextmanager
def _for_target(where: str) -> Iterator[None]:
    """Prefix a ``ValueError`` / ``TypeError`` raised while computing a mask with ``where`` (the target)."""
    try:
        yield
    except (ValueError, TypeError) as err:
        if where in str(err):
            raise
        try:
            new = type(err)(f"step(): {where}: {err}")
        except Exception:
            new = ValueError(f"step(): {where}: {err}")
        raise new from err


def _rng_states(gm: GraphModule) -> list[tuple[torch.Generator | None, torch.Tensor]]:
    """The state of every generator a step may draw from (Sparsify modules' own and torch's default)."""
    gens = [m.generator for m in gm.modules() if getattr(m, "generator", None) is not None]
    states = [(g, g.get_state()) for g in gens if isinstance(g, torch.Generator)]
    return states + [(None, torch.random.get_rng_state())]


def _restore_rng(states: list[tuple[torch.Generator | None, torch.Tensor]]) -> None:
    for gen, value in states:
        if gen is None:
            torch.random.set_rng_state(value)
        else:
            gen.set_state(value)


def sync_observers(gm: GraphModule) -> None:
    """Under ``torch.distributed``, all-reduce every observer's statistic so each rank computes equal masks.

    Sum-like aggregates (and callables) are summed across ranks, ``max`` / ``abs_max`` take the maximum.
    """
    from ..observer import ActivationObserver

    # every rank's module has the same observers in the same order; a rank that saw no batch takes part too
    distributed.sync_observers(m for m in gm.modules() if isinstance(m, ActivationObserver))


@dataclass
class StepWork:
    """One step's computation: what the strategies fill before anything is written (all or nothing)."""

    gm: GraphModule
    state: SparsityState
    new_masks: dict[str, Tensor | PendingMask] = field(default_factory=dict)  # target name -> new keep-mask
    new_weights: dict[str, Tensor] = field(default_factory=dict)  # target name -> updated weight (reconstructing)
    restart: list[str] = field(default_factory=list)  # observers whose statistics restart after the step
    # parameter FQN -> new value, for parameters no target owns (the bias of a refit channel consumer)
    new_params: dict[str, Tensor] = field(default_factory=dict)
    # per-layer progress of the solves (SparseGPT, reconstruction): shown when step(verbose=True)
    progress: Progress = field(default_factory=lambda: progress(0, "step"))

    def options(self, record: TargetRecord) -> dict[str, Any]:
        """``record``'s method options at this step (a schedule moves the sparsity)."""
        return current_options(self.state, record)


@dataclass(frozen=True)
class StepStrategy:
    """How ``step()`` computes the masks of one kind of target (a row of :data:`STEP_STRATEGIES`).

    A target belongs to the first row whose ``claims`` accepts it. ``each`` computes one target, in the
    targets' order, inside an error prefix naming it; ``together`` then gets all the targets the row
    claimed at once (it runs even when there are none: a channel plan without targets of its own),
    rows in the table's order. Both only fill the :class:`StepWork`; the masks are written once all
    rows are done (a row that writes as it goes must put things back if it raises).
    """

    name: str
    claims: Callable[[TargetRecord], bool]
    each: Callable[[StepWork, TargetRecord], None] | None = None
    together: Callable[[StepWork, list[TargetRecord]], None] | None = None


def _step_activation(work: StepWork, record: TargetRecord) -> None:
    mask = _activation_mask(work.gm, record, work.state.spec.seed)
    if mask is not None:
        work.new_masks[record.name] = mask
        work.restart.append(record.observer)  # type: ignore[arg-type]


def _step_global(work: StepWork, records: list[TargetRecord]) -> None:
    """Each global group ranks all its targets' scores together (``torch.nn.utils.prune.global_unstructured``)."""
    groups: dict[int, list[TargetRecord]] = {}
    for record in records:
        groups.setdefault(record.group, []).append(record)  # type: ignore[arg-type]
    for g, members in groups.items():
        with _for_target(f"global rule over {', '.join(map(repr, (r.name for r in members)))}"):
            first = members[0]
            parts = global_masks(
                first.method,
                (weight_scores(work.gm, r) for r in members),
                [r.numel for r in members],
                work.options(first),
                seed=work.state.spec.seed,
                name=f"global:{g}",
                compact=True,
            )
        for r, part in zip(members, parts):
            if isinstance(part, PendingMask):  # a threshold, computed when written: packed unless it reads the weight
                work.new_masks[r.name] = part if _reads_the_weight(work.gm, r, part) else part.packed()
            else:
                work.new_masks[r.name] = pending(part.view(r.shape))
        del parts
        release_freed_memory()


def _step_channels(work: StepWork, records: list[TargetRecord]) -> None:
    """SPEC §10, §17: one keep vector per channel group, into every member, ranked by the rule's importance;
    the consumers of ``reconstruct`` rules refit (sequential rules write group by group as they go)."""
    plan, state = work.state.channels, work.state
    if plan is None:
        return
    masks, params = step_channels(
        work.gm,
        plan,
        {r.name: r.buffer for r in records},
        state.steps,  # type: ignore[misc]
        replay=lambda observers: replay_calibration(work.gm, state, observers),
        on_refit=lambda n: work.progress.update(n, "channels") if n else None,
    )
    work.new_masks.update(masks)
    for name, value in params.items():
        (work.new_weights if name in state.targets else work.new_params)[name] = value
    work.restart.extend(dict.fromkeys(plan.observers.values()))
    if any(rule.sequential for rule in plan.rules):
        state.calibration.inputs = None


def _step_module(work: StepWork, record: TargetRecord) -> None:
    """Supermask / joint: the Sparsify module's learnable scores rank the mask."""
    sparsify: Any = work.gm.get_submodule(record.module)  # type: ignore[arg-type]
    work.new_masks[record.name] = sparsify.keep_mask(sparsify.scores.detach(), work.options(record))


def _step_sequential(work: StepWork, records: list[TargetRecord]) -> None:
    """Sparsegpt ``"sequential": true``: level by level, each on the calibration inputs run through the
    levels before it, pruned (it writes masks and weights as it goes, and puts them back if it fails)."""
    work.restart.extend(r.observer for r in records)  # type: ignore[misc]
    if records:
        reconstruct_in_order(
            work.gm,
            work.state,
            records,
            work.new_masks,
            work.new_weights,
            on_solved=lambda name: work.progress.update(1, name),
        )


def _step_reconstruct(work: StepWork, records: list[TargetRecord]) -> None:
    """Sparsegpt in one pass: the mask and the weights that stay, from each layer's ``X·Xᵀ`` (under a process
    group the solves are split across the ranks, each receiving the others' results)."""
    for name, (keep, weight) in solve_all(work.gm, work.state, records).items():
        work.new_masks[name], work.new_weights[name] = keep, weight
        work.progress.update(1, name)
    work.restart.extend(r.observer for r in records)  # type: ignore[misc]


def _plain_mask(
    work: StepWork,
    record: TargetRecord,
    compute: Callable[[Tensor, torch.Generator, dict[str, Any]], Tensor | PendingMask],
) -> None:
    scores = weight_scores(work.gm, record)
    gen = generator_for(work.state.spec.seed, record.name, scores.device)
    mask = compute(scores, gen, work.options(record))
    if isinstance(mask, PendingMask) and not _reads_the_weight(work.gm, record, mask):
        mask = mask.packed()  # it would hold a copy (the scores of a masked weight, a callable's) until the write
    del scores  # free a scores copy before the next target's
    work.new_masks[record.name] = pending(mask)  # 1 bit per entry until written
    del mask
    release_freed_memory()  # the C heap keeps a target's chunk temporaries, the next target's add up on them
    if record.observer is not None:  # Wanda statistics restart with the next calibration
        work.restart.append(record.observer)


def _reads_the_weight(gm: GraphModule, record: TargetRecord, mask: PendingMask) -> bool:
    """Whether ``mask`` is computed at the write from ``record``'s own weight (holding it costs no memory)."""
    source = mask.reads()
    weight = gm.get_parameter(record.param)  # type: ignore[arg-type]
    return source is not None and source.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()


def _settle(work: StepWork) -> None:
    """Pack the new masks still to be computed from their weights: a row that may write weights runs next."""
    for name, keep in work.new_masks.items():
        if isinstance(keep, PendingMask) and keep.reads() is not None:
            work.new_masks[name] = keep.packed()


def _check_unchanged(work: StepWork) -> None:
    """Refuse to write masks ranked from weights that changed since (another thread wrote them in place)."""
    stale = [n for n, k in work.new_masks.items() if isinstance(k, PendingMask) and k.stale()]
    if stale:
        raise RuntimeError(
            f"the weights of {', '.join(map(repr, stale))} changed while step() ranked them (written in place by "
            "another thread?); nothing was written. Run step() while nothing else changes the weights"
        )


def _step_wanda_rows(work: StepWork, record: TargetRecord) -> None:
    """Wanda scores with a count method: the same count pruned in every output row."""
    _plain_mask(work, record, lambda scores, gen, options: per_row_mask(record.method, scores, options))


def _step_plain(work: StepWork, record: TargetRecord) -> None:
    """The method ranks the target's scores (:func:`weight_scores`)."""
    method = get_mask_method(record.method)
    plain, packed = PACKED_METHODS.get(record.method, (None, None))
    if packed is not None and method.fn is plain and record.numel >= PACK_MIN:  # no layer-sized bool mask
        _plain_mask(work, record, lambda scores, gen, options: packed(scores, **options))
        return
    _plain_mask(work, record, lambda scores, gen, options: method(scores, generator=gen, **options))


#: The kinds of target, first match wins; a new kind is one row (or :func:`register_step_strategy`).
STEP_STRATEGIES: list[StepStrategy] = [
    StepStrategy("activation", lambda r: r.kind == "activation", each=_step_activation),
    StepStrategy("global", lambda r: r.group is not None, together=_step_global),
    StepStrategy("channels", lambda r: r.method == CHANNELS, together=_step_channels),
    StepStrategy("module", lambda r: r.module is not None, each=_step_module),
    StepStrategy("reconstructing sequential", is_sequential, together=_step_sequential),
    StepStrategy("reconstructing", lambda r: r.method in RECONSTRUCTING, together=_step_reconstruct),
    StepStrategy(
        "wanda rows",
        lambda r: getattr(r.rule, "scores", None) == "wanda" and r.method in PER_ROW,
        each=_step_wanda_rows,
    ),
    StepStrategy("plain", lambda r: True, each=_step_plain),
]


#: built-in ``together`` rows → whether they may write weights before the masks are written, given the targets they
#: claimed (a channel plan refits on its own); any other row may
_WRITES_WEIGHTS: dict[Callable[..., None], Callable[[StepWork, list[TargetRecord]], bool]] = {
    _step_global: lambda work, claimed: False,
    _step_reconstruct: lambda work, claimed: bool(claimed),
    _step_sequential: lambda work, claimed: bool(claimed),
    _step_channels: lambda work, claimed: work.state.channels is not None,
}


def _may_write_weights(work: StepWork, strategy: StepStrategy, claimed: list[TargetRecord]) -> bool:
    """Whether ``strategy``'s ``together`` may change weights (masks still to be computed from them are packed
    first)."""
    if strategy.together is None:
        return False
    rule = _WRITES_WEIGHTS.get(strategy.together)
    return rule is None or rule(work, claimed)


def register_step_strategy(strategy: StepStrategy, *, before: str = "plain", override: bool = False) -> StepStrategy:
    """Add a kind of target to :data:`STEP_STRATEGIES`, tried before the row named ``before``.

    A second row with a known name is refused unless ``override=True`` (which replaces it in place).
    """
    if not isinstance(strategy, StepStrategy):
        raise TypeError(f"register_step_strategy() takes a StepStrategy, got {type(strategy).__name__}")
    names = [s.name for s in STEP_STRATEGIES]
    if strategy.name in names:
        if not override:
            raise ValueError(
                f"a step strategy named {strategy.name!r} is already registered; pass override=True "
                "to replace it, or choose another name"
            )
        STEP_STRATEGIES[names.index(strategy.name)] = strategy
        return strategy
    if before not in names:
        raise KeyError(f"register_step_strategy(before={before!r}): no such row; rows: {', '.join(names)}")
    STEP_STRATEGIES.insert(names.index(before), strategy)
    return strategy


def strategy_of(record: TargetRecord) -> StepStrategy:
    """The row of :data:`STEP_STRATEGIES` that computes ``record``'s mask."""
    return next(s for s in STEP_STRATEGIES if s.claims(record))


def update_masks(gm: GraphModule, state: SparsityState, verbose: bool = False) -> None:
    """Recompute the mask of every target of ``gm`` (masks are buffers); all or nothing. ``verbose``: a line (or a
    tqdm bar) on stderr per solved layer of SparseGPT / reconstruction, the long part of a step."""
    check_targets(state)
    _check_materialised(gm, state)
    sync_observers(gm)
    check_calibrated(gm, state)
    work = StepWork(gm, state)
    solves = sum(1 for r in state.targets.values() if r.method in RECONSTRUCTING)
    plan = state.channels
    refits = (
        0
        if plan is None
        else sum(1 for g in plan.groups if g.rule is not None and g.removable and plan.rules[g.rule].reconstruct)
    )
    what = "step: sparsegpt" if not refits else "step: reconstruct" if not solves else "step: solves"
    work.progress = progress(solves + refits, what, enabled=verbose, unit="layer" if not refits else "solve")
    strategies = list(STEP_STRATEGIES)
    claimed: dict[str, list[TargetRecord]] = {s.name: [] for s in strategies}
    rng = _rng_states(gm)  # a step that raises leaves every generator where it was
    with torch.no_grad():
        try:
            for record in state.targets.values():
                with _for_target(f"target {record.name!r}"):
                    strategy = next(s for s in strategies if s.claims(record))
                    claimed[strategy.name].append(record)
                    if strategy.each is not None:
                        strategy.each(work, record)
            if any(_may_write_weights(work, s, claimed[s.name]) for s in strategies):
                _settle(work)
            for strategy in strategies:
                if strategy.together is not None:
                    strategy.together(work, claimed[strategy.name])
            _check_unchanged(work)
        except BaseException:
            _restore_rng(rng)
            raise
        finally:
            work.progress.close()
        for name, keep in work.new_masks.items():
            _write(gm, state, state.targets[name], keep)
        for name, weight in work.new_weights.items():
            gm.get_parameter(state.targets[name].param).copy_(weight)  # type: ignore[arg-type]
        for name, value in work.new_params.items():
            gm.get_parameter(name).copy_(value)
        state.reconstructed.update(work.new_weights)
        for observer in work.restart:
            restarted: Any = gm.get_submodule(observer)
            restarted.reset()
    if state.spec.mode == "inplace":
        apply_masks_inplace(gm, state)
    state.steps += 1
    work.new_masks.clear()
    release_freed_memory()  # the step's temporaries leave the process's resident memory (SPEC §15)


@serial_when_small  # a mask copy of a few ten thousand entries on one thread (see _threads.py)
def _write(gm: GraphModule, state: SparsityState, record: TargetRecord, keep: Tensor | PendingMask) -> None:
    if record.kind == "activation":  # activation masks take reduce's shape at the first step
        assert isinstance(keep, Tensor), record.name  # computed whole, never packed
        setattr(gm, record.buffer, keep.to(gm.get_buffer(record.buffer).device))
        record.shape = tuple(keep.shape)
        return
    if record.module is not None:  # the Sparsify module ranks its scores with the scheduled options
        sparsify: Any = gm.get_submodule(record.module)
        sparsify.options = current_options(state, record)
    buf = gm.get_buffer(record.buffer)
    if isinstance(keep, PendingMask):
        keep.unpack_into(buf)
        return
    buf.copy_(keep.to(device=buf.device, dtype=buf.dtype))


def apply_masks_inplace(gm: GraphModule, state: SparsityState) -> None:
    """Multiply every masked weight by its mask in place (``"mode": "inplace"``)."""
    with torch.no_grad():
        for r in state.targets.values():
            if r.kind != "activation":
                zero_pruned_(gm.get_parameter(r.param), gm.get_buffer(r.buffer))  # type: ignore[arg-type]
