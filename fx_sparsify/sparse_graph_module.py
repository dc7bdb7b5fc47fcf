"""``SparseGraphModule``: the rewritten model, with its masks and the methods that drive them."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from . import ops
from ._caller import user_stacklevel
from ._export_capture import LEAFSPEC_WARNING, warn_mode
from ._load_checks import check_extra_counts, check_state_dict
from ._meta import META_KEY
from ._step_lock import exclusive, shared, step_lock
from .passes.channels import shrink_plan_table
from .passes.shrink import channel_keeps, remove_channels
from .passes.sparse_storage import apply_sparse_storage, check_storage
from .passes.squash import fold_masks
from .passes.update_masks import apply_masks_inplace, update_masks
from .report import report_table, target_sparsity_of
from .roundtrip import attach_prune_hooks
from .squash_into import write_into
from .state import SparsityState, TargetRecord, current_options, masks_of, sparsity_of

__all__ = ["SparseGraphModule", "SparsityState", "TargetRecord"]  # the last two re-exported from state

_NO_CHANNELS = (
    "{call}: the spec has no 'channels' rule, so there are no channels to remove; returning the plain "
    "squash (pruned weights zeroed, shapes unchanged). Add a rule such as {{'channels': [{{'target': "
    "'type:Conv2d', 'sparsity': 0.5}}]}} to shrink, or drop shrink=True"
)


class SparseGraphModule(GraphModule):
    """A ``torch.fx.GraphModule`` whose sparsified tensors pass through explicit mask nodes.

    Build one with :func:`fx_sparsify.sparsify_graph`. Calling it runs the masked model.
    """

    _fxs: SparsityState
    _ddp_params_and_buffers_to_ignore: list[str]  # read by DistributedDataParallel

    @classmethod
    def wrap(cls, gm: GraphModule, state: SparsityState) -> SparseGraphModule:
        """Turn ``gm`` itself into a SparseGraphModule (no copy of its modules, one recompile)."""

        class GraphModuleImpl(cls):  # type: ignore[valid-type,misc]  # the per-instance class fx expects
            pass

        GraphModuleImpl.__name__ = state.class_name
        for attr in ("train", "eval"):  # torch.export's module() blocks these per instance; ours switch modes
            gm.__dict__.pop(attr, None)
        gm.__class__ = GraphModuleImpl
        sgm: SparseGraphModule = gm  # type: ignore[assignment]
        sgm.recompile()
        sgm._fxs = state
        # DDP must not broadcast rank 0's running statistics or the masks that change shape at step()
        # (each rank aggregates its own batches; step() all-reduces them): keep them rank-local
        activation_masks = {r.buffer for r in state.targets.values() if r.kind == "activation"}
        sgm._ddp_params_and_buffers_to_ignore = [
            name
            for name, _ in sgm.named_buffers()
            if name.rsplit(".", 1)[-1] in ("stat", "mask") or name in activation_masks
        ]
        sgm._mark_cache()
        return sgm

    @exclusive  # a forward in flight runs in one mode throughout
    def train(self, mode: bool = True) -> SparseGraphModule:
        super().train(mode)
        self._mark_cache()
        captured = self._fxs.export_mode if "_fxs" in self.__dict__ else None
        if captured:  # (training when captured, mode-dependent modules): the graph cannot switch them
            warn_mode(self._fxs.class_name, captured[0], captured[1], bool(mode))
        return self

    @exclusive
    def _apply(self, *args: Any, **kwargs: Any) -> SparseGraphModule:  # .to() / .cuda() / .half() make new masks
        super()._apply(*args, **kwargs)
        self._mark_cache()
        return self

    def _mark_cache(self) -> None:
        """Let the mask nodes cache ``weight * mask`` under no_grad only in eval mode (see ops.py)."""
        if "_fxs" in self.__dict__:
            ops.set_cacheable(
                [self.get_buffer(r.buffer) for r in self._fxs.targets.values() if r.kind != "activation"],
                not self.training,
            )

    # --- the public methods (SPEC §2) -------------------------------------------------------------
    def step(self, verbose: bool = True) -> None:
        """Recompute every mask from the current weights (and activation statistics).

        SparseGPT targets show their per-layer progress on stderr (a tqdm bar where tqdm is installed, else one
        line per layer); ``verbose=False`` shows nothing.
        """
        with step_lock(self).writing():  # forwards in other threads see all old or all new masks
            update_masks(self, self._fxs, verbose=verbose)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # traced by torch.compile / strict torch.export: no Python lock
            return super().__call__(*args, **kwargs)
        with step_lock(self).reading():
            return super().__call__(*args, **kwargs)

    def recompile(self) -> Any:
        """fx's recompile; the generated ``forward`` also takes the module's lock when it is called directly."""
        made = super().recompile()
        cls = type(self)
        cls.forward = shared(cls.forward)  # a fresh function at every recompile
        return made

    @shared
    def masks(self) -> dict[str, Any]:
        """Target name → boolean keep-mask (True = kept); a list of masks for per-feature activations."""
        return masks_of(self, self._fxs)

    @shared
    def sparsity(self) -> dict[str, float]:
        """Target name → achieved fraction of zeros in the mask."""
        return sparsity_of(self, self._fxs)

    @shared
    def report(self) -> str:
        """A table of every target: kind, method, shape, target and achieved sparsity, fate at squash."""
        return report_table(self, self._fxs)

    @shared
    def squash(self, shrink: bool = False, storage: Any = "dense", batch_size: int = 1) -> GraphModule:
        """A plain GraphModule with the masks folded into the constants; ``self`` is unchanged.

        ``shrink=True`` also removes the channels that ``channels`` rules pruned.
        ``storage``: ``"dense"``, ``"csr"``, ``"bsr"`` or ``"auto"`` (sparse only where faster at
        ``batch_size`` rows) keeps masked Linear / 1x1 Conv weights sparse; ``report()`` then says which and why.
        ``"semi_structured"`` (CUDA, float16 / bfloat16) stores 2:4-masked Linear weights for sparse tensor cores.
        ``"bitmask"``: kept values + a 1-bit mask and a fused CPU kernel (``"auto"`` weighs it too;
        ``"auto-model"`` picks dense or bitmask by a cost model, no timing). A previous squash's
        ``small.storage_choices`` (or a ``{layer: storage}`` dict) as ``storage`` gives every layer its
        recorded storage again.
        """
        check_storage(storage, batch_size)
        self._warn_unstepped("squash()")
        if shrink and self._fxs.channels is None:
            warnings.warn(_NO_CHANNELS.format(call="squash(shrink=True)"), UserWarning, stacklevel=user_stacklevel())
            shrink = False
        out = self._squash_shrunk()[0] if shrink else fold_masks(self, self._fxs).gm
        if storage != "dense":
            self._fxs.storage = apply_sparse_storage(out, self._fxs, storage, batch_size).choices
            out.storage_choices = self._fxs.storage  # type: ignore[assignment]  # the public record on the squashed module (SPEC §18)
        return out

    def _warn_unstepped(self, call: str) -> None:
        """Warn once (at the user's call) when nothing was ever pruned: no step() yet and every mask keeps all."""
        state = self._fxs
        if (
            state.steps
            or self.__dict__.get("_fxs_warned_unstepped")
            or any(not bool(self.get_buffer(r.buffer).all()) for r in state.targets.values())
        ):
            return
        self.__dict__["_fxs_warned_unstepped"] = True
        warnings.warn(
            f"{call} before any step(): every mask still keeps everything, so the result is the unpruned "
            "model; call sgm.step() first (after the calibration forward passes, if any)",
            UserWarning,
            stacklevel=user_stacklevel(),
        )

    @shared
    def shrink_plan(self) -> str:
        """A table of the channel groups: members, channels before → after, removable or why not."""
        if self._fxs.channels is None:
            return "fx_sparsify shrink plan: no 'channels' rules in the spec, nothing to shrink"
        notes: dict[int, str] = {}
        keeps = channel_keeps(self, self._fxs, notes)
        return shrink_plan_table(self._fxs.channels, keeps, notes)

    def _squash_shrunk(self) -> tuple[GraphModule, dict[int, torch.Tensor]]:
        """The dense squash with the pruned channels removed, and the keep vectors (group id → keep) it used."""
        out = fold_masks(self, self._fxs).gm
        keeps = channel_keeps(self, self._fxs)
        remove_channels(out, self._fxs, keeps)
        return out, keeps

    @shared
    def squash_into(self, model: torch.nn.Module, shrink: bool = False) -> torch.nn.Module:
        """Write the squashed weights into your own eager ``model`` (in place) and return it.

        The model keeps its class and methods (a Hugging Face model keeps ``save_pretrained``). Its
        tensors must have the original model's names and shapes (a dense squash: no ``shrink``).
        ``shrink=True`` resizes the model's tensors, module attributes and, for a Hugging Face
        model, its config (same widths in every layer), so ``save_pretrained`` → ``from_pretrained`` reloads it.
        """
        self._warn_unstepped("squash_into()")
        if shrink and self._fxs.channels is None:
            warnings.warn(
                _NO_CHANNELS.format(call="squash_into(model, shrink=True)"), UserWarning, stacklevel=user_stacklevel()
            )
        elif shrink:
            shrunk, keeps = self._squash_shrunk()
            return write_into(self, self._fxs, shrunk, model, keeps)
        return write_into(self, self._fxs, fold_masks(self, self._fxs).gm, model)

    @shared
    def to_torch_prune(self, model: torch.nn.Module) -> torch.nn.Module:
        """Apply the weight masks to the eager ``model`` with ``torch.nn.utils.prune.custom_from_mask``."""
        return attach_prune_hooks(self, self._fxs, model)

    def draw(self, path: Any, module: str | None = None) -> Any:
        """Write a picture of the rewritten graph (``.svg`` / ``.png``; extra ``viz``); ``module`` draws one
        submodule."""
        from .viz import draw

        return draw(self, path, module=module)

    def target_sparsity(self) -> dict[str, float | None]:
        """Target name → the sparsity its rule aims for at the current step (None where it has none)."""
        groups: dict[int, int] = {}
        for r in self._fxs.targets.values():
            if r.group is not None:
                groups[r.group] = groups.get(r.group, 0) + r.numel
        return {  # an int count is of the group's entries (global rules), or of slices / blocks
            name: target_sparsity_of(
                r.method,
                current_options(self._fxs, r),
                r.numel,
                r.shape,
                groups.get(r.group) if r.group is not None else None,
            )
            for name, r in self._fxs.targets.items()
            if r.kind != "activation"
        }

    def keep_sparse(self, optimizer: torch.optim.Optimizer) -> Any:
        """``"mode": "inplace"``: re-zero the pruned weights after every ``optimizer.step()``.

        Returns the hook handle (``handle.remove()`` detaches it).
        """
        if self._fxs.spec.mode != "inplace":
            raise ValueError(
                "keep_sparse() is for specs with 'mode': 'inplace'; in graph mode the masks are in the graph"
            )

        def rezero(opt: Any, args: Any, kwargs: Any) -> None:
            self.apply_masks_inplace()

        return optimizer.register_step_post_hook(rezero)

    @exclusive
    def apply_masks_inplace(self) -> None:
        """Multiply every masked weight by its mask in place (``"mode": "inplace"``)."""
        apply_masks_inplace(self, self._fxs)

    # --- state, copies and pickling ----------------------------------------------------------------
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # everything is checked before anything is written (the root loads before its submodules); torch
        # passes strict=True here whatever the caller asked, so load_state_dict below records the caller's
        check_state_dict(self, self._fxs, state_dict, prefix, self.__dict__.get("_fxs_strict", False))
        # masks of another dtype load in the module's (a float64 mask would turn the layer's input or weight
        # float64; with assign=True the module would take the dict's tensor as it is)
        cast: dict[str, torch.Tensor] = {}
        for r in self._fxs.targets.values():
            incoming = state_dict.get(prefix + r.buffer)
            current = self.get_buffer(r.buffer)
            if not isinstance(incoming, torch.Tensor):
                continue
            if incoming.dtype != current.dtype:
                cast[prefix + r.buffer] = incoming.to(current.dtype)
            if r.kind == "activation" and incoming.shape != current.shape:
                # activation masks take their shape at the first step(): adopt the saved shape on the module's device
                setattr(self, r.buffer, torch.empty(incoming.shape, dtype=current.dtype, device=current.device))
                r.shape = tuple(incoming.shape)
        super()._load_from_state_dict({**state_dict, **cast} if cast else state_dict, prefix, *args, **kwargs)

    @shared
    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return super().state_dict(*args, **kwargs)

    @exclusive
    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        self.__dict__["_fxs_strict"] = bool(strict)
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            self.__dict__.pop("_fxs_strict", None)

    def get_extra_state(self) -> dict[str, Any]:
        return {"steps": self._fxs.steps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._fxs.steps = check_extra_counts(state, ("steps",), "the sparse module's extra state")["steps"]

    @shared  # a copy (or a pickle) made while a step runs elsewhere gets all old or all new masks
    def __deepcopy__(self, memo: dict[int, Any]) -> SparseGraphModule:
        with warnings.catch_warnings():  # torch's pytree on an export capture's codegen (quiet_deepcopy)
            warnings.filterwarnings("ignore", message=LEAFSPEC_WARNING, category=FutureWarning)
            res: SparseGraphModule = super().__deepcopy__(memo)  # type: ignore[assignment]  # of our class
        res._fxs = copy.deepcopy(self._fxs, memo)
        res._mark_cache()
        return res

    @shared
    def __reduce__(self) -> tuple[Any, ...]:
        # GraphModule pickles its generated code and re-traces it on load, which would trace through
        # the fx_sparsify ops (a straight-through mask would become a plain multiply) and lose the
        # node annotations: pickle the graph's nodes themselves instead
        if self._fxs.capture == "export":
            raise TypeError(
                "an export-captured SparseGraphModule cannot be pickled or torch.save()d whole (the "
                "module torch.export builds holds local functions). Save sgm.state_dict() and rebuild "
                "with sparsify_graph(model, spec, capture='export', ...) + load_state_dict(), or "
                "copy.deepcopy(sgm) within a process."
            )
        body = {k: v for k, v in self.__dict__.items() if k != "_graph"}
        return (_rebuild, (body, _graph_records(self.graph), self.graph._codegen, self.training))

    def __copy__(self) -> SparseGraphModule:
        return copy.deepcopy(self)

    def __str__(self) -> str:
        return f"SparseGraphModule({self._fxs.class_name}, {len(self._fxs.targets)} targets)\n{super().__str__()}"

    def __repr__(self) -> str:  # nn.Module's alone shows the submodules only, which reads as the original model
        state = self._fxs
        return (
            f"SparseGraphModule({state.class_name}, capture={state.capture}, {len(state.targets)} targets, "
            f"steps={state.steps})\n{torch.nn.Module.__repr__(self)}"
        )


@dataclass(frozen=True)
class _NodeRef:
    """A node argument in a pickled graph: the name of an earlier node."""

    name: str


def _node_ref(node: Node) -> Any:  # Any: map_arg is typed for graph arguments, a _NodeRef stands in for one
    return _NodeRef(node.name)


def _graph_records(graph: torch.fx.Graph) -> list[tuple[Any, ...]]:
    """One picklable tuple per node: op, name, target, args, kwargs, type and the fx_sparsify note."""
    return [
        (
            n.op,
            n.name,
            n.target,
            torch.fx.node.map_arg(n.args, _node_ref),
            torch.fx.node.map_arg(n.kwargs, _node_ref),
            n.type,
            n.meta.get(META_KEY),
        )
        for n in graph.nodes
    ]


def _rebuild(body: dict[str, Any], records: list[tuple[Any, ...]], codegen: Any, training: bool) -> SparseGraphModule:
    graph = torch.fx.Graph()
    graph._codegen = codegen
    env: dict[str, torch.fx.Node] = {}

    def resolve(a: Any) -> Any:
        return torch.fx.node.map_aggregate(a, lambda v: env[v.name] if isinstance(v, _NodeRef) else v)

    for op, name, target, args, kwargs, type_expr, info in records:
        node = graph.create_node(op, target, resolve(args), resolve(kwargs), name=name, type_expr=type_expr)
        assert node.name == name, (node.name, name)
        if info is not None:
            node.meta[META_KEY] = info
        env[name] = node
    gm = GraphModule.__new__(GraphModule)
    gm.__dict__.update(body)
    gm.graph = graph
    sgm = SparseGraphModule.wrap(gm, body["_fxs"])
    sgm.train(training)
    return sgm
