"""``sparsify_graph``: the stages in order, and function forms of the module's methods.

check the call → take over prune hooks → select (select.py) → capture (trace.py) → plan channel groups
→ insert observers and mask nodes (passes, through run_passes) → target records → SparseGraphModule
→ [forward passes / training] → step (update_masks) → squash (fold_masks) → export (export.py)
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.fx import GraphModule

from ._caller import user_stacklevel
from ._export_capture import mode_dependent_modules, quiet_deepcopy
from ._modules import attach_tensor, find_tensor
from ._spec_doc import SPEC_KEYS_DOC
from .methods._selectors import ENTRY_COUNTS, warn_if_percent_like
from .mha import attention_as_op
from .observer import ActivationObserver
from .passes._runner import Pass, PassResult, run_passes
from .passes.channels import ChannelPlan, heads_attention, passive_rules, plan_channels
from .passes.channels.importance import insert_channel_observers
from .passes.insert_activation_masks import activation_target_name, insert_activation_masks
from .passes.insert_hessian_observers import insert_hessian_observers, sparsegpt_layers
from .passes.insert_weight_masks import insert_weight_masks
from .passes.reconstruct import record_calibration_inputs
from .passes.update_masks import check_options
from .roundtrip import set_initial_masks, take_over
from .select import Selection, WeightTarget, param_aliases, resolve_activation_targets, resolve_weight_targets
from .sparse_graph_module import SparseGraphModule
from .spec import SparsitySpec
from .state import SparsityState, TargetRecord
from .trace import capture_graph, pausing_gc

__all__ = ["sparsify_graph", "step", "squash", "masks", "sparsity", "report"]


def _as_spec(spec: SparsitySpec | Mapping[str, Any]) -> SparsitySpec:
    if isinstance(spec, SparsitySpec):
        return spec
    if isinstance(spec, Mapping):
        return SparsitySpec.from_dict(spec)
    raise TypeError(f"spec must be a dict or a fx_sparsify.SparsitySpec, got {type(spec).__name__}")


def _as_inputs(example_inputs: Any, example_kwargs: Any) -> tuple[tuple[Any, ...] | None, dict[str, Any] | None]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        raise TypeError(f"example_inputs must be a tuple of inputs, got {type(example_inputs).__name__}; wrap it: (x,)")
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise TypeError(f"example_kwargs must be a dict of keyword inputs, got {type(example_kwargs).__name__}")
    return (
        tuple(example_inputs) if example_inputs is not None else None,
        dict(example_kwargs) if example_kwargs is not None else None,
    )


@pausing_gc  # its full collections would walk the whole heap, more often the bigger the graph (trace.py)
def sparsify_graph(
    model: nn.Module,
    spec: SparsitySpec | Mapping[str, Any],
    *,
    example_inputs: tuple[Any, ...] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    capture: str = "auto",
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Iterable[type[nn.Module] | str] | None = None,
    inplace: bool = False,
    dynamic_shapes: Any = None,
    masks: Mapping[str, Any] | None = None,
) -> SparseGraphModule:
    """Capture ``model`` as a graph and insert a mask node for every tensor ``spec`` selects.

    The user's model is not changed (it is deep-copied first) unless ``inplace=True``, in which case
    the returned module shares its parameters. Every mask starts all-keep: call ``.step()`` to compute.
    ``dynamic_shapes`` goes to ``torch.export.export`` for an export capture: without
    it the captured graph only accepts inputs of the example inputs' shapes.
    ``masks`` maps weight target names to initial keep-masks; a model carrying
    ``torch.nn.utils.prune`` hooks or ``torch.ao.pruning`` FakeSparsity parametrizations is taken over
    (the copy loses them, their masks become the initial masks, "adopted" in the report).
    """
    spec, example_inputs, example_kwargs = _checked_call(
        model,
        spec,
        example_inputs,
        example_kwargs,
        masks,
        capture=capture,
        inplace=inplace,
        leaf_modules=leaf_modules,
        concrete_args=concrete_args,
    )
    model, adopted, origin = take_over(model, inplace=inplace)  # prune hooks / FakeSparsity: their masks, on a copy
    selection, scores = _select(spec, model)  # names and types only: every selection error before anything is copied
    state_keys, versions = _state_dict_layout(model)
    work = model if inplace or adopted else _copy(model)
    gm, captured_by = _capture(
        model,
        work,
        spec,
        inplace,
        capture=capture,
        example_inputs=example_inputs,
        example_kwargs=example_kwargs,
        concrete_args=concrete_args,
        leaf_modules=leaf_modules,
        dynamic_shapes=dynamic_shapes,
    )
    _plan_channels(gm, selection, model, captured_by, example_inputs, example_kwargs)
    activations, weights = _insert_masks(gm, selection, work, scores)
    plan = selection.channels
    state = SparsityState(
        spec=spec,
        capture=captured_by,
        targets=_records(gm, work, model, selection, activations, weights),
        state_keys=state_keys,
        class_name=type(model).__name__,
        aliases=selection.aliases,
        versions=versions,
        channels=plan if plan is not None and plan.groups else None,
        inplace=inplace,  # squash may then zero the pruned weights in place instead of copying
        # an export capture keeps dropout / batch norm as captured: train() / eval() warn
        export_mode=(model.training, mode_dependent_modules(model)) if captured_by == "export" else None,
    )
    initial = {**adopted, **(masks or {})}
    adopted_from = {n: o for n, o in origin.items() if n not in (masks or {})}
    return _sparse_module(gm, state, model, initial, adopted_from, example_inputs, example_kwargs)


def _checked_call(
    model: Any, spec: Any, example_inputs: Any, example_kwargs: Any, masks: Any, **arguments: Any
) -> tuple[SparsitySpec, tuple[Any, ...] | None, dict[str, Any] | None]:
    """The arguments of :func:`sparsify_graph` checked: the spec built, the example inputs as a tuple and a dict."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    spec = _as_spec(spec)
    example_inputs, example_kwargs = _as_inputs(example_inputs, example_kwargs)
    _check_arguments(**arguments)
    if masks is not None and not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict of target name -> keep-mask tensor, got {type(masks).__name__}")
    return spec, example_inputs, example_kwargs


