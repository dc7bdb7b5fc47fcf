"""Channel importance from calibration statistics, and the consumer refit (SPEC §17): pure tensor math.

A channel group's units (channels, attention heads, GQA kv groups) are read by one or more *consumer*
layers: the ``Linear`` after an MLP's up projection, an attention block's output projection, the next
``Conv2d`` (through its unfolded input patches). Everything here is computed from each consumer's
weight ``W`` (``out × in``, as the layer multiplies its input rows), its bias, and one statistic of its
calibration inputs::

    gram = Σ_rows [x, 1]ᵀ·[x, 1]        # (in + 1) × (in + 1); gram[-1, -1] is the number of rows

a plain sum over rows (the last column is an appended constant 1), so statistics of several processes
or batches are added as they are, and the mean (``gram[:-1, -1] / rows``) comes with the second moment.

- :func:`activation_scores`: FLAP's fluctuation (An et al. 2024): the variance of each input column
  over the calibration rows times the squared norm of the weight column that reads it, summed over a
  unit's columns and over the group's consumers.
- :func:`obs_scores`: structured Optimal Brain Surgeon (ZipLM, Kurtic et al. 2023; SlimGPT): units are
  removed greedily, each time the one whose removal, with the optimal update of every kept column (and
  the bias), adds least output error ``tr(W_Q·[H⁻¹]_QQ⁻¹·W_Qᵀ)`` summed over consumers; ``block`` units
  go per step (1: exactly greedy). The score of a unit is the running maximum of those added errors in
  removal order, so "keep the highest scores" keeps exactly the units the greedy did not remove, and
  scores of different layers are output errors on the same scale (a global ranking may compare them).
- :func:`refit`: the consumer's new weight and bias for a set of kept units: the exact minimiser of
  ``Σ_rows ‖W·x + b − W'·x_S − b'‖² / rows + λ‖W_S − W'‖²`` (damped least squares; ``λ = damp ×``
  the mean of ``diag(XᵀX) / rows``; with a bias the removed units' mean contribution goes into ``b'``:
  FLAP's bias compensation, here jointly optimal with the kept columns). Without a bias (``bias=None``)
  it is the same problem without ``b``/``b'``.

Importances are registered by name (``"magnitude"``, ``"activation"``, ``"obs"`` are built in) with
:func:`register_channel_importance`; an importance maps a :class:`GroupStats` to one score per unit
(higher = more important, kept first).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "ConsumerStats",
    "GroupStats",
    "ImportanceFn",
    "register_channel_importance",
    "get_channel_importance",
    "available_channel_importances",
    "activation_scores",
    "obs_scores",
    "obs_greedy",
    "refit",
    "damped_gram",
    "corrected_weight",
]


@dataclass
class ConsumerStats:
    """One consumer layer of a group: its weight and bias as it multiplies input rows, the statistic, the columns.

    ``weight``: ``(out, in)``; ``bias``: ``(out,)`` or None (no bias compensation then); ``gram``:
    ``Σ [x, 1]ᵀ[x, 1]`` over the calibration rows, ``(in + 1, in + 1)``; ``columns``: ``(units, width)``
    long, the input columns each unit of the group feeds in this layer.
    """

    name: str
    weight: Tensor
    bias: Tensor | None
    gram: Tensor
    columns: Tensor

    @property
    def rows(self) -> float:
        return float(self.gram[-1, -1])

    def mean(self) -> Tensor:
        """Mean of each input column over the calibration rows (float64)."""
        return self.gram[:-1, -1].double() / max(self.rows, 1.0)

    def variance(self) -> Tensor:
        """Variance of each input column over the calibration rows (population, float64)."""
        mean = self.mean()
        return (self.gram.diagonal()[:-1].double() / max(self.rows, 1.0) - mean * mean).clamp_min(0.0)


@dataclass
class GroupStats:
    """What an importance sees of one channel group: its units, its consumers, its joint weight norm.

    ``pruned``: how many units the rule will remove from this group (None when not known yet: a
    ``global`` rule ranks every unit). ``damp``, ``block``: the rule's options for OBS.
    """

    units: int
    consumers: list[ConsumerStats]
    magnitude: Tensor
    pruned: int | None = None
    damp: float = 0.01
    block: int = 1
    extra: dict[str, object] = field(default_factory=dict)


ImportanceFn = Callable[[GroupStats], Tensor]
_IMPORTANCES: dict[str, tuple[ImportanceFn, bool]] = {}  # name -> (fn, needs calibration)


def register_channel_importance(
    name: str, *, calibrated: bool = True, override: bool = False
) -> Callable[[ImportanceFn], ImportanceFn]:
    """Register ``fn(group: GroupStats) -> Tensor`` (one score per unit, higher = kept) as ``"importance": name``.

    ``calibrated``: the importance reads the consumers' statistics, so ``step()`` needs calibration
    forwards first (False for one that reads only ``group.magnitude`` or the weights). Registering a
    taken name is a ``ValueError`` unless ``override=True``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a channel importance name must be a non-empty string, got {name!r}")

    def decorator(fn: ImportanceFn) -> ImportanceFn:
        if not callable(fn):
            raise TypeError(f"register_channel_importance({name!r}) decorates a function, got {type(fn).__name__}")
        if name in _IMPORTANCES and not override:
            raise ValueError(
                f"a channel importance named {name!r} is already registered; pass override=True to replace it"
            )
        _IMPORTANCES[name] = (fn, bool(calibrated))
        return fn

    return decorator


