"""``ActivationObserver``: the identity node that aggregates a layer's input statistics (SPEC §5).

The statistic follows ``torch.ao.pruning``'s ``ActivationSparsifier``: it starts at zeros and each batch
is folded in with ``aggregate(stat, x)``; ``step()`` computes ``reduce(stat)`` and restarts.
With ``features`` / ``feature_dim``, one statistic per selected slice ``x.index_select(feature_dim, [f])``.

For the sum-like built-ins (``sum``, ``abs_sum``, ``sq_sum``) with ``reduce`` ``mean`` or ``sum`` the
batch dim is summed away as each batch arrives (``compact``): memory does not grow with the batch,
calibration batches may differ in size, and with equal batch sizes the result equals the reference's
exactly (``mean`` divides by the average batch size). Other combinations keep the per-sample
statistic, as the reference does, so their calibration batches must share a shape.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ._load_checks import check_extra_counts

__all__ = ["ActivationObserver", "AGGREGATES", "REDUCES"]

AGGREGATES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "sum": lambda acc, x: acc + x,
    "abs_sum": lambda acc, x: acc + x.abs(),
    "sq_sum": lambda acc, x: acc + x * x,
    "max": torch.maximum,
    "abs_max": lambda acc, x: torch.maximum(acc, x.abs()),
}


def _identity(x: Tensor) -> Tensor:  # a named function, not a lambda: observers must pickle
    return x


_ELEMENTWISE: dict[str, Callable[[Tensor], Tensor]] = {"sum": _identity, "abs_sum": torch.abs, "sq_sum": torch.square}
REDUCES: dict[str, Callable[[Tensor], Tensor]] = {
    "mean": lambda t: t.mean(dim=0),
    "sum": lambda t: t.sum(dim=0),
    "none": lambda t: t,
    "features_sum": lambda t: t.reshape(-1, t.shape[-1]).sum(dim=0),  # internal: per-input-feature (Wanda)
}


class ActivationObserver(nn.Module):
    """Identity on its input; folds each batch into a running statistic while ``enabled``."""

    def __init__(
        self,
        aggregate: str | Callable[[Tensor, Tensor], Tensor] = "sum",
        reduce: str | Callable[[Tensor], Tensor] = "mean",
        features: tuple[int, ...] | None = None,
        feature_dim: int | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        self.aggregate = aggregate
        self.reduce = reduce
        self.features = tuple(features) if features is not None else None
        self.feature_dim = feature_dim
        self.name = name
        self.layer = ""  # the layer whose input it observes (set by the pass that inserts it)
        self.enabled = True
        self.compact = (
            isinstance(aggregate, str) and aggregate in _ELEMENTWISE and reduce in ("mean", "sum", "features_sum")
        )
        self._elementwise = _ELEMENTWISE.get(aggregate) if self.compact else None  # type: ignore[arg-type]
        # one statistic, no feature slices: ``stat`` has reduce's shape (no leading feature dim)
        self._fast = self.compact and self.features is None and reduce != "features_sum"
        self.register_buffer("stat", torch.zeros(0))
        self.samples = 0  # rows seen since the last step (state_dict: extra state)
        self.batches = 0  # batches seen since the last step
        self.input_shape: tuple[int, ...] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:  # still record the input shape (squash and the report use it)
            self.__dict__["input_shape"] = x.shape
            return x
        if torch.is_grad_enabled():
            with torch.no_grad():
                self._observe(x.detach())
        else:
            self._observe(x)
        return x

    def _parts(self, x: Tensor) -> list[Tensor]:
        if self.features is None:
            return [x]
        dim = self.feature_dim
        self._check_features(x)
        return [x.index_select(dim, torch.tensor([f], device=x.device)) for f in self.features]  # type: ignore[arg-type]

    def _observe(self, x: Tensor) -> None:
        # Plain attributes are updated through ``__dict__``: ``nn.Module.__setattr__`` costs ~1.5 µs a
        # call, which was most of the observer's per-forward overhead.
        attrs = self.__dict__
        attrs["input_shape"] = shape = x.shape
        rows = shape[0] if shape else 1
        if self._fast:  # the hot path: one or two ops per batch
            new = (x if self.aggregate == "sum" else self._elementwise(x)).sum(0)  # type: ignore[misc]
            stat: Tensor = self._buffers["stat"]  # type: ignore[assignment]  # set in __init__
            if not self.batches:
                self.stat = new
            elif stat.is_inference() and not torch.is_inference_mode_enabled():
                self.stat = stat + new  # begun under torch.inference_mode: an inference tensor cannot grow in place
            else:
                stat.add_(new)
            attrs["samples"] += rows
            attrs["batches"] += 1
            return
        parts = self._parts(x)
        if self.compact:
            fn = self._elementwise
            if self.reduce == "features_sum":
                new = torch.stack([fn(p).reshape(-1, p.shape[-1]).sum(0) for p in parts])  # type: ignore[misc]
            else:
                new = torch.stack([fn(p).sum(0) for p in parts])  # type: ignore[misc]
        else:
            agg = AGGREGATES[self.aggregate] if isinstance(self.aggregate, str) else self.aggregate
            old = self.stat if self.batches > 0 else None
            if old is not None and old.shape[1:] != parts[0].shape:
                raise ValueError(
                    f"observer {self.name!r} keeps per-sample statistics (aggregate={self._label(self.aggregate)}, "
                    f"reduce={self._label(self.reduce)}) and saw a batch of shape {tuple(parts[0].shape)} after "
                    f"{tuple(old.shape[1:])}; calibrate with batches of one shape, or use a sum-like aggregate "
                    "('sum', 'abs_sum', 'sq_sum') with reduce 'mean' or 'sum', which accept any batch size. "
                    "Once calibrated, squash() gives a module without observers that takes any batch size"
                )
            new = torch.stack([agg(torch.zeros_like(p) if old is None else old[i], p) for i, p in enumerate(parts)])
            self.stat = new
            self.samples += rows
            self.batches += 1
            return
        self.stat = new if self.batches == 0 else self.stat + new
        self.samples += rows
        self.batches += 1

    def _check_features(self, x: Tensor) -> None:
        """A ValueError naming the rule when ``features`` / ``feature_dim`` fall outside the input ``x``."""
        dim, where = self.feature_dim, f"activation rule on {getattr(self, 'layer', '') or self.name!r}"
        if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
            raise ValueError(
                f"{where}: feature_dim {dim} is outside the {x.dim()}-D input of shape {tuple(x.shape)}; "
                f"give a dim in [{-x.dim()}, {x.dim() - 1}]"
            )
        size = x.shape[dim]
        bad = [f for f in self.features or () if not -size <= f < size]
        if bad:
            raise ValueError(
                f"{where}: features {bad} are outside the {size} entries of dim {dim} of its input (shape "
                f"{tuple(x.shape)}); give indices in [0, {size})"
            )

    @staticmethod
    def _label(fn: Any) -> str:
        return repr(fn) if isinstance(fn, str) else getattr(fn, "__name__", type(fn).__name__)

    def reduced(self) -> list[Tensor]:
        """``reduce(stat)`` per selected feature (one entry without features)."""
        if self.batches == 0:
            raise ValueError(f"observer {self.name!r} has seen no data since the last step; run forward passes first")
        if self._fast:
            return [self.stat * (self.batches / self.samples) if self.reduce == "mean" else self.stat]
        if self.compact:
            if self.reduce == "mean":
                scale = self.batches / self.samples
                return [s * scale for s in self.stat]
            return list(self.stat)
        reduce = REDUCES[self.reduce] if isinstance(self.reduce, str) else self.reduce
        return [reduce(s) for s in self.stat]

    def reset(self) -> None:
        self.stat = torch.zeros(0, device=self.stat.device)
        self.samples = 0
        self.batches = 0

    def get_extra_state(self) -> dict[str, int]:
        return {"samples": self.samples, "batches": self.batches}

    def set_extra_state(self, state: dict[str, int]) -> None:
        counts = check_extra_counts(state, ("samples", "batches"), f"observer {self.name!r}")
        self.samples, self.batches = counts["samples"], counts["batches"]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        incoming = state_dict.get(prefix + "stat")
        if incoming is not None and incoming.shape != self.stat.shape:
            self.stat = torch.empty_like(incoming, device=self.stat.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"aggregate={self._label(self.aggregate)}, reduce={self._label(self.reduce)}, "
            f"features={self.features}, feature_dim={self.feature_dim}, batches={int(self.batches)}"
        )
