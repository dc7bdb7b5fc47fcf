"""What fx_sparsify knows about a sparse module besides its graph and tensors.

This module sits below the passes: ``api`` → ``sparse_graph_module`` → ``passes`` → ``state``,
``methods``, ``ops``. A pass takes ``(gm, state)`` and never imports the facade.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from torch import nn

from .schedule import scheduled_sparsity
from .spec import ActivationRule, ChannelRule, GlobalRule, SparsitySpec, WeightRule

if TYPE_CHECKING:  # annotations only: the state sits below the passes and never imports them at run time
    from .passes.channels import ChannelPlan
    from .passes.sparse_storage import StorageChoice

__all__ = ["Calibration", "SparsityState", "TargetRecord", "current_options", "masks_of", "sparsity_of", "state_of"]


@dataclass
class TargetRecord:
    """One sparsified tensor: where its value and mask live in the module and how it is computed."""

    name: str
    kind: str  # "weight" | "embedding" | "activation"
    param: str | None  # path of the parameter inside the module (weights)
    buffer: str  # root attribute holding the mask
    method: str
    rule: WeightRule | GlobalRule | ActivationRule | ChannelRule
    shape: tuple[int, ...]
    group: int | None = None
    observer: str | None = None  # the observer module feeding this target (activations, Wanda scores)
    module: str | None = None  # supermask / joint: the Sparsify module holding the learnable scores
    layer: str | None = None  # activations: the layer whose input is masked
    layer_type: type | None = None  # activations: that layer's class in the original model

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Calibration:
    """The calibration forwards that ``"sequential": true`` sparsegpt targets keep until the next step
    (reconstruct.py)."""

    # (args, kwargs) of every calibration forward since the last step; None: none recorded
    inputs: list[tuple[tuple[Any, ...], dict[str, Any]]] | None = None
    # observers that listen only when step() runs the recorded inputs again; None: not decided yet
    deferred: set[str] | None = None
    replaying: bool = False  # step() is running the recorded inputs again (they are not recorded twice)


@dataclass
class SparsityState:
    """Everything fx_sparsify knows about a SparseGraphModule besides its graph and tensors."""

    spec: SparsitySpec
    capture: str
    targets: dict[str, TargetRecord]
    state_keys: tuple[str, ...]
    class_name: str
    aliases: dict[str, str] = field(default_factory=dict)
    # module prefix -> the ``_version`` the original model's ``state_dict()`` metadata recorded for it:
    # a module whose ``_load_from_state_dict`` reads it (torchvision's MNASNet) loads squash's output right
    versions: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    channels: ChannelPlan | None = None  # the channel groups of the spec's 'channels' rules (SPEC §10)
    inplace: bool = False  # sparsify_graph(inplace=True): squash may zero pruned weights in place (SPEC §15)
    # export capture: (training when captured, its mode-dependent modules); train() / eval() warn
    export_mode: tuple[bool, list[str]] | None = None
    storage: list[StorageChoice] | None = None  # the layer choices of the last squash(storage=...) (SPEC §11)
    initial_masks: dict[str, str] = field(default_factory=dict)  # target -> "adopted" / "initial mask" (SPEC §14)
    adopted_from: dict[str, str] = field(default_factory=dict)  # target -> the pruning tool its mask came from
    reconstructed: set[str] = field(default_factory=set)  # targets whose weights a step rewrote (SPEC §16)
    calibration: Calibration = field(default_factory=Calibration)

    def __setstate__(self, saved: dict[str, Any]) -> None:
        """Unpickle; a state pickled with the earlier string-keyed ``extra`` dict is read into the fields."""
        extra = saved.pop("extra", None) or {}
        for f in fields(SparsityState):  # fields newer than the pickle take their defaults
            if f.name not in saved and f.default_factory is not MISSING:
                saved[f.name] = f.default_factory()
            elif f.name not in saved and f.default is not MISSING:
                saved[f.name] = f.default
        self.__dict__.update(saved)
        for key in ("channels", "inplace", "export_mode", "storage", "initial_masks", "adopted_from"):
            if key in extra:
                setattr(self, key, extra[key])
        self.reconstructed = set(extra.get("reconstructed", self.reconstructed))
        if "calibration_inputs" in extra or "deferred_observers" in extra:
            self.calibration = Calibration(extra.get("calibration_inputs"), extra.get("deferred_observers"))


def current_options(state: SparsityState, record: TargetRecord) -> dict[str, Any]:
    """The method options of ``record`` at ``state``'s current step (a schedule moves the sparsity)."""
    options = dict(record.rule.options)
    schedule = getattr(record.rule, "schedule", None)
    if schedule is not None:
        options["sparsity"] = scheduled_sparsity(schedule, options.get("sparsity") or 0.0, state.steps)
        options.pop("density", None)
    return options


def state_of(gm: Any) -> SparsityState:
    """The :class:`SparsityState` of a SparseGraphModule; a ``TypeError`` for anything else."""
    state = getattr(gm, "__dict__", {}).get("_fxs")
    if not isinstance(state, SparsityState):
        raise TypeError(
            f"expected a SparseGraphModule (the result of fxs.sparsify_graph(model, spec)), got "
            f"{type(gm).__name__}; call fxs.sparsify_graph first"
        )
    return state


def masks_of(gm: nn.Module, state: SparsityState) -> dict[str, Any]:
    """Target name → boolean keep-mask (True = kept); a list of masks for per-feature activations."""
    out: dict[str, Any] = {}
    for name, r in state.targets.items():
        keep = gm.get_buffer(r.buffer) != 0
        per_feature = r.kind == "activation" and getattr(r.rule, "features", None) is not None
        out[name] = list(keep.unbind(0)) if per_feature and keep.dim() else keep
    return out


def sparsity_of(gm: nn.Module, state: SparsityState) -> dict[str, float]:
    """Target name → achieved fraction of zeros in the mask."""
    out = {}
    for name, r in state.targets.items():  # counted in place: no bool copy of every mask, no int64 copy to sum
        mask = gm.get_buffer(r.buffer)
        out[name] = 1.0 - int(mask.count_nonzero()) / max(mask.numel(), 1)
    return out
