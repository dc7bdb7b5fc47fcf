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
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor
from torch.fx import GraphModule

from .._masks import PackedMask, is_masked, keep_of, masked_copy, pending, release_freed_memory, zero_pruned_
from .._modules import find_tensor
from ..methods import get_mask_method
from ..methods._global import prune_smallest_many
from ..methods._selectors import count_to_prune
from ..methods._random import generator_for
from ..methods.wanda import PER_ROW, per_row_mask
from ..methods._registry import keep_mask, refuse_nan
from ..state import SparsityState, TargetRecord, current_options
from .channels import CHANNELS, channel_masks
from .reconstruct import RECONSTRUCTING, check_calibrated, is_sequential, reconstruct, reconstruct_in_order

__all__ = ["update_masks", "weight_scores", "check_options", "check_targets", "apply_masks_inplace"]


def weight_scores(gm: GraphModule, record: TargetRecord) -> Tensor:
    """What ``record``'s method ranks: the (importance) scores, times the mask unless regrowing."""
    weight = gm.get_parameter(record.param).detach()
    rule = record.rule
    scores_spec: Any = getattr(rule, "scores", None)
    if scores_spec is None:
        scores = weight
    elif scores_spec == "wanda":
        observer = gm.get_submodule(record.observer)  # type: ignore[arg-type]
        (sq_sums,) = observer.reduced()
        scores = weight.abs() * sq_sums.sqrt().to(weight.dtype).unsqueeze(0)
    elif callable(scores_spec):  # a copy: a callable that edits its input in place must not touch the weight
        scores = torch.as_tensor(scores_spec(weight.clone())).detach()
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
        get_mask_method(method).check_shape(total, options, f"global rule over {', '.join(name for name, *_ in members)}")


def check_targets(state: SparsityState) -> None:
    """:func:`check_options` for every weight target of ``state`` at the current step's options."""
    check_options(
        (r.name, r.method, r.shape, current_options(state, r), r.group)
        for r in state.targets.values() if r.kind != "activation" and r.method != CHANNELS
    )


def _activation_mask(gm: GraphModule, record: TargetRecord, seed: int) -> Tensor | None:
    """``mask_fn(reduce_fn(aggregated), **options)`` per layer or per selected feature (stacked)."""
    observer = gm.get_submodule(record.observer)  # type: ignore[arg-type]
    if int(observer.batches) == 0:
        warnings.warn(
            f"step(): activation target {record.name!r} saw no forward pass since the last step; its mask is "
            "unchanged. Run calibration batches through the module before step().",
            stacklevel=3,
        )
        return None
    rule = record.rule
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
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    from ..observer import ActivationObserver

    for module in gm.modules():
        if isinstance(module, ActivationObserver) and module.batches > 0:
            op = dist.ReduceOp.MAX if module.aggregate in ("max", "abs_max") else dist.ReduceOp.SUM
            dist.all_reduce(module.stat, op=op)
            counts = torch.tensor([module.samples, module.batches], device=module.stat.device)
            dist.all_reduce(counts)
            module.samples, module.batches = (int(c) for c in counts)


