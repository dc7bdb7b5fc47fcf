"""Pass: keep sparse weights in sparse storage after squash (SPEC §11), ``squash(storage=...)``.

Runs on the squashed module (a plain GraphModule whose weights already hold ``weight * mask``).
Every masked ``Linear`` and 1×1 ``Conv`` (stride 1, no padding, one group) may become a
:class:`SparseLinear`: the weight lives as int32 CSR (or BSR) indices and values, and the layer runs
PyTorch's sparse kernels: ``addmv(b, W, x)`` for one row, ``addmm(b, W, xᵀ)ᵀ`` for more (MKL on the
CPU; ``F.linear(x, W_csr)`` is 2–3× slower and int64 indices cost ~2×).

- ``"csr"`` / ``"bsr"``: every eligible masked layer. BSR takes the largest square block (MKL refuses
  non-square ones) of 32, 16, 8, 4, 2 that covers the zero pattern exactly, else 1×1.
- ``"auto"``: per layer, sparse only where it is faster at ``batch_size`` rows (for a 1×1 conv:
  N·H·W positions). A cost-model guard keeps layers under 30 % zeros dense without measuring; the
  others are timed at squash (dense ``F.linear`` against CSR, and BSR where the pattern has exact
  blocks of 4×4 or more; the fastest of a few runs) and turn sparse only at ≤ 0.9× the dense time, so a
  noisy measurement errs towards dense.
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

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from ..state import SparsityState
from ._runner import PassResult, eliminate_dead_code, finish
from ._semi_structured import SemiStructuredLinear, semi_structured_problem

__all__ = [
    "STORAGES",
    "SparseLinear",
    "StorageChoice",
    "StorageResult",
    "check_storage",
    "apply_sparse_storage",
    "storage_table",
]

STORAGES = ("dense", "csr", "bsr", "auto", "semi_structured")
#: square block sizes tried for BSR, largest first (MKL refuses non-square blocks such as 1×4)
BLOCKS = (32, 16, 8, 4, 2)
#: dtypes with a CPU sparse kernel (MKL); others stay dense
KERNEL_DTYPES = (torch.float32, torch.float64)
#: cost model: below this fraction of zeros CSR never beat dense in our measurements (break-even 50-70 %)
MIN_SPARSITY = 0.3
#: auto takes a sparse layout only at or below this fraction of the dense time (noise margin)
MARGIN = 0.9

#: module type → number of spatial dims (0: Linear)
MODULE_SITES: dict[type[nn.Module], int] = {nn.Linear: 0, nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
#: export-captured function → (spatial dims, positions of (input, weight, bias),
#: positions of (stride, padding, dilation, groups))
FUNCTION_SITES: dict[Any, tuple[int, tuple[int, int, int], tuple[int, int, int, int] | None]] = {
    torch.ops.aten.linear.default: (0, (0, 1, 2), None),
    torch.ops.aten.conv1d.default: (1, (0, 1, 2), (3, 4, 5, 6)),
    torch.ops.aten.conv2d.default: (2, (0, 1, 2), (3, 4, 5, 6)),
    torch.ops.aten.conv3d.default: (3, (0, 1, 2), (3, 4, 5, 6)),
}


@dataclass(frozen=True)
class StorageChoice:
    """What ``squash(storage=...)`` did with one layer, and why."""

    layer: str
    shape: tuple[int, ...]
    sparsity: float
    storage: str  # "dense" | "csr" | "bsr 16x16"
    why: str


@dataclass
class StorageResult(PassResult):
    """:class:`PassResult` of :func:`apply_sparse_storage`, with the decision for every layer considered."""

    choices: list[StorageChoice] = field(default_factory=list)


class SparseLinear(nn.Module):
    """A ``Linear`` (or 1×1 ``Conv``) whose weight is stored as a CSR / BSR tensor with int32 indices.

    ``weight`` is the sparse tensor; ``state_dict()`` writes it dense under ``weight`` (the original
    key) and ``load_state_dict`` takes a dense weight. Meant for inference: the weight takes no gradient.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, layout: str = "csr", blocksize: int = 1,
                 spatial: int = 0) -> None:
        super().__init__()
        if layout not in ("csr", "bsr"):
            raise ValueError(f"SparseLinear layout must be 'csr' or 'bsr', got {layout!r}")
        self.layout = layout
        self.blocksize = blocksize
        self.spatial = spatial  # 0 for Linear, 1/2/3 for a 1×1 Conv1d/2d/3d
        self.weight_shape = tuple(weight.shape)
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self._store(weight)
        self.bias = nn.Parameter(bias.detach(), requires_grad=bias.requires_grad) if bias is not None else None

    def _store(self, dense: Tensor) -> None:
        matrix = dense.detach().reshape(self.out_features, self.in_features)
        with warnings.catch_warnings():  # torch's "sparse CSR support is in beta" note, once per process
            warnings.filterwarnings("ignore", message="Sparse (CSR|BSR|BSC|CSC) tensor support is in beta")
            if self.layout == "csr":
                sparse = matrix.to_sparse_csr()
            else:
                sparse = matrix.to_sparse_bsr((self.blocksize, self.blocksize))
        # plain (non-persistent) buffers: deepcopy, pickle and .to() work on them, not on sparse tensors
        self.register_buffer("crow_indices", sparse.crow_indices().to(torch.int32), persistent=False)
        self.register_buffer("col_indices", sparse.col_indices().to(torch.int32), persistent=False)
        # values() is a view whose base is the sparse tensor: keep a tensor of its own (export fakifies bases)
        self.register_buffer("values", sparse.values().clone(), persistent=False)

    @property
    def weight(self) -> Tensor:
        """The weight as a ``torch.sparse_csr`` / ``sparse_bsr`` tensor of shape ``[out, in]``."""
        build = torch.sparse_csr_tensor if self.layout == "csr" else torch.sparse_bsr_tensor
        return build(self.crow_indices, self.col_indices, self.values, (self.out_features, self.in_features),
                     check_invariants=False)

    def dense_weight(self) -> Tensor:
        """The weight as a dense tensor of the original layer's shape."""
        dense = self.weight.to_dense()
        return dense if dense.shape == self.weight_shape else dense.reshape(self.weight_shape).clone()

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_exporting():
            raise RuntimeError(
                "torch.export cannot trace a sparse-storage layer (sparse CSR / BSR weights); "
                "squash with storage='dense' (the default) for export"
            )
        if self.values.dtype not in KERNEL_DTYPES and self.values.device.type == "cpu":
            return self._dense_forward(x)  # no CPU sparse kernel for this dtype (a later .half() / .bfloat16())
        if self.spatial:
            return self._conv(x)
        rows = x.reshape(-1, self.in_features)
        y = self._matmul(rows.T if rows.shape[0] > 1 else rows[0])
        return y.reshape(*x.shape[:-1], self.out_features)

    def _matmul(self, cols: Tensor) -> Tensor:
        """``W @ cols + bias`` for one column (``addmv``) or many (``addmm``, returned as rows)."""
        w = self.weight
        if cols.dim() == 1:
            return torch.mv(w, cols) if self.bias is None else torch.addmv(self.bias, w, cols)
        out = torch.mm(w, cols) if self.bias is None else torch.addmm(self.bias.unsqueeze(1), w, cols)
        return out.T.contiguous()

    def _conv(self, x: Tensor) -> Tensor:
        batched = x.dim() == self.spatial + 2
        xb = x if batched else x.unsqueeze(0)
        n, c, *space = xb.shape
        cols = xb.movedim(1, 0).reshape(c, -1)  # [C, N·H·W]
        w = self.weight
        y = torch.mm(w, cols) if self.bias is None else torch.addmm(self.bias.unsqueeze(1), w, cols)
        y = y.reshape(self.out_features, n, *space).movedim(0, 1).contiguous()
        return y if batched else y[0]

    def _dense_forward(self, x: Tensor) -> Tensor:
        w = self.dense_weight()
        if self.spatial:
            return getattr(F, f"conv{self.spatial}d")(x, w, self.bias)
        return F.linear(x, w, self.bias)

    # --- dense weights in the state dict under the original key ----------------------------------------
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.dense_weight()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        key = prefix + "weight"
        if key in state_dict:
            incoming = state_dict[key]
            if tuple(incoming.shape) != self.weight_shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(incoming.shape)} "
                                  f"from checkpoint, the shape in current model is {self.weight_shape}.")
            else:
                dense = incoming.to_dense() if incoming.layout != torch.strided else incoming
                with torch.no_grad():
                    self._store(dense.to(self.values))
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        kind = "csr" if self.layout == "csr" else f"bsr {self.blocksize}x{self.blocksize}"
        zeros = 1.0 - int((self.values != 0).sum()) / max(self.out_features * self.in_features, 1)
        conv = f", 1x1 conv{self.spatial}d" if self.spatial else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind}, {zeros:.1%} zeros"
                f"{conv}, bias={self.bias is not None}")


