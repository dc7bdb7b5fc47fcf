"""Pass: keep sparse weights in sparse storage after squash (SPEC §11), ``squash(storage=...)``.

Runs on the squashed module (a plain GraphModule whose weights already hold ``weight * mask``).
Every masked ``Linear`` and 1×1 ``Conv`` (stride 1, no padding, one group) may become a
:class:`SparseLinear`: the weight lives as int32 CSR (or BSR) indices and values, and the layer runs
PyTorch's sparse kernels: ``addmv(b, W, x)`` for one row, ``addmm(b, W, xᵀ)ᵀ`` for more (MKL on the
CPU; ``F.linear(x, W_csr)`` is 2–3× slower and int64 indices cost ~2×).

- ``"csr"`` / ``"bsr"``: every eligible masked layer. BSR takes the largest square block (MKL refuses
  non-square ones) of 32, 16, 8, 4, 2 that covers the zero pattern exactly, else 1×1.
- ``"bitmask"`` (SPEC §18): every eligible masked float32 / bfloat16 layer becomes a
  :class:`~.._bitmask.BitmaskLinear` (kept values + a 1-bit mask, the fused C kernel). GPT-2's
  ``Conv1D`` (weight ``[in, out]``; ``aten.addmm`` under export) takes bitmask storage or stays dense.
- ``"auto"``: per layer, sparse only where it is faster at ``batch_size`` rows (for a 1×1 conv:
  N·H·W positions). A cost-model guard keeps layers under 25 % zeros dense without measuring; the
  others are timed at squash (dense ``F.linear`` against bitmask, CSR from 30 % zeros, and BSR where
  the pattern has exact blocks of 4×4 or more; medians of interleaved runs) and turn sparse only at
  ≤ 0.9× the dense time, so a noisy measurement errs towards dense.
- ``"auto-model"``: dense or bitmask by a cost model of the kernel (:func:`~.._bitmask.modelled_ratio`),
  no timing: the same choice on every run.
- recorded choices (``squash(storage=small.storage_choices)``, a ``{layer: storage}`` dict, or
  :func:`~.storage_choices.load_storage_choices` of a saved file): each layer takes its recorded storage.
- ``"semi_structured"``: every masked ``Linear`` (2:4, float16 / bfloat16, on CUDA) becomes a
  :class:`~._semi_structured.SemiStructuredLinear` (``torch.sparse.to_sparse_semi_structured``); a
  layer that is not 2:4, another dtype, or a module on the CPU is a ``ValueError`` saying what to use
  instead. The CUDA path is untested here (no GPU); its test skips without CUDA.

The squashed module's ``state_dict()`` still holds the dense weights under the original keys, and
``load_state_dict`` takes dense weights (re-sparsified on load). ``torch.export`` cannot trace sparse
layouts: exporting a module with sparse layers raises an error that says to squash with
``storage="dense"``. Decisions are returned per layer (:class:`StorageChoice`) and shown by
:func:`storage_table` (and ``sgm.report()`` after such a squash).

    >>> small = sgm.squash(storage="auto", batch_size=8)      # doctest: +SKIP
    >>> print(small.fc1)                                      # doctest: +SKIP
    SparseLinear(in_features=4096, out_features=11008, csr, 90.0% zeros, bias=True)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, cast

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import Tensor, nn
from torch.fx import GraphModule

from .. import _native
from .._bitmask import MODEL_MARGIN, BitmaskLinear, modelled_ratio
from .._native import BITMASK_DTYPES
from ..state import SparsityState
from ._runner import PassResult, eliminate_dead_code, finish
from ._semi_structured import SemiStructuredLinear, semi_structured_problem
from ._sparse_linear import KERNEL_DTYPES, SparseLinear
from .storage_sites import FUNCTION_SITES, Site, check_uses, function_sites, module_sites

__all__ = [
    "STORAGES",
    "SparseLinear",
    "StorageChoice",
    "StorageResult",
    "check_storage",
    "apply_sparse_storage",
    "recorded_choices",
    "storage_table",
]

STORAGES = ("dense", "csr", "bsr", "bitmask", "auto", "auto-model", "semi_structured")
#: square block sizes tried for BSR, largest first (MKL refuses non-square blocks such as 1×4)
BLOCKS = (32, 16, 8, 4, 2)
#: cost model: below this fraction of zeros CSR never beat dense in our measurements (break-even 50-70 %)
MIN_SPARSITY = 0.3
#: auto takes a sparse layout only at or below this fraction of the dense time (noise margin on medians)
MARGIN = 0.9
#: below this fraction of zeros not even the bitmask kernel can pay (its byte ratio is ~0.78x at 25 %)
BITMASK_MIN_SPARSITY = 0.25


@dataclass(frozen=True)
class StorageChoice:
    """What ``squash(storage=...)`` did with one layer, and why."""

    layer: str
    shape: tuple[int, ...]
    sparsity: float
    storage: str  # "dense" | "csr" | "bsr 16x16" | "bitmask"
    why: str
    ratio: float | None = None  # auto: the chosen (or best rejected) layout's time / dense, measured or modelled


@dataclass
class StorageResult(PassResult):
    """:class:`PassResult` of :func:`apply_sparse_storage`, with the decision for every layer considered."""

    choices: list[StorageChoice] = field(default_factory=list)


# --- deciding -------------------------------------------------------------------------------------------
def _block_of(matrix: Tensor) -> int:
    """The largest square block of :data:`BLOCKS` that tiles ``matrix`` with each block all zero or all kept."""
    keep = matrix != 0
    rows, cols = keep.shape
    for b in BLOCKS:
        if rows % b or cols % b:
            continue
        per_block = keep.reshape(rows // b, b, cols // b, b).sum(dim=(1, 3))
        if bool(((per_block == 0) | (per_block == b * b)).all()):
            return b
    return 1


def _median_times(fns: list[Callable[[], Any]], budget: float = 0.3, runs: int = 15) -> list[float]:
    """Median seconds per call of each function, interleaved (noise on a shared machine hits all alike),
    after one warm-up each; at least 5 rounds, then until ``runs`` rounds or ``budget`` seconds. With one
    thread the clock is the thread's CPU time: a thread descheduled by other jobs accrues none (wall times
    of one layer on a loaded 2-core machine varied 10x between rounds); with more, the wall clock."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    for i in range(runs):
        for fn, out in zip(fns, times):
            t0 = clock()
            fn()
            out.append(clock() - t0)
        if i >= 4 and time.perf_counter() - start > budget:
            break
    return [statistics.median(t) for t in times]