def get_channel_importance(name: str, where: str = "importance") -> tuple[ImportanceFn, bool]:
    """(fn, needs calibration) of the importance ``name``; a ``KeyError`` with "did you mean" otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"{where}: a channel importance is named by a string, got {type(name).__name__}: {name!r}")
    if name not in _IMPORTANCES:
        known = sorted(_IMPORTANCES)
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(
            f"{where}: unknown channel importance {name!r}.{hint} Known: {', '.join(known)}. Register your "
            "own with @fx_sparsify.register_channel_importance(name)"
        )
    return _IMPORTANCES[name]


def available_channel_importances() -> list[str]:
    return sorted(_IMPORTANCES)


# --- scores ------------------------------------------------------------------------------------------
def activation_scores(group: GroupStats) -> Tensor:
    """FLAP fluctuation: ``Σ_consumers Σ_(columns of the unit) var(x_j) · ‖W[:, j]‖²`` per unit (float64)."""
    total = torch.zeros(group.units, dtype=torch.float64)
    for c in group.consumers:
        per_column = c.variance() * c.weight.detach().double().square().sum(0)
        total += per_column.cpu()[c.columns.cpu()].sum(1)
    return total


def damped_gram(c: ConsumerStats, damp: float) -> tuple[Tensor, Tensor]:
    """(``H``, ``W``): ``H`` the damped second moment of ``[x, 1]`` (``[x]`` without a bias) per row, ``W`` the
    weight with the bias as its last column, in the statistic's dtype (at least float32, as SparseGPT's
    sweep). Dead columns (never non-zero) get a unit diagonal."""
    n = c.weight.shape[1]
    dtype = torch.promote_types(c.gram.dtype, torch.float32)
    h = c.gram.detach().to(dtype) / max(c.rows, 1.0)
    w = c.weight.detach().to(dtype, copy=True)  # the OBS sweep updates it in place
    if c.bias is None:
        h = h[:n, :n].clone()
    else:
        w = torch.cat([w, c.bias.detach().to(dtype).reshape(-1, 1).to(w.device)], 1)
    h = h.to(w.device)
    diag = h.diagonal()[:n]
    dead = diag == 0
    mean = float(diag.mean()) if n else 0.0
    diag.add_(damp * (mean if mean > 0 else 1.0))
    if bool(dead.any()):
        diag[dead] = diag[dead] + 1.0
    return h, w


def _cholesky_inverse(h: Tensor, who: str) -> Tensor:
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError(
            f"{who}: the input second moment is not positive definite; raise 'damp' (e.g. 0.1) or "
            "calibrate on more (or less degenerate) inputs"
        )
    return torch.cholesky_inverse(factor)


@dataclass
class _Sweep:
    """One consumer in the OBS sweep: its weight and H⁻¹ (updated in place), unit columns, live columns."""

    w: Tensor
    hinv: Tensor
    cols: Tensor
    live: int


def obs_greedy(group: GroupStats, remove: int) -> tuple[list[int], list[float]]:
    """Greedy structured OBS: (units in removal order, the output error each removal added), ``remove`` units.

    ``group.block`` units per step (the lowest errors of that step); each step's added error is the exact
    joint error of its units given the earlier removals, split over them in proportion to their own errors.
    """
    units = group.units
    remove = max(0, min(remove, units))
    sweeps = []
    for c in group.consumers:
        h, w = damped_gram(c, group.damp)
        hinv = _cholesky_inverse(h, f"obs importance on {c.name!r}")
        sweeps.append(_Sweep(w, hinv, c.columns.to(w.device), h.shape[0]))
    alive = torch.ones(units, dtype=torch.bool)
    order: list[int] = []
    added: list[float] = []
    while len(order) < remove:
        for sw in sweeps:  # drop removed columns once a quarter of the matrix is dead: later updates get cheaper
            if sw.live < 0.75 * sw.hinv.shape[0]:
                sw.w, sw.hinv, sw.cols = _compact(sw.w, sw.hinv, sw.cols)
                sw.live = sw.hinv.shape[0]
        err = torch.zeros(units, dtype=torch.float64)
        for sw in sweeps:
            err += _unit_errors(sw.w, sw.hinv, sw.cols).cpu()
        err[~alive] = math.inf
        take = min(max(1, group.block), remove - len(order))
        chosen = torch.argsort(err, stable=True)[:take].tolist()
        joint = 0.0
        for sw in sweeps:
            w, hinv = sw.w, sw.hinv
            q = sw.cols[chosen].reshape(-1)
            sw.live -= len(q)
            hq_inv = torch.linalg.inv(hinv[q][:, q])
            wq = w[:, q]
            joint += float(((wq @ hq_inv) * wq).sum())
            step = hq_inv @ hinv[q]  # (|q|, k)
            w.addmm_(wq, step, alpha=-1)
            hinv.addmm_(hinv[:, q], step, alpha=-1)
            w[:, q] = 0.0
            hinv[q, :] = 0.0
            hinv[:, q] = 0.0
        own = err[chosen]
        share = own / own.sum() if float(own.sum()) > 0 else torch.full_like(own, 1.0 / len(chosen))
        for u, s in zip(chosen, share.tolist()):
            alive[u] = False
            order.append(u)
            added.append(joint * s)
    return order, added


def _compact(w: Tensor, hinv: Tensor, cols: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``w``, ``H⁻¹`` without the columns of removed units (zeroed there: a live column's ``[H⁻¹]_jj`` is
    positive), ``cols`` renumbered (removed units point at column 0; they are never read again)."""
    keep = hinv.diagonal() != 0
    at = torch.cumsum(keep.long(), 0) - 1
    at[~keep] = 0
    idx = keep.nonzero().flatten()
    return w[:, idx].contiguous(), hinv[idx][:, idx].contiguous(), at[cols]