# --- finding the layers -----------------------------------------------------------------------------------
@dataclass
class _Site:
    """One layer that may take sparse storage: its module path, weight, bias and graph nodes."""

    layer: str
    weight: Tensor
    bias: Tensor | None
    spatial: int
    nodes: list[Node]
    problem: str | None = None  # why it must stay dense, when it must


def _conv_problem(kernel: tuple[int, ...], stride: Any, padding: Any, groups: int) -> str | None:
    ones = tuple(int(s) for s in (stride if isinstance(stride, (tuple, list)) else [stride]))
    pads = padding if isinstance(padding, str) else tuple(int(p) for p in (padding if isinstance(padding, (tuple, list)) else [padding]))
    if any(k != 1 for k in kernel):
        return f"a {'x'.join(map(str, kernel))} conv (only 1x1 convs are matrix products)"
    if any(s != 1 for s in ones):
        return f"stride {ones} (only stride 1)"
    if not (pads in ("valid", "same") or all(p == 0 for p in pads)):
        return f"padding {pads} (only unpadded 1x1 convs)"
    if groups != 1:
        return f"groups={groups} (only one group)"
    return None


def _module_sites(gm: GraphModule) -> dict[str, _Site]:
    sites: dict[str, _Site] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        spatial = MODULE_SITES.get(type(module))
        if spatial is None:
            continue
        site = sites.get(node.target)
        if site is None:
            site = sites[node.target] = _Site(node.target, module.weight, module.bias, spatial, [])
            if spatial:
                site.problem = _conv_problem(module.kernel_size, module.stride, module.padding, module.groups)
            if module._forward_hooks or module._forward_pre_hooks:
                site.problem = "the layer has forward hooks"
        site.nodes.append(node)
    return sites


