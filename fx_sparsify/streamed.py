"""``prune_streamed``: prune a model larger than memory, one block at a time (SPEC §19).

    >>> build = lambda: LlamaForCausalLM(config)                                    # doctest: +SKIP
    >>> fxs.prune_streamed(build, "llama-70b/", spec, calibration, "pruned/")       # doctest: +SKIP
    >>> model = fxs.load_compressed("pruned/", model)                               # doctest: +SKIP

The model is built with its parameters on the meta device (no memory; buffers are built as usual so
rotary frequencies keep their values). Its repeated blocks (``blocks``: a container FQN such as
``"model.layers"``, or a list of module FQNs; default: the children of the ``ModuleList`` holding the
most parameters) are processed in order:

1. the calibration batches run through the model up to the first block, whose inputs are kept (the
   modules before it read their weights from the checkpoint on their first call);
2. for each block: its weights are read from the checkpoint, it is wrapped so that its target names are
   the whole model's (``model.layers.3.mlp.up_proj.weight``), sparsified with the rules that select
   something in it, calibrated on the previous (already pruned) blocks' outputs, stepped, squashed
   (shrunk where the spec has ``channels``), written as a compressed shard, run once more to give the
   next block its inputs, and freed;
3. the tensors outside the blocks (embeddings, final norm, head) are written a few at a time, pruned
   by the rules that select them (methods that need no calibration only);
4. the index ``model.safetensors.index.json`` is written last.

Peak memory is about one block (its weights, the masks and squash's new weights, its Hessians) plus the
calibration activations (``batch × seq × hidden`` per batch), which spill to disk past
``activation_memory`` bytes. Under a ``torch.distributed`` process group each rank calibrates on its
share of the batches (statistics and solves are combined in ``step()``, see
:mod:`fx_sparsify.distributed`) and rank 0 writes the files.

**Interruption.** ``out`` never holds an index over a partial result: the index is written last.
A run that raises removes the shards it wrote; a run that was killed leaves them with a marker
file listing them, and the next run into the same ``out`` removes them and starts from the first
block (finished blocks are redone). Files in ``out`` that fx_sparsify did not write are never touched.
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import distributed
from ._checkpoint import Checkpoint, materialise, parameters_on_meta, release
from ._masks import release_freed_memory
from ._modules import attach
from ._streamed_io import (
    MARKER,
    Activations,
    ShardWriter,
    first_tensor,
    needs_calibration,
    outside_groups,
    prune_outside,
    state_outside,
)
from .api import sparsify_graph
from .passes.reconstruct import inputs_kept_by, without_rollback
from .select import param_aliases, resolve_activation_targets, resolve_weight_targets, select, select_layers
from .spec import GlobalRule, SparsitySpec, WeightRule

__all__ = ["prune_streamed", "MARKER"]

log = logging.getLogger(__name__)

_SPILL = ".fx_sparsify-activations-rank{rank}"


# --- the spec, per part ----------------------------------------------------------------------------------
def _selects(selector: str, model: nn.Module, aliases: dict[str, str], layers: bool) -> list[str]:
    try:
        return select_layers(selector, model, "") if layers else select(selector, model, aliases, "")
    except ValueError:  # selects nothing here (the whole model was checked first)
        return []


def _part_spec(spec: SparsitySpec, shell: nn.Module) -> SparsitySpec | None:
    """The rules of ``spec`` that select something in ``shell`` (None: none do)."""
    aliases = param_aliases(shell)
    weights = tuple(r for r in spec.weights if _selects(r.target, shell, aliases, False))
    global_ = tuple(r for r in spec.global_ if any(_selects(s, shell, aliases, False) for s in r.targets))
    activations = tuple(r for r in spec.activations if _selects(r.target, shell, aliases, True))
    channels = tuple(r for r in spec.channels if _selects(r.target, shell, aliases, True))
    chosen: list[WeightRule | GlobalRule] = [*weights, *global_]
    if not any(r.method != "dense" for r in chosen) and not activations and not channels:
        return None
    # one-shot: pruned weights are zeroed in place, so squash shares the block's weights instead of copying them
    # (and calibration forwards cache no weight * mask products); the masks and values are the same
    mode = "inplace" if all(r.gradient == "mask" for r in weights) else spec.mode
    return SparsitySpec(
        weights=weights, global_=global_, activations=activations, seed=spec.seed, mode=mode, channels=channels
    )


def _check_spec(spec: SparsitySpec, model: nn.Module, blocks: list[str]) -> None:
    """Every rule selects something (as sparsify_graph checks); rules ranking across blocks cannot stream."""
    resolve_weight_targets(spec, model)
    resolve_activation_targets(spec, model)
    aliases = param_aliases(model)
    for i, rule in enumerate(spec.channels):
        select_layers(rule.target, model, f"spec['channels'][{i}] ({rule.target!r})")

    def parts(names: list[str]) -> set[str]:
        return {next((b for b in blocks if n == b or n.startswith(b + ".")), "outside the blocks") for n in names}

    spread = [
        (f"spec['global'][{g}]", parts([n for s in r.targets for n in _selects(s, model, aliases, False)]))
        for g, r in enumerate(spec.global_)
    ]
    spread += [
        (f"spec['channels'][{i}] with 'global': true", parts(_selects(r.target, model, aliases, True)))
        for i, r in enumerate(spec.channels)
        if r.global_
    ]
    for where, found in spread:
        if len(found) > 1:
            raise ValueError(
                f"prune_streamed: {where} ranks tensors of {len(found)} blocks together "
                f"({', '.join(sorted(found)[:3])}, ...), but blocks are pruned one at a time; rank within "
                "each block (one rule per block, or a non-global rule)"
            )


# --- the model and its blocks ----------------------------------------------------------------------------
def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _find_blocks(model: nn.Module, blocks: str | Sequence[str] | None) -> list[str]:
    named = dict(model.named_modules())
    if blocks is None:
        lists = [(n, m) for n, m in named.items() if isinstance(m, nn.ModuleList) and len(m)]
        if not lists:
            raise ValueError(
                f"prune_streamed: {type(model).__name__} has no nn.ModuleList of repeated blocks; "
                "name them with blocks='path.to.container' or a list of module names"
            )
        name, container = max(lists, key=lambda nm: _numel(nm[1]))
        return [f"{name}.{child}" for child, _ in container.named_children()]
    if isinstance(blocks, str):
        if blocks not in named or not list(named[blocks].children()):
            close = [n for n, m in named.items() if isinstance(m, (nn.ModuleList, nn.Sequential))][:5]
            raise ValueError(
                f"prune_streamed: blocks={blocks!r} is not a module with children in "
                f"{type(model).__name__}; containers present: {', '.join(close) or '(none)'}"
            )
        return [f"{blocks}.{child}" if blocks else child for child, _ in named[blocks].named_children()]
    names = list(blocks)
    bad = [b for b in names if b not in named or not b]
    if bad or not names:
        raise ValueError(f"prune_streamed: blocks {bad or names!r} are not modules of {type(model).__name__}")
    nested = [(a, b) for a in names for b in names if a != b and b.startswith(a + ".")]
    if nested:
        raise ValueError(f"prune_streamed: block {nested[0][1]!r} lies inside block {nested[0][0]!r}")
    return names


def _shell_forward(block: nn.Module, path: str) -> Callable[..., Any]:
    """A ``forward(self, ...)`` with the block's own signature that calls the block (fx traces named arguments)."""
    params = list(inspect.signature(block.forward).parameters.values())
    env: dict[str, Any] = {"_path": path}
    head, call, star = [], [], False
    for i, p in enumerate(params):
        if p.kind is p.VAR_POSITIONAL:
            head.append(f"*{p.name}")
            call.append(f"*{p.name}")
            star = True
            continue
        if p.kind is p.VAR_KEYWORD:
            head.append(f"**{p.name}")
            call.append(f"**{p.name}")
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            head.append("*")
            star = True
        default = ""
        if p.default is not p.empty:
            env[f"_d{i}"] = p.default
            default = f"=_d{i}"
        head.append(f"{p.name}{default}")
        call.append(f"{p.name}={p.name}" if p.kind is p.KEYWORD_ONLY else p.name)
    source = f"def forward(self, {', '.join(head)}):\n    return self.get_submodule(_path)({', '.join(call)})\n"
    exec(source, env)  # noqa: S102 - our own source, built from a signature
    return env["forward"]  # type: ignore[no-any-return]