def _unit_errors(w: Tensor, hinv: Tensor, cols: Tensor) -> Tensor:
    """``tr(W_u·[H⁻¹]_uu⁻¹·W_uᵀ)`` for every unit ``u`` (columns ``cols[u]``); removed units give nan/inf (masked)."""
    if cols.shape[1] == 1:  # per column first, then gathered: no (out × units) copy
        c = cols[:, 0]
        return w.square().sum(0)[c] / hinv.diagonal()[c]
    sub = hinv[cols.unsqueeze(2), cols.unsqueeze(1)]  # (units, width, width)
    wu = w[:, cols].permute(1, 0, 2)  # (units, out, width)
    inv, info = torch.linalg.inv_ex(sub)
    e = ((wu @ inv) * wu).sum((1, 2))
    return torch.where(info == 0, e, torch.full_like(e, math.inf))


def obs_scores(group: GroupStats) -> Tensor:
    """Running maximum of the greedy's added output error in removal order; units it never removes score
    higher than every removed one (ordered by their error at the last step)."""
    remove = group.units - 1 if group.pruned is None else group.pruned
    order, added = obs_greedy(group, remove)
    scores = torch.empty(group.units, dtype=torch.float64)
    level = -math.inf
    for u, a in zip(order, added):
        level = max(a, math.nextafter(level, math.inf)) if level > -math.inf else a
        scores[u] = level
    removed = set(order)
    rest = [u for u in range(group.units) if u not in removed]
    for i, u in enumerate(rest):  # all above the last removal's level, in unit order
        scores[u] = (abs(level) + 1.0) * 2.0 + i if level > -math.inf else float(i)
    return scores