def _function_sites(gm: GraphModule) -> dict[str, _Site]:
    """Export captures call ``aten.linear`` / ``aten.convNd`` on ``get_attr`` weights of a holder module."""
    sites: dict[str, _Site] = {}
    for node in gm.graph.nodes:
        entry = FUNCTION_SITES.get(node.target) if node.op == "call_function" else None
        if entry is None:
            continue
        spatial, (_, wi, bi), conv = entry
        w = node.args[wi] if len(node.args) > wi else None
        b = node.args[bi] if len(node.args) > bi else node.kwargs.get("bias")
        if not (isinstance(w, Node) and w.op == "get_attr" and w.target.endswith(".weight")):
            continue
        layer = w.target[: -len(".weight")]
        if b is not None and not (isinstance(b, Node) and b.op == "get_attr" and b.target == f"{layer}.bias"):
            continue
        site = sites.get(layer)
        if site is None:
            holder = gm.get_submodule(layer)
            site = sites[layer] = _Site(layer, holder.weight, getattr(holder, "bias", None), spatial, [])
            others = [n for n, _ in holder.named_children()] + [
                n for n, _ in [*holder.named_parameters(recurse=False), *holder.named_buffers(recurse=False)]
                if n not in ("weight", "bias")]
            if others:
                site.problem = f"{layer!r} holds more than the layer's weight and bias ({', '.join(others[:3])})"
        if site.spatial != spatial:
            site.problem = f"{layer!r} is used both as a linear layer and as a conv"
        if conv is not None:
            si, pi, _, gi = conv
            args = list(node.args) + [None] * 7
            problem = _conv_problem(tuple(site.weight.shape[2:]), args[si] if args[si] is not None else 1,
                                    args[pi] if args[pi] is not None else 0, args[gi] if args[gi] is not None else 1)
            site.problem = site.problem or problem
        site.nodes.append(node)
    return sites