def _select(spec: SparsitySpec, model: nn.Module) -> tuple[Selection, dict[str, torch.Tensor]]:
    """What ``spec`` selects in ``model``, read from names and types, with the shape-dependent option errors
    (N:M on an indivisible dim, ...); and the importance-score tensors its rules name."""
    targets = resolve_weight_targets(spec, model)
    hessian_layers = sparsegpt_layers(model, targets)  # Linear only, errors name the layer
    check_options(
        (name, t.rule.method, tuple(find_tensor(model, name).shape), dict(t.rule.options), t.group)  # type: ignore[union-attr]
        for name, t in targets.items()
    )
    _warn_counts(targets, model)
    selection = Selection(
        spec,
        param_aliases(model),
        targets,
        layers=resolve_activation_targets(spec, model),
        norm_layers=_wanda_layers(model, targets),
        hessian_layers=hessian_layers,
    )
    return selection, _score_tensors(model, targets)


def _state_dict_layout(model: nn.Module) -> tuple[tuple[str, ...], dict[str, int]]:
    """The keys of ``model.state_dict()`` and the ``_version`` its metadata records per module prefix (squash
    gives both back: a module whose ``_load_from_state_dict`` reads the version loads the squashed weights)."""
    original = model.state_dict()
    versions = {
        prefix: meta["version"]
        for prefix, meta in getattr(original, "_metadata", {}).items()
        if meta.get("version") is not None
    }
    return tuple(original.keys()), versions