def _shell(path: str, block: nn.Module) -> nn.Module:
    """A module holding ``block`` at ``path`` (so its names are the whole model's) and calling it."""
    cls = type("StreamedBlock", (nn.Module,), {"forward": _shell_forward(block, path)})
    root = cls()
    parent: nn.Module = root
    *outer, last = path.split(".")
    for part in outer:
        child = nn.Module()
        parent.add_module(part, child)
        parent = child
    parent.add_module(last, block)
    return root  # type: ignore[no-any-return]


class _Stored(Sequence[tuple[tuple[Any, ...], dict[str, Any]]]):
    """The store's block inputs as a sequence of ``(args, kwargs)``, read (from disk if spilled) when indexed."""

    def __init__(self, store: Activations) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, j: int) -> tuple[tuple[Any, ...], dict[str, Any]]:  # type: ignore[override]
        if not 0 <= j < len(self.store):
            raise IndexError(j)
        return self.store.inputs(j)


class _Stop(Exception):
    """Raised by the hook on the first block: the model has computed the block's inputs."""


def _as_call(batch: Any, model: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        if "use_cache" in inspect.signature(model.forward).parameters and "use_cache" not in kwargs:
            kwargs["use_cache"] = False  # a Hugging Face KV cache would grow through every block
        return (), kwargs
    if isinstance(batch, Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    raise TypeError(
        f"prune_streamed: a calibration batch is a tensor, a tuple of inputs or a dict of keyword inputs, "
        f"got {type(batch).__name__}"
    )


def _first_inputs(
    model: nn.Module,
    first: nn.Module,
    outside: list[str],
    checkpoint: Checkpoint,
    aliases: dict[str, str],
    batches: Iterable[Any],
    store: Activations,
    limit: int | None,
) -> None:
    """Run each batch up to ``first``; the modules outside the blocks read their weights on their first call."""

    def load(module: nn.Module, args: Any) -> None:
        materialise(model, [names[id(module)]], checkpoint, aliases, recurse=False)

    names = {id(m): n for n, m in model.named_modules()}
    hooks = [model.get_submodule(n).register_forward_pre_hook(load) for n in outside]

    def stop(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        store.add(args, kwargs)
        raise _Stop

    hooks.append(first.register_forward_pre_hook(stop, with_kwargs=True))
    try:
        for j, batch in enumerate(batches):
            if limit is not None and j >= limit:
                break
            args, kwargs = _as_call(batch, model)
            try:
                model(*args, **kwargs)
            except _Stop:
                continue
            raise ValueError(
                "prune_streamed: a calibration batch ran through the model without reaching the first "
                "block; name the repeated blocks with blocks="
            )
    finally:
        for h in hooks:
            h.remove()
        release(model, outside, recurse=False)


# --- the whole run ---------------------------------------------------------------------------------------
def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def prune_streamed(
    model_fn: Callable[[], nn.Module],
    checkpoint: str | os.PathLike[str],
    spec: SparsitySpec | Mapping[str, Any],
    calibration: Iterable[Any],
    out: str | os.PathLike[str],
    blocks: str | Sequence[str] | None = None,
    *,
    capture: str = "auto",
    activation_memory: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, float]:
    """Prune the model ``model_fn()`` builds, with weights from ``checkpoint``, one block at a time into ``out``.

    ``calibration``: input batches (a tensor, a tuple of inputs, or a dict of keyword inputs each); it is
    read once. With an export capture (Hugging Face blocks) the batches must share one shape.
    ``activation_memory``: bytes of block inputs held in memory before they spill to files in ``out``
    (default: a quarter of the available memory). ``progress(done, total, name)`` is called after each
    block and each group of outside tensors (each is also logged at INFO). Returns the achieved sparsity
    of every target. ``fxs.load_compressed(out, model)`` loads the result.
    """
    spec = SparsitySpec.from_dict(spec) if not isinstance(spec, SparsitySpec) else spec
    started = time.perf_counter()
    ckpt = Checkpoint(checkpoint)  # a missing shard is an error here, before out is touched
    out_dir = Path(os.fspath(out))
    if out_dir.resolve() == ckpt.path.resolve() or (
        ckpt.path.is_file() and out_dir.resolve() == ckpt.path.parent.resolve()
    ):
        raise ValueError(f"prune_streamed: out {str(out_dir)!r} is where the checkpoint is; write into another folder")
    with parameters_on_meta(), torch.no_grad():
        model = model_fn()
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune_streamed: model_fn() returned {type(model).__name__}, not an nn.Module")
    model.eval()
    with _collecting_new_objects_only():
        return _prune(model, blocks, ckpt, out_dir, spec, calibration, capture, activation_memory, progress, started)


@contextmanager
def _collecting_new_objects_only() -> Iterator[None]:
    """``gc.freeze()`` for the run: the collections after each block (which free its graph's reference cycles)
    then walk only the objects made since, not the whole interpreter (torch, transformers, the user's objects:
    ~0.6 s a collection with transformers imported, the largest overhead of a small model's run). Left as it
    is when the caller froze objects already; unfrozen at the end."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _prune(
    model: nn.Module,
    blocks: str | Sequence[str] | None,
    ckpt: Checkpoint,
    out_dir: Path,
    spec: SparsitySpec,
    calibration: Iterable[Any],
    capture: str,
    activation_memory: int | None,
    progress: Callable[[int, int, str], None] | None,
    started: float,
) -> dict[str, float]:
    names = _find_blocks(model, blocks)
    _check_spec(spec, model, names)
    aliases = param_aliases(model)
    budget = max(sum(p.numel() * p.element_size() for p in model.get_submodule(b).parameters()) for b in names)
    groups = outside_groups(model, names, budget)
    output = ShardWriter(out_dir, len(names) + len(groups))
    writer = distributed.is_writer()
    limit = _available_memory() // 4 if activation_memory is None else int(activation_memory)
    store = Activations(out_dir / _SPILL.format(rank=distributed.rank()), limit)
    calibrate = needs_calibration(spec)
    sparsity: dict[str, float] = {}
    total = len(names) + len(groups)
    if writer:
        output.begin()
    distributed.barrier()
    try:
        with torch.no_grad():
            outside = [g for group in groups for g in group]
            _first_inputs(
                model,
                model.get_submodule(names[0]),
                outside,
                ckpt,
                aliases,
                distributed.local_share(calibration),
                store,
                None if calibrate else 1,
            )
            distributed.raise_together(
                None
                if len(store)
                else ValueError(
                    f"prune_streamed: rank {distributed.rank()} received no calibration batch; give at least one batch "
                    f"per rank ({distributed.world_size()} ranks)"
                )
            )
            for i, name in enumerate(names):
                sparsity.update(
                    _block(model, name, spec, ckpt, aliases, store, capture, calibrate, output if writer else None, i)
                )
                _report(progress, i + 1, total, name, store, started)
            for k, members in enumerate(groups):
                part = _part_spec(spec, _holder(model, members))
                keys = state_outside(model, members)  # meta tensors: names, shapes and dtypes
                if part is None and all(
                    n in ckpt and ckpt.shape(n) == tuple(t.shape) and ckpt.dtype(n) == t.dtype for n, t in keys.items()
                ):  # no rule prunes them: copied from the checkpoint as they are, never whole in memory
                    if writer:
                        output.copy(len(names) + k, ckpt, list(keys))
                else:
                    materialise(model, members, ckpt, aliases, recurse=False)
                    sparsity.update(prune_outside(model, members, part))
                    if writer:
                        output.write(len(names) + k, state_outside(model, members))
                    release(model, members, recurse=False)
                _report(progress, len(names) + k + 1, total, ", ".join(members), store, started)
        distributed.barrier()
        if writer:
            output.finish({"blocks": names, "spec": _spec_json(spec), "sparsity": sparsity})
    except BaseException:
        if writer:
            output.abandon()
        raise
    finally:
        shutil.rmtree(store.folder, ignore_errors=True)
    return sparsity


def _holder(model: nn.Module, members: list[str]) -> nn.Module:
    shell = nn.Module()
    for m in members:
        attach(shell, m, model.get_submodule(m))
    return shell


def _spec_json(spec: SparsitySpec) -> Any:
    try:
        return json.loads(json.dumps(spec.to_dict()))
    except (TypeError, ValueError):  # callables in the spec
        return None


def _report(
    progress: Callable[[int, int, str], None] | None,
    done: int,
    total: int,
    name: str,
    store: Activations,
    started: float,
) -> None:
    # a block's graph modules hold reference cycles: collected now rather than whenever the collector runs, or
    # they pile up (about one block of memory each); then the freed pages go back to the OS
    gc.collect()
    release_freed_memory()
    log.info(
        "prune_streamed: %d/%d %s done (%.1f s; %d calibration batches on disk)",
        done,
        total,
        name,
        time.perf_counter() - started,
        store.spilled(),
    )
    if progress is not None:
        progress(done, total, name)


def _block(
    model: nn.Module,
    name: str,
    spec: SparsitySpec,
    ckpt: Checkpoint,
    aliases: dict[str, str],
    store: Activations,
    capture: str,
    calibrate: bool,
    output: ShardWriter | None,
    index: int,
) -> dict[str, float]:
    """Load, calibrate, step, squash, write and free block ``name``; its outputs replace its inputs in ``store``."""
    materialise(model, [name], ckpt, aliases)
    block = model.get_submodule(name)
    shell = _shell(name, block)
    part = _part_spec(spec, shell)
    sparsity: dict[str, float] = {}
    try:
        if part is None:
            module: nn.Module = shell
        else:
            args, kwargs = store.inputs(0)
            sgm = sparsify_graph(shell, part, example_inputs=args, example_kwargs=kwargs, capture=capture, inplace=True)
            release_freed_memory()  # the capture's temporaries (each stage's go back before the next allocates)
            if needs_calibration(part):
                with inputs_kept_by(_Stored(store)):  # sequential rules replay the store, not copies of it
                    for j in range(len(store)):
                        args, kwargs = store.inputs(j)
                        sgm(*args, **kwargs)
            with without_rollback():  # a failing step ends the run: no copy of the block's weights to put back
                sgm.step()
            release_freed_memory()
            sparsity = sgm.sparsity()
            module = sgm.squash(shrink=bool(part.channels))
            del sgm
        if output is not None:
            output.write(index, module.state_dict())
            release_freed_memory()  # the save's temporaries, before the forwards allocate theirs
        for j in range(len(store)):
            args, kwargs = store.inputs(j)
            store.put(j, first_tensor(module(*args, **kwargs)))
    finally:
        module = shell = block = None  # type: ignore[assignment]
        release(model, [name])
    return sparsity
