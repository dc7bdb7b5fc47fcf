"""The CSR / BSR layer of ``squash(storage="csr" / "bsr" / "auto")`` (see :mod:`.sparse_storage`)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._dense_weight_state import DenseWeightState

__all__ = ["KERNEL_DTYPES", "SparseLinear"]

#: dtypes with a CPU sparse kernel (MKL); others stay dense
KERNEL_DTYPES = (torch.float32, torch.float64)


class SparseLinear(DenseWeightState, nn.Module):
    """A ``Linear`` (or 1×1 ``Conv``) whose weight is stored as a CSR / BSR tensor with int32 indices.

    ``weight`` is the sparse tensor; ``state_dict()`` writes it dense under ``weight`` (the original
    key) and ``load_state_dict`` takes a dense weight. Meant for inference: the weight takes no gradient.
    """

    # buffers registered by _store
    crow_indices: Tensor
    col_indices: Tensor
    values: Tensor

    def __init__(
        self, weight: Tensor, bias: Tensor | None, layout: str = "csr", blocksize: int = 1, spatial: int = 0
    ) -> None:
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
        return build(
            self.crow_indices,
            self.col_indices,
            self.values,
            (self.out_features, self.in_features),
            check_invariants=False,
        )

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

    def extra_repr(self) -> str:
        kind = "csr" if self.layout == "csr" else f"bsr {self.blocksize}x{self.blocksize}"
        zeros = 1.0 - int((self.values != 0).sum()) / max(self.out_features * self.in_features, 1)
        conv = f", 1x1 conv{self.spatial}d" if self.spatial else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {kind}, {zeros:.1%} zeros"
            f"{conv}, bias={self.bias is not None}"
        )