def update_masks(gm: GraphModule, state: SparsityState) -> None:
    """Recompute the mask of every target of ``gm`` (masks are buffers); all or nothing."""
    check_targets(state)
    sync_observers(gm)
    check_calibrated(gm, state)
    seed = state.spec.seed
    new_masks: dict[str, Tensor] = {}  # target name -> new keep-mask, written only once all are computed
    new_weights: dict[str, Tensor] = {}  # sparsegpt: target name -> updated weight (passes/reconstruct.py)
    in_order: list[TargetRecord] = []  # sparsegpt "sequential": pruned level by level, last (they write as they go)
    restart: list[str] = []  # observers whose statistics restart after the step
    groups: dict[int, list[TargetRecord]] = {}
    rng = _rng_states(gm)  # a step that raises leaves every generator where it was
    with torch.no_grad():
        try:
            for record in state.targets.values():
                with _for_target(f"target {record.name!r}"):
                    if record.kind == "activation":
                        mask = _activation_mask(gm, record, seed)
                        if mask is not None:
                            new_masks[record.name] = mask
                            restart.append(record.observer)  # type: ignore[arg-type]
                    elif record.method == CHANNELS:  # computed per channel group below
                        continue
                    elif record.group is not None:
                        groups.setdefault(record.group, []).append(record)
                    elif record.module is not None:  # supermask / joint: the learnable scores rank the mask
                        sparsify = gm.get_submodule(record.module)
                        new_masks[record.name] = sparsify.keep_mask(sparsify.scores.detach(), current_options(state, record))
                    elif record.method in RECONSTRUCTING:  # mask and the weights that stay, from X·Xᵀ
                        if is_sequential(record):
                            in_order.append(record)
                        else:
                            new_masks[record.name], new_weights[record.name] = reconstruct(gm, record, current_options(state, record))
                        restart.append(record.observer)  # type: ignore[arg-type]
                    else:
                        scores = weight_scores(gm, record)
                        gen = generator_for(seed, record.name, scores.device)
                        if getattr(record.rule, "scores", None) == "wanda" and record.method in PER_ROW:  # per output row
                            new_masks[record.name] = per_row_mask(record.method, scores, current_options(state, record))
                        else:
                            new_masks[record.name] = get_mask_method(record.method)(scores, generator=gen, **current_options(state, record))
                        del scores  # free a scores copy before the next target's
                        new_masks[record.name] = pending(new_masks[record.name])  # 1 bit per entry until written
                        if record.observer is not None:  # Wanda statistics restart with the next calibration
                            restart.append(record.observer)
            for g, records in groups.items():
                with _for_target(f"global rule over {', '.join(map(repr, (r.name for r in records)))}"):
                    first = records[0]
                    if first.method == "l1_unstructured":  # ranked across the group without concatenating it
                        group_scores = [weight_scores(gm, r) for r in records]
                        k = count_to_prune(current_options(state, first)["sparsity"], sum(r.numel for r in records))
                        parts = prune_smallest_many(group_scores, k, absolute=True)
                        del group_scores
                    else:
                        flat = torch.cat([weight_scores(gm, r).reshape(-1).float() for r in records])
                        method = get_mask_method(first.method)
                        keep = method(flat, generator=generator_for(seed, f"global:{g}", flat.device), **current_options(state, first))
                        parts = list(keep.split([r.numel for r in records]))
                for r, part in zip(records, parts):
                    new_masks[r.name] = pending(part.view(r.shape))
            if state.channels is not None:  # SPEC §10: one keep vector per channel group, into every member
                current = {n: gm.get_buffer(r.buffer) for n, r in state.targets.items() if r.method == CHANNELS}
                new_masks.update(channel_masks(gm, state.channels, current, state.steps))
            if in_order:  # last: it writes masks and weights level by level (and puts them back if it fails)
                reconstruct_in_order(gm, state, in_order, new_masks, new_weights)
        except BaseException:
            _restore_rng(rng)
            raise
        for name, keep in new_masks.items():
            _write(gm, state, state.targets[name], keep)
        for name, weight in new_weights.items():
            gm.get_parameter(state.targets[name].param).copy_(weight)  # type: ignore[arg-type]
        state.reconstructed.update(new_weights)
        for observer in restart:
            gm.get_submodule(observer).reset()
    if state.spec.mode == "inplace":
        apply_masks_inplace(gm, state)
    state.steps += 1
    new_masks.clear()
    release_freed_memory()  # the step's temporaries leave the process's resident memory (SPEC §15)


def _write(gm: GraphModule, state: SparsityState, record: TargetRecord, keep: Tensor) -> None:
    if record.kind == "activation":  # activation masks take reduce's shape at the first step
        setattr(gm, record.buffer, keep.to(gm.get_buffer(record.buffer).device))
        record.shape = tuple(keep.shape)
        return
    if record.module is not None:  # the Sparsify module ranks its scores with the scheduled options
        gm.get_submodule(record.module).options = current_options(state, record)
    buf = gm.get_buffer(record.buffer)
    if isinstance(keep, PackedMask):
        keep.unpack_into(buf)
        return
    buf.copy_(keep.to(device=buf.device, dtype=buf.dtype))


def apply_masks_inplace(gm: GraphModule, state: SparsityState) -> None:
    """Multiply every masked weight by its mask in place (``"mode": "inplace"``)."""
    with torch.no_grad():
        for r in state.targets.values():
            if r.kind != "activation":
                zero_pruned_(gm.get_parameter(r.param), gm.get_buffer(r.buffer))  # type: ignore[arg-type]