def measure(dense: Tensor, bias: Tensor | None, layer: nn.Module, batch_size: int) -> tuple[float, float]:
    """Seconds per call of the dense matrix product and of ``layer``'s (CSR / BSR / bitmask) on ``batch_size``
    random rows: medians of interleaved runs."""
    in_features, out_features = cast(int, layer.in_features), cast(int, layer.out_features)
    x = torch.randn(batch_size, in_features, dtype=dense.dtype, device=dense.device)
    matrix = dense.reshape(out_features, in_features) if not getattr(layer, "transposed", False) else dense.T
    cols = x.T if batch_size > 1 else x[0]
    run = (lambda: layer._matmul(cols)) if isinstance(layer, SparseLinear) else (lambda: layer(x))
    with torch.inference_mode():
        t_dense, t_sparse = _median_times([lambda: F.linear(x, matrix, bias), run])
    return t_dense, t_sparse


#: the measuring function ``auto`` uses (tests replace it to make decisions deterministic)
MEASURE: Callable[[Tensor, Tensor | None, nn.Module, int], tuple[float, float]] = measure


def _name(layer: nn.Module) -> str:
    if isinstance(layer, BitmaskLinear):
        return "bitmask"
    return "csr" if layer.layout == "csr" else f"bsr {layer.blocksize}x{layer.blocksize}"


def _bitmask_problem(weight: Tensor) -> str | None:
    """Why the bitmask kernel cannot run this weight (None: it can)."""
    if weight.dtype not in BITMASK_DTYPES:
        return f"{weight.dtype} has no bitmask kernel (float32 / bfloat16 only)"
    if weight.device.type != "cpu":
        return f"the bitmask kernel runs on the CPU, the weight is on {weight.device.type}"
    if _native.LIB is None:
        return "the C kernels are not built (no C compiler at install): the bitmask torch path is no faster than dense"
    return None


