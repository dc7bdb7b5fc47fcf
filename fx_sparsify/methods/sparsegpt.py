"""SparseGPT (Frantar & Alistarh, 2023): choose a Linear layer's mask and update the weights that stay.

Given the layer's calibration inputs ``X`` (``in × samples``) and ``H = 2·X·Xᵀ``, the column sweep
prunes the weight column by column (left to right) and, after each column, spreads the error it made
over the columns to its right through the inverse Hessian (Optimal Brain Surgeon), so the layer's
output on the calibration data changes as little as possible::

    >>> import torch
    >>> w, x = torch.randn(8, 16), torch.randn(16, 64)
    >>> keep, new_w = sparsegpt_prune(w, 2 * x @ x.T, sparsity=0.5)
    >>> int(keep.sum()), bool((new_w[~keep] == 0).all())
    (64, True)

As in the reference implementation: columns are processed in lazy blocks of ``block_size`` (the update
to the columns right of a block is one matrix product), the mask of each block is chosen when the
sweep reaches it from the saliency ``w² / [H⁻¹]²_cc`` of the already-updated weights (adaptive mask
selection), ``H`` is dampened by ``damp × mean(diag H)`` and inputs that were always zero ("dead"
columns) have their weights zeroed first (they cost nothing on the data). Unlike the reference, every
block prunes an exact count (the total is exactly ``round(sparsity × numel)``, as for
``l1_unstructured``) and entries already pruned stay pruned when the target count allows it.

The sweep loops over columns in Python (it is sequential by nature: each column's update changes the
next column's values); all work inside a column is vectorised over rows.

Registered as the mask method ``"sparsegpt"``: in a spec its step reads each layer's Hessian from the
calibration forwards (``fx_sparsify.passes.reconstruct``); called on a bare tensor
(``fxs.compute_mask("sparsegpt", w, sparsity=0.5)``) there is no calibration data, so ``H = I``:
with ``block_size`` covering the whole row it equals magnitude pruning.
"""

from __future__ import annotations

import math
import numbers
import sys

import torch
from torch import Tensor

from ._registry import register_mask_method
from ._selectors import count_to_prune, prune_smallest

__all__ = ["sparsegpt_prune", "sparsegpt_args", "HESSIAN_DTYPES"]

HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def sparsegpt_args(
    shape: tuple[int, ...] | None,
    *,
    sparsity: float | int | None = None,
    n: int | None = None,
    m: int | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    hessian_dtype: str = "float32",
    sequential: bool = False,
) -> tuple[int | None, int | None, int | None, int, float]:
    """Check the options (against a 2-D weight ``shape`` when given): (k to prune or None, n, m, block, damp)."""
    name = "sparsegpt"
    if (sparsity is None) == (n is None and m is None):
        raise TypeError(
            f"{name} takes either sparsity (unstructured) or n and m (N:M along the input dim); got "
            f"sparsity={sparsity!r}, n={n!r}, m={m!r}"
        )
    if (n is None) != (m is None):
        raise TypeError(f"{name}: n and m go together (n kept out of every m); got n={n!r}, m={m!r}")
    for key, value in (("block_size", block_size), ("n", n), ("m", m)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise TypeError(f"{name}: {key} must be an int, got {type(value).__name__}: {value!r}")
    if block_size < 1:
        raise ValueError(f"{name}: block_size must be >= 1, got {block_size}")
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not 0 <= float(damp) < math.inf:
        raise ValueError(f"{name}: damp is a fraction of the mean Hessian diagonal (>= 0, e.g. 0.01); got {damp!r}")
    if not isinstance(sequential, bool):
        raise TypeError(f"{name}: sequential must be True or False, got {sequential!r}")
    if hessian_dtype not in HESSIAN_DTYPES:
        raise ValueError(
            f"{name}: hessian_dtype must be one of {', '.join(map(repr, HESSIAN_DTYPES))}; got {hessian_dtype!r}"
        )
    if m is not None:
        assert n is not None
        if m < 1 or not 0 <= n <= m:
            raise ValueError(f"{name}: n={n} kept out of every m={m} needs 1 <= m and 0 <= n <= m")
        if block_size % m:
            raise ValueError(
                f"{name}: block_size={block_size} must be a multiple of m={m} so N:M groups never straddle a block"
            )
    if shape is not None and len(shape) < 2:
        raise ValueError(
            f"{name} prunes a Linear weight (out_features × in_features) or a Conv2d weight; got shape {tuple(shape)}. "
            "Use another method (l1_unstructured, nm) for this tensor"
        )
    if m is not None and shape is not None and math.prod(shape[1:]) % m:
        raise ValueError(
            f"{name}: the input dim has size {math.prod(shape[1:])}, not divisible by m={m}; N:M groups run along "
            "the input dim (in_channels × kernel for a Conv2d)"
        )
    k = None
    if sparsity is not None:
        k = count_to_prune(sparsity, sys.maxsize if shape is None else math.prod(shape))
    return k, n, m, int(block_size), float(damp)


def _inverse_cholesky(hessian: Tensor, damp: float, source: Tensor) -> Tensor:
    """Upper Cholesky factor ``U`` of the dampened ``H⁻¹`` (``H⁻¹ = UᵀU``: the sweep reads its updates from it).

    As the reference computes it (``H = L·Lᵀ``, ``H⁻¹`` from ``L``, then ``H⁻¹``'s Cholesky factor), but in
    ``hessian``'s own storage: LAPACK factors a column-major matrix in place, and the transposed view of
    the (symmetric) row-major ``hessian`` is one, so no other ``in × in`` tensor is made. ``hessian`` is
    overwritten (dampened, then factored); the result is ``hessian`` itself. ``source``: the statistic it
    was copied from (for the error message: whether it is finite).
    """
    h = hessian
    mean = float(h.diagonal().mean())
    h.diagonal().add_(damp * (mean if mean > 0 else 1.0))
    a = h.mT  # column-major: the factorisations below work in place on it (h is symmetric)
    info = torch.zeros((), dtype=torch.int32, device=h.device)
    torch.linalg.cholesky_ex(a, out=(a, info))  # a = L (lower), H = L·Lᵀ; NaN or inf: info > 0 (LAPACK checks)
    if int(info) == 0:
        torch.cholesky_inverse(a, out=a)  # a = H⁻¹ (symmetric)
        torch.linalg.cholesky_ex(a, out=(a, info))  # a = L', H⁻¹ = L'·L'ᵀ: h, row-major, holds U = L'ᵀ
        if int(info) == 0 and bool(torch.isfinite(h.diagonal()).all()):
            return h
    raise ValueError(
        f"sparsegpt: the layer's Hessian (damp={damp}) is not positive definite "
        f"(finite={bool(torch.isfinite(source).all())}); "
        "raise 'damp' (e.g. 0.1), use 'hessian_dtype': 'float64', or calibrate on more or non-degenerate inputs"
    )


def _block_counts(k: int, pruned: Tensor, capacity: Tensor) -> list[int]:
    """Entries to prune per block: exactly ``k`` in all, every block at least what it had pruned already.

    ``pruned`` / ``capacity``: already-pruned and total entries per block. The ``k - pruned`` still to go
    are shared in proportion to each block's unpruned entries (floors of cumulative shares, so the sum is
    exact). When the target is below what is already pruned (sparsity lowered), blocks share ``k`` in
    proportion to their size.
    """
    already = int(pruned.sum())
    if k < already:
        pruned, free = torch.zeros_like(pruned), capacity
        extra = k
    else:
        free = capacity - pruned
        extra = k - already
    total_free = int(free.sum())
    cumulative = torch.cumsum(free, 0).tolist()
    shares, before = [], 0
    for c in cumulative:
        upto = (extra * int(c)) // total_free if total_free else 0
        shares.append(upto - before)
        before = upto
    return [int(p) + s for p, s in zip(pruned.tolist(), shares)]


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    *,
    sparsity: float | int | None = None,
    n: int | None = None,
    m: int | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    keep: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """SparseGPT on one Linear weight: (boolean keep-mask, updated weight in ``weight``'s dtype).

    ``hessian`` is ``in × in`` (any positive scale: ``2·X·Xᵀ / samples``); the sweep runs in its dtype
    (at least float32). ``keep`` is the current mask: pruned entries enter the sweep as zeros, so they
    are chosen first and stay pruned when the target count allows. Pruned entries of the result are 0.
    """
    k, n, m, block_size, damp = sparsegpt_args(
        tuple(weight.shape), sparsity=sparsity, n=n, m=m, block_size=block_size, damp=damp
    )
    shape = weight.shape  # a Conv2d weight is swept as (out, in·kh·kw), the layout of its unfolded input
    dtype = torch.promote_types(hessian.dtype, torch.float32)
    w = weight.detach().reshape(shape[0], -1).to(dtype=dtype, copy=True)
    if keep is not None:
        keep = keep.to(device=w.device, dtype=torch.bool).reshape(w.shape)
        w.mul_(keep)
    rows, cols = w.shape
    h = hessian.detach().to(device=w.device, dtype=dtype, copy=True)  # the one in × in workspace of the solve
    dead = h.diagonal() == 0
    if bool(dead.any()):
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
    hinv = _inverse_cholesky(h, damp, hessian)  # in h's storage
    del h
    diag_inv = hinv.diagonal().clone()  # [H⁻¹]_cc of each column as the sweep reaches it (saliency)
    hinv.div_(diag_inv.unsqueeze(1))  # rows scaled by 1/[H⁻¹]_cc: a column's update is (pruned w) × its row
    starts = list(range(0, cols, block_size))
    counts: list[int] = []
    # entries pruned before stay pruned (the OBS updates of earlier columns would make them nonzero
    # again before their block is reached): they rank below every saliency, unless the target is lower
    fixed = None if keep is None else ~keep
    if k is not None:
        zero = w == 0
        sizes = torch.tensor([min(block_size, cols - s) * rows for s in starts])
        pruned = torch.stack([zero[:, s : s + block_size].sum() for s in starts]).cpu()
        counts = _block_counts(k, pruned, sizes)
        if fixed is not None and k < int(fixed.sum()):
            fixed = None
    elif fixed is not None and bool((fixed.reshape(rows, -1, m).sum(-1) > m - n).any()):  # type: ignore[operator, arg-type]
        fixed = None  # a mask that N:M cannot contain (n raised): choose afresh
    # the sweep works on the transposed weight, so each column it visits is one contiguous row
    wt = w.T.contiguous()
    del w
    fixed_t = None if fixed is None else fixed.T
    prune_t = torch.zeros(cols, rows, dtype=torch.bool, device=wt.device)
    for b, i1 in enumerate(starts):
        i2 = min(i1 + block_size, cols)
        w1 = wt[i1:i2]  # a view: updated in place
        err1 = torch.zeros_like(w1)  # the values each column prunes, as the sweep reaches it
        hinv1 = hinv[i1:i2, i1:i2]
        d2 = diag_inv[i1:i2].square().unsqueeze(1)
        p1 = prune_t[i1:i2]
        f1 = None if fixed_t is None else fixed_t[i1:i2]
        if k is not None:  # adaptive selection: the block's mask from its already-updated weights
            sal = w1.square() / d2
            if f1 is not None:
                sal.masked_fill_(f1, -1.0)
            p1.copy_(~prune_smallest(sal, counts[b]))
        pf = p1.to(dtype)  # the block's mask as numbers (1 = pruned)
        for i in range(i2 - i1):
            if m is not None and i % m == 0:  # N:M: the group's mask when the sweep reaches it
                sal = w1[i : i + m].square() / d2[i : i + m]
                if f1 is not None:
                    sal.masked_fill_(f1[i : i + m], -1.0)
                drop = sal.topk(m - n, dim=0, largest=False).indices  # type: ignore[operator]
                pf[i : i + m].zero_().scatter_(0, drop, 1.0)
                p1[i : i + m] = pf[i : i + m] != 0
            err = torch.mul(w1[i], pf[i], out=err1[i])
            w1[i:].addr_(hinv1[i, i:], err, alpha=-1)  # OBS update of this block's later columns
        w1.masked_fill_(p1, 0.0)
        if i2 < cols:  # the block's errors reach the columns right of it in one product
            wt[i2:].addmm_(hinv[i1:i2, i2:].T, err1, alpha=-1)
    wt.masked_fill_(prune_t, 0.0)
    return (~prune_t.T).reshape(shape), wt.T.to(weight.dtype).reshape(shape)


@register_mask_method("sparsegpt", check=sparsegpt_args)
def sparsegpt(
    tensor: Tensor,
    *,
    sparsity: float | int | None = None,
    n: int | None = None,
    m: int | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    hessian_dtype: str = "float32",
    sequential: bool = False,
) -> Tensor:
    """SparseGPT: OBS mask + weight update from calibration inputs (identity Hessian on a bare tensor)."""
    sparsegpt_args(
        tuple(tensor.shape),
        sparsity=sparsity,
        n=n,
        m=m,
        block_size=block_size,
        damp=damp,
        hessian_dtype=hessian_dtype,
        sequential=sequential,
    )
    eye = torch.eye(math.prod(tensor.shape[1:]), dtype=HESSIAN_DTYPES[hessian_dtype], device=tensor.device)
    keep, _ = sparsegpt_prune(tensor, eye, sparsity=sparsity, n=n, m=m, block_size=block_size, damp=damp)
    return keep