def _check_uses(gm: GraphModule, sites: dict[str, _Site]) -> None:
    """A weight read anywhere but its layer's calls, or shared with another name, keeps its layer dense."""
    site_nodes = {n for s in sites.values() for n in s.nodes}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        layer, _, attr = node.target.rpartition(".")
        site = sites.get(layer)
        if site is None or attr not in ("weight", "bias"):
            continue
        if any(user not in site_nodes for user in node.users):
            site.problem = site.problem or f"its {attr} is read outside the layer call"
    owners: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for site in sites.values():
        names = owners.get(id(site.weight), [])
        if len(names) > 1:
            site.problem = site.problem or f"its weight is tied to {', '.join(n for n in names if n != site.layer + '.weight')}"


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


def _best_time(fn: Callable[[], Any], budget: float = 0.2, runs: int = 15) -> float:
    """Fastest seconds of ``fn`` over up to ``runs`` calls (after one warm-up), stopping after ``budget`` s.

    The minimum, not the median: on a shared machine a run is only ever slowed down (a descheduled
    thread costs a whole time slice), so the fastest run is the layer's own cost.
    """
    fn()
    best = float("inf")
    start = time.perf_counter()
    for i in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() - start > budget:
            break
    return best


def measure(dense: Tensor, bias: Tensor | None, layer: SparseLinear, batch_size: int) -> tuple[float, float]:
    """Seconds per call of the dense matrix product and of ``layer``'s sparse one on ``batch_size`` random rows."""
    x = torch.randn(batch_size, layer.in_features, dtype=dense.dtype, device=dense.device)
    matrix = dense.reshape(layer.out_features, layer.in_features)
    cols = x.T if batch_size > 1 else x[0]
    with torch.inference_mode():
        t_dense = _best_time(lambda: F.linear(x, matrix, bias))
        t_sparse = _best_time(lambda: layer._matmul(cols))
    return t_dense, t_sparse


#: the measuring function ``auto`` uses (tests replace it to make decisions deterministic)
MEASURE: Callable[[Tensor, Tensor | None, SparseLinear, int], tuple[float, float]] = measure


def _decide(site: _Site, storage: str, batch_size: int, masked: bool) -> tuple[SparseLinear | None, StorageChoice]:
    weight = site.weight.detach()
    shape = tuple(weight.shape)
    zeros = 1.0 - int((weight != 0).sum()) / max(weight.numel(), 1)

    def dense(why: str) -> tuple[None, StorageChoice]:
        return None, StorageChoice(site.layer, shape, zeros, "dense", why)

    if not masked:
        return dense("not a masked weight")
    if site.problem:
        return dense(site.problem)
    if weight.device.type == "cpu" and weight.dtype not in KERNEL_DTYPES:
        return dense(f"{weight.dtype} has no CPU sparse kernel (float32 / float64 only)")
    if weight.layout != torch.strided:
        return dense(f"the weight is already {weight.layout}")
    matrix = weight.reshape(shape[0], -1)
    if storage in ("csr", "bsr"):
        block = _block_of(matrix) if storage == "bsr" else 1
        layer = SparseLinear(weight, site.bias, storage, block, site.spatial)
        kind = "csr" if storage == "csr" else f"bsr {block}x{block}"
        return layer, StorageChoice(site.layer, shape, zeros, kind, f"storage={storage!r} asked for")
    # auto
    if zeros < MIN_SPARSITY:
        return dense(f"{zeros:.0%} zeros: below the {MIN_SPARSITY:.0%} where a sparse kernel can pay (cost model)")
    candidates = [SparseLinear(weight, site.bias, "csr", 1, site.spatial)]
    block = _block_of(matrix)
    if block >= 4:
        candidates.append(SparseLinear(weight, site.bias, "bsr", block, site.spatial))
    timed = []
    for layer in candidates:
        t_dense, t_sparse = MEASURE(weight, site.bias, layer, batch_size)
        timed.append((t_sparse / t_dense, layer))
    ratio, best = min(timed, key=lambda t: t[0])
    kind = "csr" if best.layout == "csr" else f"bsr {best.blocksize}x{best.blocksize}"
    measured = ", ".join(f"{'csr' if c.layout == 'csr' else f'bsr {c.blocksize}x{c.blocksize}'} {r:.2f}x" for r, c in timed)
    if ratio <= MARGIN:
        return best, StorageChoice(site.layer, shape, zeros, kind,
                                   f"measured {measured} dense at batch {batch_size}")
    return dense(f"measured {measured} dense at batch {batch_size} (sparse only at <= {MARGIN}x)")