def _recorded(site: Site, wanted: str, weight: Tensor, zeros: float) -> tuple[nn.Module | None, StorageChoice]:
    """A layer in the storage a previous squash recorded for it (``squash(storage=choices)``)."""
    shape = tuple(weight.shape)
    why = "recorded choice"
    if wanted == "dense":
        return None, StorageChoice(site.layer, shape, zeros, "dense", why)
    if wanted == "bitmask":
        return BitmaskLinear(weight, site.bias, site.spatial), StorageChoice(site.layer, shape, zeros, "bitmask", why)
    if wanted == "csr":
        return SparseLinear(weight, site.bias, "csr", 1, site.spatial), StorageChoice(
            site.layer, shape, zeros, "csr", why
        )
    block = int(wanted.split()[1].split("x")[0]) if wanted.startswith("bsr ") else 0
    if block and _block_of(weight.reshape(shape[0], -1)) % block == 0:
        return (
            SparseLinear(weight, site.bias, "bsr", block, site.spatial),
            StorageChoice(site.layer, shape, zeros, wanted, why),
        )
    raise ValueError(
        f"squash(storage=choices): layer {site.layer!r} was recorded as {wanted!r}, which its weight "
        "cannot take now (its zeros no longer form those blocks); record the choices again"
    )


def _transposed(
    site: Site, storage: str, batch_size: int, recorded: dict[str, str] | None, weight: Tensor, zeros: float
) -> tuple[nn.Module | None, StorageChoice]:
    """A GPT-2 ``Conv1D`` (weight ``[in, out]``, ``x @ W + b``): bitmask storage or dense (the CSR / BSR layer
    takes ``[out, in]`` weights)."""
    shape = tuple(weight.shape)
    wanted = recorded.get(site.layer, "dense") if recorded is not None else storage
    problem = (
        _bitmask_problem(weight)
        if wanted != "bitmask"
        else (weight.dtype not in BITMASK_DTYPES and f"{weight.dtype} has no bitmask kernel (float32 / bfloat16)")
    )
    if wanted == "dense" or problem or wanted not in ("bitmask", "auto", "auto-model"):
        why = "recorded choice" if wanted == "dense" else problem or "a Conv1D (weight [in, out]): bitmask storage only"
        return None, StorageChoice(site.layer, shape, zeros, "dense", why)
    layer = BitmaskLinear(weight, site.bias, transposed=True)
    if wanted == "bitmask":
        return layer, StorageChoice(
            site.layer,
            shape,
            zeros,
            "bitmask",
            "recorded choice" if recorded is not None else "storage='bitmask' asked for",
        )
    if wanted == "auto-model":
        ratio = modelled_ratio(zeros, weight.dtype, batch_size, _native.bitmask_isa(), weight.numel())
        margin, how = MODEL_MARGIN, "modelled"
    elif zeros < BITMASK_MIN_SPARSITY:
        return None, StorageChoice(
            site.layer,
            shape,
            zeros,
            "dense",
            f"{zeros:.0%} zeros: below the {BITMASK_MIN_SPARSITY:.0%} where a sparse kernel can pay (cost model)",
        )
    else:
        t_dense, t_sparse = MEASURE(weight, site.bias, layer, batch_size)
        ratio, margin, how = t_sparse / t_dense, MARGIN, "measured"
    why = f"{how} bitmask {ratio:.2f}x dense at batch {batch_size} (a Conv1D: bitmask or dense)"
    if ratio <= margin:
        return layer, StorageChoice(site.layer, shape, zeros, "bitmask", why, ratio)
    return None, StorageChoice(site.layer, shape, zeros, "dense", why + f" (sparse only at <= {margin}x)", ratio)