def _capture(
    model: nn.Module, work: nn.Module, spec: SparsitySpec, inplace: bool, **options: Any
) -> tuple[GraphModule, str]:
    """``work`` captured as a graph (``capture_graph``): the GraphModule and ``"fx"`` or ``"export"``."""
    with attention_as_op(heads_attention(spec, work)):  # heads rules: each nn.MultiheadAttention one call
        captured = capture_graph(work, **options)
    gm = captured.gm
    if gm is work and isinstance(model, GraphModule) and inplace:
        # the user's GraphModule keeps its own graph, modules and buffers even in place (parameters are shared)
        gm = GraphModule(gm, quiet_deepcopy(gm.graph), type(gm).__name__)
    return gm, captured.capture


def _plan_channels(
    gm: GraphModule,
    selection: Selection,
    model: nn.Module,
    captured_by: str,
    example_inputs: tuple[Any, ...] | None,
    example_kwargs: dict[str, Any] | None,
) -> None:
    """The channel groups, planned on the captured graph before any mask node: those of 'channels' rules, and
    the zero channels other rules leave where the shapes are known; their members join the weight targets."""
    spec = selection.spec
    shapes_known = example_inputs is not None or example_kwargs is not None or captured_by == "export"
    if spec.channels or (passive_rules(spec) and shapes_known):
        plan = plan_channels(gm, spec, model, selection.aliases, example_inputs, example_kwargs)
        selection.targets = {**selection.targets, **_channel_targets(plan, selection.targets)}
        selection.channels = plan


def _insert_masks(
    gm: GraphModule, selection: Selection, work: nn.Module, scores: Mapping[str, torch.Tensor]
) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """Observers and mask nodes, one pass each (run_passes names a failing one); what the observer passes
    created (target → names) and what the weight pass created."""
    passes: list[Pass] = [insert_activation_masks, insert_hessian_observers]
    if selection.channels is not None:
        passes.append(_insert_channel_observers)
    passes.append(insert_weight_masks)
    results = run_passes(gm, selection, passes)
    activations = {**results[0].created, **results[1].created}
    for path in scores:  # importance scores stay reachable from the sparse module
        if find_tensor(gm, path) is None:
            attach_tensor(gm, path, find_tensor(work, path))  # type: ignore[arg-type]
    return activations, results[-1].created


def _insert_channel_observers(gm: GraphModule, selection: Selection) -> PassResult:
    """The consumers' input statistics of calibrated channels rules (and the calibration inputs of sequential ones)."""
    plan = selection.channels
    assert plan is not None
    plan.observers = insert_channel_observers(gm, plan, selection.aliases)
    sequential = any(seq for _, _, seq, _ in selection.hessian_layers.values())
    if any(r.sequential for r in selection.spec.channels) and not sequential:
        record_calibration_inputs(gm)
    return PassResult(gm, bool(plan.observers), {layer: {"observer": name} for layer, name in plan.observers.items()})


def _records(
    gm: GraphModule,
    work: nn.Module,
    model: nn.Module,
    selection: Selection,
    activations: Mapping[str, dict[str, str]],
    weights: Mapping[str, dict[str, str]],
) -> dict[str, TargetRecord]:
    """One :class:`TargetRecord` per weight and activation target, from what the passes created."""
    records: dict[str, TargetRecord] = {}
    for name, target in selection.targets.items():
        made = weights[name]
        records[name] = TargetRecord(
            name=name,
            kind=_kind(model, name),
            param=made["param"],
            buffer=made["buffer"],
            method=target.rule.method,
            rule=target.rule,
            shape=tuple(gm.get_parameter(made["param"]).shape),
            group=target.group,
            observer=activations.get(name, {}).get("observer"),
            module=made.get("module"),
        )
    for layer, rule in selection.layers.items():
        name = activation_target_name(layer)
        made = activations[name]
        records[name] = TargetRecord(
            name=name,
            kind="activation",
            param=None,
            buffer=made["buffer"],
            method=rule.mask if isinstance(rule.mask, str) else getattr(rule.mask, "__name__", "callable"),
            rule=rule,
            shape=(),
            observer=made["observer"],
            layer=layer,
            layer_type=type(work.get_submodule(layer)),
        )
    return records