# --- the pass -------------------------------------------------------------------------------------------
def check_storage(storage: str, batch_size: int) -> None:
    """A ``ValueError`` / ``TypeError`` for a storage name or batch size squash cannot use."""
    if storage not in STORAGES:
        raise ValueError(f"squash(storage={storage!r}): unknown storage; use one of {', '.join(map(repr, STORAGES))}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TypeError(f"squash(batch_size={batch_size!r}): the batch size hint must be a positive int")


def apply_sparse_storage(gm: GraphModule, state: SparsityState, storage: str = "csr",
                         batch_size: int = 1) -> StorageResult:
    """Give the masked Linear / 1×1 Conv layers of the squashed ``gm`` sparse storage, in place.

    ``created`` maps each considered layer to ``{"storage": ..., "why": ...}``; ``choices`` holds the
    same decisions as :class:`StorageChoice` records (``squash`` keeps them as ``small.storage_choices``).
    """
    check_storage(storage, batch_size)
    if storage == "dense":
        return _result(gm, {}, [])
    masked = {r.param for r in state.targets.values() if r.kind == "weight" and r.param}
    if storage == "semi_structured":
        return _apply_semi_structured(gm, masked)
    sites = {**_module_sites(gm), **_function_sites(gm)}
    _check_uses(gm, sites)
    choices: list[StorageChoice] = []
    created: dict[str, dict[str, str]] = {}
    for layer, site in sites.items():
        sparse, choice = _decide(site, storage, batch_size, f"{layer}.weight" in masked)
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
    sites = {**_module_sites(gm), **_function_sites(gm)}
    _check_uses(gm, sites)
    linear = {layer: site for layer, site in sites.items() if f"{layer}.weight" in masked and not site.spatial}
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
                raise ValueError(f"squash(storage='semi_structured'): layer {layer!r} cannot be stored 2:4 "
                                 f"semi-structured: {problem}; or squash with storage='dense' / 'csr'")
            try:
                layers[layer] = SemiStructuredLinear(weight, site.bias)
            except (RuntimeError, NotImplementedError) as err:  # torch's shape / device-capability checks
                raise ValueError(f"squash(storage='semi_structured'): layer {layer!r} ({tuple(weight.shape)}, "
                                 f"{weight.dtype}): torch.sparse.to_sparse_semi_structured refused it: {err}; "
                                 "squash with storage='dense' instead") from None
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


def _install(gm: GraphModule, site: _Site, layer: nn.Module) -> None:
    """Put ``layer`` at the site's path and make every call of the site a ``call_module`` of it."""
    owner, _, leaf = site.layer.rpartition(".")
    gm.get_submodule(owner).add_module(leaf, layer)
    graph = gm.graph
    for node in site.nodes:
        if node.op == "call_module":
            continue
        with graph.inserting_before(node):
            new = graph.call_module(site.layer, (node.args[0],))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def storage_table(choices: list[StorageChoice]) -> str:
    """The per-layer storage decisions as a table."""
    rows = [[c.layer, "x".join(map(str, c.shape)), f"{c.sparsity:.1%}", c.storage, c.why] for c in choices]
    return tabulate(rows, headers=["layer", "shape", "zeros", "storage", "why"], tablefmt="github",
                    disable_numparse=True)