def _decide(
    site: Site, storage: str, batch_size: int, masked: bool, recorded: dict[str, str] | None = None
) -> tuple[nn.Module | None, StorageChoice]:
    weight = site.weight.detach()
    shape = tuple(weight.shape)
    zeros = 1.0 - int((weight != 0).sum()) / max(weight.numel(), 1)

    def dense(why: str, ratio: float | None = None) -> tuple[None, StorageChoice]:
        return None, StorageChoice(site.layer, shape, zeros, "dense", why, ratio)

    if not masked:
        return dense("not a masked weight")
    if site.problem:
        return dense(site.problem)
    if weight.layout != torch.strided:
        return dense(f"the weight is already {weight.layout}")
    if site.transposed:
        return _transposed(site, storage, batch_size, recorded, weight, zeros)
    if recorded is not None:
        return _recorded(site, recorded.get(site.layer, "dense"), weight, zeros)
    if storage == "bitmask":
        if weight.dtype not in BITMASK_DTYPES:
            return dense(f"{weight.dtype} has no bitmask kernel (float32 / bfloat16)")
        return (
            BitmaskLinear(weight, site.bias, site.spatial),
            StorageChoice(site.layer, shape, zeros, "bitmask", "storage='bitmask' asked for"),
        )
    if storage == "auto-model":
        problem = _bitmask_problem(weight)
        if problem:
            return dense(f"{problem} (auto-model weighs dense and bitmask only)")
        ratio = modelled_ratio(zeros, weight.dtype, batch_size, _native.bitmask_isa(), weight.numel())
        if ratio <= MODEL_MARGIN:
            return (
                BitmaskLinear(weight, site.bias, site.spatial),
                StorageChoice(
                    site.layer,
                    shape,
                    zeros,
                    "bitmask",
                    f"modelled {ratio:.2f}x dense at batch {batch_size} (no timing)",
                    ratio,
                ),
            )
        return dense(
            f"modelled bitmask {ratio:.2f}x dense at batch {batch_size} (no timing; bitmask only at <= "
            f"{MODEL_MARGIN}x)",
            ratio,
        )
    if weight.device.type == "cpu" and weight.dtype not in KERNEL_DTYPES and _bitmask_problem(weight) is not None:
        return dense(f"{weight.dtype} has no CPU sparse kernel (float32 / float64; bitmask: float32 / bfloat16)")
    matrix = weight.reshape(shape[0], -1)
    if storage in ("csr", "bsr"):
        if weight.device.type == "cpu" and weight.dtype not in KERNEL_DTYPES:
            return dense(f"{weight.dtype} has no CPU sparse kernel (float32 / float64 only)")
        block = _block_of(matrix) if storage == "bsr" else 1
        layer: nn.Module = SparseLinear(weight, site.bias, storage, block, site.spatial)
        kind = "csr" if storage == "csr" else f"bsr {block}x{block}"
        return layer, StorageChoice(site.layer, shape, zeros, kind, f"storage={storage!r} asked for")
    # auto: time the candidates against dense
    if zeros < BITMASK_MIN_SPARSITY:
        return dense(
            f"{zeros:.0%} zeros: below the {BITMASK_MIN_SPARSITY:.0%} where a sparse kernel can pay (cost model)"
        )
    candidates: list[nn.Module] = []
    if zeros >= MIN_SPARSITY and (weight.device.type != "cpu" or weight.dtype in KERNEL_DTYPES):
        candidates.append(SparseLinear(weight, site.bias, "csr", 1, site.spatial))
        block = _block_of(matrix)
        if block >= 4:
            candidates.append(SparseLinear(weight, site.bias, "bsr", block, site.spatial))
    if _bitmask_problem(weight) is None:
        candidates.append(BitmaskLinear(weight, site.bias, site.spatial))
    if not candidates:
        return dense(f"{zeros:.0%} zeros: no sparse kernel for it here ({_bitmask_problem(weight)})")
    timed = []
    for layer in candidates:
        t_dense, t_sparse = MEASURE(weight, site.bias, layer, batch_size)
        timed.append((t_sparse / t_dense, layer))
    ratio, best = min(timed, key=lambda t: t[0])
    measured = ", ".join(f"{_name(c)} {r:.2f}x" for r, c in timed)
    if ratio <= MARGIN:
        return best, StorageChoice(
            site.layer, shape, zeros, _name(best), f"measured {measured} dense at batch {batch_size}", ratio
        )
    return dense(f"measured {measured} dense at batch {batch_size} (sparse only at <= {MARGIN}x)", ratio)