def _sparse_module(
    gm: GraphModule,
    state: SparsityState,
    model: nn.Module,
    initial: Mapping[str, Any],
    adopted_from: Mapping[str, str],
    example_inputs: tuple[Any, ...] | None,
    example_kwargs: dict[str, Any] | None,
) -> SparseGraphModule:
    """``gm`` made the SparseGraphModule: the captured mode, the initial masks, a first run on the examples."""
    sgm = SparseGraphModule.wrap(gm, state)
    if state.capture == "export":  # torch.export's module() says training=True whatever it captured
        sgm.train(model.training)
    if initial:
        set_initial_masks(sgm, state, initial, adopted_from)
    if state.spec.mode == "inplace":
        sgm.apply_masks_inplace()
    if example_inputs is not None or example_kwargs is not None:
        _check_runs(sgm, example_inputs or (), example_kwargs or {})
    return sgm


def _channel_targets(plan: ChannelPlan, targets: Mapping[str, WeightTarget]) -> dict[str, WeightTarget]:
    """The masks a channel plan needs; a tensor a weight rule also selects is an error (one mask per tensor)."""
    wanted = plan.targets()
    clash = [name for name in wanted if name in targets]
    if clash:
        raise ValueError(
            f"{', '.join(map(repr, clash[:4]))} belong to channel groups of a 'channels' rule and are also selected by "
            "a 'weights' / 'global' rule; a tensor has one mask: exclude them from the weight rule ('method': "
            "'dense' after it) or from the channels rule"
        )
    return wanted


sparsify_graph.__doc__ = (sparsify_graph.__doc__ or "") + SPEC_KEYS_DOC


def _check_arguments(*, capture: Any, inplace: Any, leaf_modules: Any, concrete_args: Any) -> None:
    """Types that would otherwise misbehave silently: ``inplace="False"`` is truthy, a string of leaf modules
    is iterated letter by letter."""
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {type(inplace).__name__}: {inplace!r}")
    if not isinstance(capture, str):
        raise TypeError(f"capture must be 'fx', 'export' or 'auto', got {type(capture).__name__}: {capture!r}")
    if leaf_modules is not None and (
        isinstance(leaf_modules, (str, bytes, type)) or not isinstance(leaf_modules, Iterable)
    ):
        raise TypeError(
            f"leaf_modules must be a list of module FQNs or nn.Module classes, got {type(leaf_modules).__name__}: "
            f"{leaf_modules!r}; wrap a single one in a list: leaf_modules=[{leaf_modules!r}]"
        )
    if concrete_args is not None and not isinstance(concrete_args, Mapping):
        raise TypeError(f"concrete_args must be a dict of argument name -> value, got {type(concrete_args).__name__}")


def _warn_counts(targets: Mapping[str, WeightTarget], model: nn.Module) -> None:
    """``"sparsity": 50`` on an entry-counting method prunes 50 entries: warn where that looks like a percentage."""
    totals: dict[int, int] = {}
    for name, t in targets.items():
        if t.group is not None:
            totals[t.group] = totals.get(t.group, 0) + find_tensor(model, name).numel()  # type: ignore[union-attr]
    seen: set[int] = set()
    for name, t in targets.items():
        if t.rule.method not in ENTRY_COUNTS or t.group in seen:
            continue
        n = totals[t.group] if t.group is not None else find_tensor(model, name).numel()  # type: ignore[union-attr]
        where = f"global rule over {', '.join(t.rule.targets)}" if t.group is not None else f"target {name!r}"  # type: ignore[union-attr]
        warn_if_percent_like(t.rule.options.get("sparsity"), n, where, stacklevel=user_stacklevel() + 1)
        if t.group is not None:
            seen.add(t.group)


def _kind(model: nn.Module, name: str) -> str:
    """ "embedding" for the table of an ``nn.Embedding`` / ``nn.EmbeddingBag``, else "weight" (the report's column)."""
    owner, _, attr = name.rpartition(".")
    is_table = attr == "weight" and isinstance(model.get_submodule(owner), (nn.Embedding, nn.EmbeddingBag))
    return "embedding" if is_table else "weight"


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as exc:
        raise TypeError(
            f"sparsify_graph copies your model so that it stays unchanged, but copy.deepcopy failed: "
            f"{type(exc).__name__}: {exc}\nPass inplace=True to rewrite the model itself, or remove what cannot "
            "be copied first (e.g. torch.nn.utils.remove_weight_norm)."
        ) from exc