def refit(c: ConsumerStats, keep: Tensor, damp: float) -> tuple[Tensor, Tensor | None]:
    """The consumer's (weight, bias) refit on its kept units' columns (``keep``: bool per unit).

    Removed units' columns are 0; the kept columns and the bias minimise the damped output error (module
    docstring). Returned in the weight's / bias's dtype and device.
    """
    h, w = damped_gram(c, damp)
    n = c.weight.shape[1]
    cols = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    cols[c.columns[~keep.to(c.columns.device)].reshape(-1).to(h.device)] = False
    s = cols.nonzero().flatten()
    factor, info = torch.linalg.cholesky_ex(h[s][:, s])
    if int(info) != 0:
        raise ValueError(
            f"reconstruct on {c.name!r}: the kept inputs' second moment is not positive definite; "
            "raise 'damp' (e.g. 0.1) or calibrate on more inputs"
        )
    new = torch.zeros_like(w)
    new[:, s] = torch.cholesky_solve(h[s] @ w.T, factor).T  # V_S = W·H[:, S]·H[S, S]⁻¹
    weight = new[:, :n].to(c.weight.dtype)
    bias = None if c.bias is None else new[:, n].to(c.bias.dtype)
    return weight, bias


def corrected_weight(
    c: ConsumerStats, cross: Tensor, damp: float, residual: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """The consumer's (weight, bias) that best reproduce its *calibration* outputs from its current inputs.

    In sequential pruning the layers before a consumer are already pruned, so its inputs ``x'`` differ
    from those of the calibration forwards ``x``. ``cross = Σ [x', 1]ᵀ·[x, 1]`` (the same rows, paired);
    ``c.gram`` the statistic of ``x'``. Returns the damped least-squares fit of ``W·x + b`` from ``[x', 1]``
    on all columns; with it as the consumer's weight, :func:`obs_scores` and :func:`refit` minimise the
    error against the calibration outputs (the fit's own residual is a constant they do not change).

    ``residual = Σ [x', 1]ᵀ·(r − r')`` (``(in + 1) × out``), for a consumer whose output is added to a
    stream that was ``r`` in the calibration forwards and is ``r'`` now: the fit's target becomes
    ``W·x + b + r − r'``, the add's calibration result less what the stream now brings.
    """
    h, w = damped_gram(c, damp)
    n = c.weight.shape[1]
    k = h.shape[0]
    target = cross.detach().to(h.dtype).to(h.device)[:k, :k] / max(c.rows, 1.0) @ w.T  # Σ [x',1]·(W x + b)ᵀ / rows
    if residual is not None:
        target = target + residual.detach().to(h.dtype).to(h.device)[:k] / max(c.rows, 1.0)
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError(f"reconstruct on {c.name!r}: the input second moment is not positive definite; raise 'damp'")
    new = torch.cholesky_solve(target, factor).T
    return new[:, :n].to(c.weight.dtype), (None if c.bias is None else new[:, n].to(c.bias.dtype))


register_channel_importance("magnitude", calibrated=False)(lambda group: group.magnitude.double())
register_channel_importance("activation")(activation_scores)
register_channel_importance("obs")(obs_scores)