# --- the pass -------------------------------------------------------------------------------------------
def recorded_choices(storage: Any) -> dict[str, str] | None:
    """Layer → storage of ``squash(storage=choices)``: a previous squash's ``storage_choices`` (a list of
    :class:`StorageChoice`, or of dicts as :func:`~.storage_choices.load_storage_choices` returns) or a
    ``{layer: storage}`` dict; None for a storage name. A ``TypeError`` / ``ValueError`` for anything else."""
    if isinstance(storage, str):
        return None
    if isinstance(storage, Mapping):
        out = dict(storage)
    elif isinstance(storage, (list, tuple)):
        out = {}
        for c in storage:
            layer, kind = (
                (c.layer, c.storage)
                if isinstance(c, StorageChoice)
                else ((c.get("layer"), c.get("storage")) if isinstance(c, Mapping) else (None, None))
            )
            if not isinstance(layer, str):
                raise TypeError(
                    f"squash(storage=[...]): each recorded choice is a StorageChoice or a dict with "
                    f"'layer' and 'storage', got {c!r}"
                )
            out[layer] = kind
    else:
        raise TypeError(
            f"squash(storage={storage!r}): a storage name ({', '.join(map(repr, STORAGES))}), a list "
            "of recorded choices (small.storage_choices) or a {layer: storage} dict"
        )
    for layer, kind in out.items():
        if not isinstance(kind, str) or not (kind in ("dense", "csr", "bitmask") or kind.startswith("bsr ")):
            raise ValueError(
                f"squash(storage=choices): layer {layer!r} has storage {kind!r}; recorded choices are "
                "'dense', 'csr', 'bsr NxN' or 'bitmask'"
            )
    return out


