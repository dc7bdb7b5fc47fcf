"""Bitmask storage (SPEC §18): a weight held as its kept values plus a packed 1-bit mask, and its layer.

The layout is the compressed checkpoint's (``_compressed.py``): for a ``[rows, cols]`` weight, ``values``
are the entries whose bits are not all zero, row-major; ``mask`` is uint8 ``[rows, ceil(cols / 8)]``,
least significant bit first; ``row_offsets`` (int64 ``[rows + 1]``) say where each row starts in
``values``. At run time ``values`` carries :data:`~._native.BITMASK_PAD` zeros after the last kept
entry (the kernel's vector loads read whole 16-wide groups).

``torch.ops.fx_sparsify.bitmask_linear(x, values, mask, row_offsets, bias, in_features, pick)`` is
``F.linear(x, W, bias)`` for that W (``pick``: the mask's pick index or None, see ``_native.pick_index``): a
``torch.library`` custom op with a fake (meta) implementation, so ``torch.export`` and ``torch.compile`` take
it, and a backward through the dense product. It runs the C kernel of ``_kernels.c`` (float32 / bfloat16
values, float32 sums, the rows split across ``torch.get_num_threads()`` threads) where it was built, else
expands the weight and calls ``F.linear`` (the same result up to the summation order).

:class:`BitmaskLinear` is the layer ``squash(storage="bitmask")`` installs for a ``Linear``, a 1×1
``Conv`` or a GPT-2 ``Conv1D``; its ``state_dict()`` holds the dense weight under the original key.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _native
from ._dense_weight_state import DenseWeightState

try:  # numpy packs bits ~10x faster than the torch fallback; optional
    import numpy as _np
except ModuleNotFoundError:  # pragma: no cover - exercised by monkeypatching _np in the tests
    _np = None  # type: ignore[assignment]

__all__ = [
    "MODEL_MARGIN",
    "BitmaskLinear",
    "bitmask_linear",
    "dense_of",
    "install_from_checkpoint",
    "modelled_ratio",
    "pack",
    "padded",
    "row_offsets_of",
]

#: dtype → the integer dtype of the same width (an entry is kept when any of its bits is set)
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


def pack(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(values, mask, row_offsets)`` of a dense 2-D floating tensor (values padded for the kernel); entries
    equal to zero (+0.0 and -0.0) are left out."""
    if matrix.dim() != 2 or not matrix.is_floating_point() or matrix.element_size() not in _BITS:
        raise ValueError(f"bitmask storage takes a 2-D floating-point weight, got {matrix.dtype} {tuple(matrix.shape)}")
    matrix = matrix.detach().contiguous()
    rows, cols = matrix.shape
    keep = matrix != 0  # -0.0 is dropped too (it adds nothing to a product); NaN is kept
    if _np is not None and matrix.device.type == "cpu":
        mask = torch.from_numpy(_np.packbits(keep.numpy(), axis=-1, bitorder="little"))
    else:
        bits = torch.zeros(rows, math.ceil(cols / 8) * 8, dtype=torch.uint8, device=matrix.device)
        bits[:, :cols] = keep
        mask = (bits.view(rows, -1, 8) * _WEIGHTS.to(matrix.device)).sum(-1, dtype=torch.uint8)
    counts = keep.sum(dim=1)
    offsets = torch.zeros(rows + 1, dtype=torch.int64, device=matrix.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return padded(matrix[keep]), _kernel_buffer(mask.reshape(rows, (cols + 7) // 8)), offsets


def _kernel_buffer(t: Tensor, pad: int = 0) -> Tensor:
    """A contiguous copy of ``t`` (flattened, then ``pad`` zeros, when ``pad``) for the kernel: on the CPU in
    memory asked for huge pages (:func:`._native.empty_on_huge_pages`)."""
    if t.device.type != "cpu":
        return torch.cat([t.reshape(-1), t.new_zeros(pad)]) if pad else t.contiguous()
    out = _native.empty_on_huge_pages(t.numel() + pad, t.dtype)
    out[: t.numel()] = t.reshape(-1)
    out[t.numel() :] = 0
    return out if pad else out.view(t.shape)


def padded(values: Tensor) -> Tensor:
    """``values`` (the kept entries) followed by the zeros the kernel may read past the last one."""
    return _kernel_buffer(values, _native.BITMASK_PAD)


def row_offsets_of(mask: Tensor, cols: int) -> Tensor:
    """int64 ``[rows + 1]``: where each row of a packed ``[rows, ceil(cols / 8)]`` mask starts among the values
    (only the first ``cols`` bits of a row count). Works on the mask's bytes: no per-entry tensor is made."""
    return _native.mask_row_offsets(mask, cols)


def dense_of(values: Tensor, mask: Tensor, row_offsets: Tensor, cols: int) -> Tensor:
    """The dense ``[rows, cols]`` weight (pruned entries +0.0): the torch path, no C kernel needed."""
    rows = mask.shape[0]
    keep = ((mask.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=mask.device)) & 1).bool()
    keep = keep.reshape(rows, mask.shape[1] * 8)[:, :cols]
    out = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    return out.masked_scatter_(keep, values)  # takes the first (kept-count) values: the padding is never read


# --- the cost model of ``squash(storage="auto-model")`` -----------------------------------------------------
#: auto-model takes bitmask only where the modelled time is at or below this fraction of dense
MODEL_MARGIN = 0.8
#: (dtype, largest batch) → (a, b): time / dense ≈ a + b · (1 − zeros), fitted to benchmarks/bench_storage.py
#: on an AMD EPYC (Zen 4, AVX-512) with one thread: the kernel is bound by its 16-column steps as much as
#: by its bytes, so the time falls slower than the byte ratio. Past the largest batch listed: dense.
MODEL: dict[torch.dtype, tuple[tuple[int, float, float], ...]] = {
    torch.float32: ((1, 0.25, 1.0), (8, 0.22, 0.4)),
    torch.bfloat16: ((1, 0.15, 0.8),),
}
#: the model's time multiplied by this on the slower kernel paths
ISA_FACTOR = {"avx512vbmi2": 1.0, "avx512": 1.0, "avx2": 1.15, "portable": 3.0}


#: below this many weight entries a call's fixed cost (~30 us: the custom op, the checks, the hand-off to C)
#: outweighs the bytes saved: the model says dense
MODEL_MIN_ENTRIES = 1 << 20


def modelled_ratio(
    zeros: float, dtype: torch.dtype, batch_size: int, isa: str | None, entries: int = MODEL_MIN_ENTRIES
) -> float:
    """The bitmask layer's modelled time / dense ``F.linear`` for a weight of ``entries`` entries with that
    fraction of zeros (``inf`` where it never pays: no kernel, a small layer, a dtype or batch size past the
    model)."""
    if entries < MODEL_MIN_ENTRIES:
        return math.inf
    for largest, a, b in MODEL.get(dtype, ()):
        if batch_size <= largest and isa is not None:
            return (a + b * (1.0 - zeros)) * ISA_FACTOR[isa]
    return math.inf


# --- the custom op ----------------------------------------------------------------------------------------
_SCHEMA = (
    "(Tensor x, Tensor values, Tensor mask, Tensor row_offsets, Tensor? bias, int in_features, Tensor? pick=None) "
    "-> Tensor"
)


def _check(x: Tensor, values: Tensor, mask: Tensor, in_features: int) -> None:
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise RuntimeError(
            f"bitmask_linear: the input's last dimension must be in_features={in_features}, got "
            f"input of shape {tuple(x.shape)}"
        )
    if x.dtype != values.dtype:
        raise RuntimeError(
            f"bitmask_linear: expected the input in the weight's dtype {values.dtype}, got {x.dtype} "
            "(cast the input, or the module with .to(dtype))"
        )
    if mask.dim() != 2 or mask.shape[1] != (in_features + 7) // 8:
        raise RuntimeError(
            f"bitmask_linear: a mask of shape {tuple(mask.shape)} does not fit in_features={in_features}"
        )


def _product(
    x: Tensor,
    values: Tensor,
    mask: Tensor,
    row_offsets: Tensor,
    bias: Tensor | None,
    in_features: int,
    pick: Tensor | None = None,
) -> Tensor:
    """``F.linear(x, W, bias)`` for the weight W held as ``values`` / ``mask`` / ``row_offsets`` (see the module):
    the op's body. The layer calls it directly where the op's dispatch would only cost time (~0.1 ms a call:
    eager, no gradient wanted, nothing tracing)."""
    _check(x, values, mask, in_features)
    rows = mask.shape[0]
    flat = x.reshape(math.prod(x.shape[:-1]), in_features)  # not -1: ambiguous for a layer without inputs
    y = _native.bitmask_linear(flat, values, mask, row_offsets, bias, pick)
    if y is None:  # no C kernel for this (not built, a dtype it lacks, another device): expand and F.linear
        return F.linear(x, dense_of(values, mask, row_offsets, in_features), bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], rows)


bitmask_linear = torch.library.custom_op("fx_sparsify::bitmask_linear", mutates_args=(), schema=_SCHEMA)(_product)


@bitmask_linear.register_fake
def _(
    x: Tensor,
    values: Tensor,
    mask: Tensor,
    row_offsets: Tensor,
    bias: Tensor | None,
    in_features: int,
    pick: Tensor | None = None,
) -> Tensor:
    _check(x, values, mask, in_features)
    return x.new_empty((*x.shape[:-1], mask.shape[0]))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, values, mask, row_offsets, bias, in_features, _ = inputs
    ctx.save_for_backward(x, values, mask, row_offsets)
    ctx.in_features = in_features


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    """Through the dense product: d/dx = grad @ W, d/dbias = the sum of grad, d/dvalues = (gradᵀ x) at the
    kept entries."""
    x, values, mask, row_offsets = ctx.saved_tensors
    rows, cols = mask.shape[0], ctx.in_features
    g = grad.reshape(math.prod(grad.shape[:-1]), rows)
    gx = gv = gb = None
    if ctx.needs_input_grad[0]:
        gx = (g @ dense_of(values, mask, row_offsets, cols)).reshape(x.shape)
    if ctx.needs_input_grad[1]:
        full = g.T @ x.reshape(g.shape[0], cols)
        keep = dense_of(torch.ones_like(values), mask, row_offsets, cols) != 0
        gv = torch.cat([full[keep], values.new_zeros(_native.BITMASK_PAD)])
    if ctx.needs_input_grad[4]:
        gb = g.sum(dim=0)
    return gx, gv, None, None, gb, None, None


bitmask_linear.register_autograd(_backward, setup_context=_setup_context)


# --- the layer --------------------------------------------------------------------------------------------
#: a layer with at most this fraction of its entries kept holds a pick index (:func:`._native.pick_index`) where
#: the CPU has AVX-512: its batch-1 products pick x's entries at the kept columns. On AMD Zen 4 (LLaMA-7B MLP
#: shapes, data not in cache) the pick path beat the expand path from ~80 % zeros on (at 80 %: ~0.29x dense
#: against ~0.35x; at 70-75 % no better; at 90 %: 0.16-0.20x against 0.24-0.32x)
PICK_KEPT = 0.2


def _pick_of(mask: Tensor, row_offsets: Tensor, cols: int) -> Tensor | None:
    """The mask's pick index where the layer is sparse enough and the kernel can use it, else None."""
    entries = mask.shape[0] * cols
    if mask.device.type != "cpu" or not entries or int(row_offsets[-1]) > PICK_KEPT * entries:
        return None
    if _native.bitmask_isa() not in ("avx512", "avx512vbmi2"):
        return None
    return _native.pick_index(mask, cols)


class BitmaskLinear(DenseWeightState, nn.Module):
    """A ``Linear`` (or 1×1 ``Conv``, or GPT-2 ``Conv1D``) whose weight is held in bitmask storage.

    ``values`` / ``mask`` / ``row_offsets`` (and ``pick``, the pick index of a sparse layer, or None) are plain
    non-persistent buffers (``.to()``, deepcopy and pickle work); ``state_dict()`` writes the dense weight under
    ``weight`` (the original key and shape) and ``load_state_dict`` takes a dense weight (packed again).
    Gradients reach the input and the bias through the dense product.
    """

    # buffers registered in __init__
    values: Tensor
    mask: Tensor
    row_offsets: Tensor
    pick: Tensor | None

    def __init__(self, weight: Tensor, bias: Tensor | None, spatial: int = 0, transposed: bool = False) -> None:
        super().__init__()
        self.spatial = spatial  # 0 for Linear, 1/2/3 for a 1×1 Conv1d/2d/3d
        self.transposed = transposed  # GPT-2 Conv1D: the weight is [in, out]
        self.weight_shape = tuple(weight.shape)
        self.out_features, self.in_features = self._sizes(self.weight_shape)
        self._store(weight)
        self.bias = nn.Parameter(bias.detach(), requires_grad=bias.requires_grad) if bias is not None else None

    def _sizes(self, shape: tuple[int, ...]) -> tuple[int, int]:
        if self.transposed:
            return int(shape[1]), int(shape[0])
        return int(shape[0]), int(math.prod(shape[1:]))

    @classmethod
    def from_parts(
        cls, values: Tensor, mask: Tensor, shape: tuple[int, ...], bias: Tensor | None = None, spatial: int = 0
    ) -> BitmaskLinear:
        """A layer straight from a compressed checkpoint's parts (no dense weight is made): ``values`` (the kept
        entries, row-major) and ``mask`` (uint8 ``[shape[0], ceil(prod(shape[1:]) / 8)]``)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.spatial, layer.transposed, layer.weight_shape = spatial, False, tuple(shape)
        layer.out_features, layer.in_features = layer._sizes(layer.weight_shape)
        offsets = row_offsets_of(mask, layer.in_features)
        if int(offsets[-1]) != values.numel():
            raise ValueError(
                f"bitmask storage: the mask marks {int(offsets[-1])} entries, {values.numel()} values given"
            )
        layer.register_buffer("values", padded(values), persistent=False)
        layer.register_buffer("mask", _kernel_buffer(mask), persistent=False)
        layer.register_buffer("row_offsets", offsets, persistent=False)
        layer.register_buffer("pick", _pick_of(layer.mask, offsets, layer.in_features), persistent=False)
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None
        return layer

    def _store(self, dense: Tensor) -> None:
        matrix = dense.detach()
        matrix = matrix.T if self.transposed else matrix.reshape(self.out_features, self.in_features)
        values, mask, offsets = pack(matrix)
        self.register_buffer("values", values, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("row_offsets", offsets, persistent=False)
        self.register_buffer("pick", _pick_of(mask, offsets, self.in_features), persistent=False)

    def dense_weight(self) -> Tensor:
        """The weight as a dense tensor of the original layer's shape."""
        matrix = dense_of(self.values, self.mask, self.row_offsets, self.in_features)
        return matrix.T.contiguous() if self.transposed else matrix.reshape(self.weight_shape)

    @property
    def weight(self) -> Tensor:
        """The dense weight (made on each access: for inspection, not for the forward)."""
        return self.dense_weight()

    def forward(self, x: Tensor) -> Tensor:
        if not self.spatial:
            return self._linear(x)
        batched = x.dim() == self.spatial + 2
        xb = x if batched else x.unsqueeze(0)
        y = self._linear(xb.movedim(1, -1)).movedim(-1, 1)  # rows: [N, *space, C]
        return y if batched else y[0]

    def _linear(self, x: Tensor) -> Tensor:
        """The custom op, or its body straight away where the op would add only its dispatch: in eager mode
        with no gradient wanted (the op's autograd and its trace by compile / export are kept otherwise)."""
        args = (x, self.values, self.mask, self.row_offsets, self.bias, self.in_features, self.pick)
        wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:5])
        if wants_grad or _native.transformed():
            return torch.ops.fx_sparsify.bitmask_linear(*args)
        return _product(*args)

    def extra_repr(self) -> str:
        zeros = 1.0 - int(self.row_offsets[-1]) / max(self.out_features * self.in_features, 1)
        kind = f", 1x1 conv{self.spatial}d" if self.spatial else (", Conv1D" if self.transposed else "")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bitmask, {zeros:.1%} zeros"
            f"{kind}, bias={self.bias is not None}"
        )