def _wanda_layers(model: nn.Module, targets: Mapping[str, WeightTarget]) -> dict[str, str]:
    """Layer FQN → weight target for rules with ``"scores": "wanda"`` (|W|·‖X‖, Linear weights only)."""
    out = {}
    for name, target in targets.items():
        if getattr(target.rule, "scores", None) != "wanda":
            continue
        layer = name.rpartition(".")[0]
        if not name.endswith(".weight") or not isinstance(model.get_submodule(layer), nn.Linear):
            raise ValueError(
                f"'scores': 'wanda' ranks a Linear weight by |W|·‖X‖ of its input; {name!r} is not the weight of "
                "an nn.Linear. Select Linear layers for this rule."
            )
        out[layer] = name
    return out


def _score_tensors(model: nn.Module, targets: Mapping[str, WeightTarget]) -> dict[str, torch.Tensor]:
    """Importance-score tensors named by FQN in the rules (a ``KeyError`` if one is missing)."""
    found = {}
    for target in targets.values():
        path = getattr(target.rule, "scores", None)
        if not isinstance(path, str) or path == "wanda":
            continue
        value = find_tensor(model, path)
        if value is None:
            raise KeyError(
                f"rule for {target.name!r}: importance scores {path!r} are not a parameter or buffer of the model; "
                "register them with model.register_buffer(name, tensor) or pass a callable weight -> scores"
            )
        found[path] = value
    return found


def _check_runs(sgm: SparseGraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Run the rewritten module once; leave no trace of it (observer statistics, BatchNorm running stats)."""
    saved = {name: b.clone() for name, b in sgm.named_buffers()}
    observers = [m for m in sgm.modules() if isinstance(m, ActivationObserver)]
    for observer in observers:
        observer.enabled = False
    try:
        with torch.no_grad():
            sgm(*args, **kwargs)
    except Exception as exc:
        raise ValueError(
            f"the rewritten module failed on example_inputs: {type(exc).__name__}: {exc}. Check that the example "
            "inputs match the model's forward; if the unmodified model runs on them, please report this as a bug."
        ) from exc
    finally:
        for observer in observers:
            observer.enabled = True
        with torch.no_grad():
            for name, b in sgm.named_buffers():
                if name in saved and b.shape == saved[name].shape:
                    b.copy_(saved[name])


def _sparse(gm: Any, what: str) -> None:
    if not isinstance(gm, SparseGraphModule):
        raise TypeError(
            f"fxs.{what}() needs a SparseGraphModule, got {type(gm).__name__}; build one with "
            f"sgm = fxs.sparsify_graph(model, spec), then call fxs.{what}(sgm)"
        )


def step(gm: SparseGraphModule) -> None:
    """Function form of :meth:`SparseGraphModule.step`."""
    _sparse(gm, "step")
    gm.step()


def squash(gm: SparseGraphModule, **options: Any) -> GraphModule:
    """Function form of :meth:`SparseGraphModule.squash` (``shrink=``, ``storage=``, ``batch_size=`` pass through)."""
    _sparse(gm, "squash")
    return gm.squash(**options)


def masks(gm: SparseGraphModule) -> dict[str, Any]:
    """Function form of :meth:`SparseGraphModule.masks`."""
    _sparse(gm, "masks")
    return gm.masks()


def sparsity(gm: SparseGraphModule) -> dict[str, float]:
    """Function form of :meth:`SparseGraphModule.sparsity`."""
    _sparse(gm, "sparsity")
    return gm.sparsity()


def report(gm: SparseGraphModule) -> str:
    """Function form of :meth:`SparseGraphModule.report`."""
    _sparse(gm, "report")
    return gm.report()