def check_storage(storage: Any, batch_size: int) -> None:
    """A ``ValueError`` / ``TypeError`` for a storage name (or recorded choices) or batch size squash cannot use."""
    if recorded_choices(storage) is None and storage not in STORAGES:
        raise ValueError(f"squash(storage={storage!r}): unknown storage; use one of {', '.join(map(repr, STORAGES))}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TypeError(f"squash(batch_size={batch_size!r}): the batch size hint must be a positive int")


def apply_sparse_storage(
    gm: GraphModule, state: SparsityState, storage: Any = "csr", batch_size: int = 1
) -> StorageResult:
    """Give the masked Linear / 1×1 Conv layers of the squashed ``gm`` sparse storage, in place.

    ``created`` maps each considered layer to ``{"storage": ..., "why": ...}``; ``choices`` holds the
    same decisions as :class:`StorageChoice` records (``squash`` keeps them as ``small.storage_choices``).
    ``storage`` may be such recorded choices (see :func:`recorded_choices`): each layer takes its recorded
    storage again, no timing; a recorded layer the module lacks is a ``ValueError``.
    """
    check_storage(storage, batch_size)
    recorded = recorded_choices(storage)
    if storage == "dense":
        return _result(gm, {}, [])
    masked = {r.param for r in state.targets.values() if r.kind == "weight" and r.param}
    if storage == "semi_structured":
        return _apply_semi_structured(gm, masked)
    sites = {**module_sites(gm), **function_sites(gm)}
    check_uses(gm, sites)
    stale = sorted(set(recorded or ()) - set(sites))
    if stale:
        raise ValueError(
            f"squash(storage=choices): the recorded layers {stale[:5]} are not linear / 1x1 conv layers "
            f"of this module (its layers: {sorted(sites)[:5]}...); record the choices on this model"
        )
    choices: list[StorageChoice] = []
    created: dict[str, dict[str, str]] = {}
    for layer, site in sites.items():
        sparse, choice = _decide(site, storage, batch_size, f"{layer}.weight" in masked, recorded)
        choices.append(choice)
        created[layer] = {"storage": choice.storage, "why": choice.why}
        if sparse is None:
            continue
        sparse.train(gm.training)
        _install(gm, site, sparse)
    eliminate_dead_code(gm)
    return _result(gm, created, choices)


def _result(gm: GraphModule, created: dict[str, dict[str, str]], choices: list[StorageChoice]) -> StorageResult:
    done = finish(gm, created)
    return StorageResult(done.gm, done.modified, done.created, choices)


def _apply_semi_structured(gm: GraphModule, masked: set[str]) -> StorageResult:
    """``storage="semi_structured"``: every masked Linear to a :class:`SemiStructuredLinear`, or a ValueError.

    All layers are checked (CUDA, float16 / bfloat16, 2:4) and converted before any is installed.
    """
    sites = {**module_sites(gm), **function_sites(gm)}
    check_uses(gm, sites)
    linear = {
        layer: site
        for layer, site in sites.items()
        if f"{layer}.weight" in masked and not site.spatial and not site.transposed
    }
    off_gpu = sorted({site.weight.device.type for site in linear.values() if site.weight.device.type != "cuda"})
    if off_gpu or not linear:
        where = f"this module is on {', '.join(off_gpu)}" if off_gpu else "this module has no masked Linear layer"
        raise ValueError(
            "squash(storage='semi_structured') converts 2:4 Linear weights with "
            "torch.sparse.to_sparse_semi_structured, "
            f"which runs on CUDA GPUs in float16 / bfloat16 only; {where}: move the model to CUDA in half "
            "precision before sparsify_graph (model.cuda().half()), or use storage='csr' / 'auto' on the CPU"
        )
    choices: list[StorageChoice] = []
    created: dict[str, dict[str, str]] = {}
    layers: dict[str, SemiStructuredLinear] = {}
    for layer, site in sites.items():
        weight = site.weight.detach()
        zeros = 1.0 - int((weight != 0).sum()) / max(weight.numel(), 1)
        if layer in linear:
            problem = site.problem or semi_structured_problem(weight)
            if problem:
                raise ValueError(
                    f"squash(storage='semi_structured'): layer {layer!r} cannot be stored 2:4 "
                    f"semi-structured: {problem}; or squash with storage='dense' / 'csr'"
                )
            try:
                layers[layer] = SemiStructuredLinear(weight, site.bias)
            except (RuntimeError, NotImplementedError) as err:  # torch's shape / device-capability checks
                raise ValueError(
                    f"squash(storage='semi_structured'): layer {layer!r} ({tuple(weight.shape)}, "
                    f"{weight.dtype}): torch.sparse.to_sparse_semi_structured refused it: {err}; "
                    "squash with storage='dense' instead"
                ) from None
            choice = StorageChoice(layer, tuple(weight.shape), zeros, "semi_structured", "2:4 on CUDA, asked for")
        else:
            why = "not a masked weight" if f"{layer}.weight" not in masked else "a 1x1 conv (2:4 kernels: Linear only)"
            choice = StorageChoice(layer, tuple(weight.shape), zeros, "dense", why)
        choices.append(choice)
        created[layer] = {"storage": choice.storage, "why": choice.why}
    for layer, module in layers.items():
        module.train(gm.training)
        _install(gm, sites[layer], module)
    eliminate_dead_code(gm)
    return _result(gm, created, choices)


def _install(gm: GraphModule, site: Site, layer: nn.Module) -> None:
    """Put ``layer`` at the site's path and make every call of the site a ``call_module`` of it."""
    owner, _, leaf = site.layer.rpartition(".")
    gm.get_submodule(owner).add_module(leaf, layer)
    graph = gm.graph
    for node in site.nodes:
        if node.op == "call_module":
            continue
        with graph.inserting_before(node):
            new = graph.call_module(site.layer, (node.args[FUNCTION_SITES[node.target][1][0]],))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def storage_table(choices: list[StorageChoice]) -> str:
    """The per-layer storage decisions as a table (``time / dense``: the ratio auto measured or modelled)."""
    rows = [
        [
            c.layer,
            "x".join(map(str, c.shape)),
            f"{c.sparsity:.1%}",
            c.storage,
            "-" if c.ratio is None else f"{c.ratio:.2f}x",
            c.why,
        ]
        for c in choices
    ]
    return tabulate(
        rows,
        headers=["layer", "shape", "zeros", "storage", "time / dense", "why"],
        tablefmt="github",
        disable_numparse=True,
    )