# --- straight from a compressed checkpoint ------------------------------------------------------------------
def _spatial_of(module: nn.Module) -> int | None:
    """0 for a Linear, 1/2/3 for a 1×1 Conv (stride 1, no padding, one group); None for anything else."""
    if type(module) is nn.Linear:
        return 0
    if type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        conv: Any = module
        if (
            all(k == 1 for k in conv.kernel_size)
            and all(s == 1 for s in conv.stride)
            and conv.groups == 1
            and (conv.padding in ("valid", "same") or all(p == 0 for p in conv.padding))
            and conv.padding_mode == "zeros"
        ):
            return len(conv.kernel_size)
    return None


def install_from_checkpoint(
    model: nn.Module, names: dict[str, str], parts: dict[str, dict[str, Tensor]], shapes: dict[str, tuple[int, ...]]
) -> dict[str, str]:
    """``load_compressed(path, model, storage="bitmask")``: each compressed ``<layer>.weight`` of a Linear / 1×1
    Conv of ``model`` becomes a :class:`BitmaskLinear` built from the file's values and mask (no dense copy).
    ``names`` maps stored prefixes to state dict names, ``parts`` a prefix to its validated parts. Returns
    the entries of ``names`` it did not install (other layers, tied weights, dtypes the kernel lacks): the
    caller loads those as dense tensors. The installed layers' biases are loaded by the caller too."""
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    left = {}
    for prefix, name in names.items():
        layer, _, leaf = name.rpartition(".")
        module = model.get_submodule(layer) if leaf == "weight" else None
        spatial = None if module is None else _spatial_of(module)
        values, mask = parts[prefix]["compressed"], parts[prefix]["bitmask"]
        weight: Any = None if module is None else module.weight
        if (
            spatial is None
            or module is None
            or owners.get(id(weight), 0) > 1
            or module._forward_hooks
            or module._forward_pre_hooks
            or tuple(weight.shape) != shapes[name]
        ):
            left[prefix] = name
            continue
        dtype = weight.dtype if weight.device.type != "meta" else values.dtype
        if dtype not in _native.BITMASK_DTYPES:
            left[prefix] = name
            continue
        bias: Any = module.bias
        if bias is not None and bias.device.type == "meta":  # an empty (meta) model: memory for the file's bias
            bias = torch.empty(bias.shape, dtype=bias.dtype)
        new = BitmaskLinear.from_parts(values.to(dtype), mask.clone(), shapes[name], bias, spatial)
        new.train(module.training)
        parent, _, child = layer.rpartition(".")
        model.get_submodule(parent).add_module(child, new)
    return left
