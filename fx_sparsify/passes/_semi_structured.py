"""``squash(storage="semi_structured")`` (SPEC §11): 2:4 ``Linear`` weights on CUDA as
``torch.sparse.to_sparse_semi_structured`` tensors (NVIDIA sparse tensor cores, compute capability 8.0+).

Used by :mod:`.sparse_storage`. Every masked ``Linear`` must be 2:4 (at most two non-zeros in each
run of four along the input dim), float16 / bfloat16 and on a CUDA device; anything else is a
``ValueError`` naming the layer, what it is and what to use instead, raised before any layer is
converted. Unmasked layers and 1x1 convs stay dense (the kernels cover ``Linear`` only).

The CUDA path was written without a GPU to run it on; its test (tests/passes/test_sparse_storage.py)
skips where CUDA is not available.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DTYPES", "SemiStructuredLinear", "semi_structured_problem"]

#: the dtypes fx_sparsify converts (torch's fp32 / int8 semi-structured paths are not offered)
DTYPES = (torch.float16, torch.bfloat16)


def semi_structured_problem(weight: Tensor) -> str | None:
    """Why ``weight`` cannot be stored 2:4 semi-structured (device aside), or None when it can."""
    if weight.dim() != 2:
        return f"its weight has {weight.dim()} dims (only Linear weights, [out, in])"
    if weight.dtype not in DTYPES:
        return (
            f"its weight is {weight.dtype} (2:4 kernels take float16 / bfloat16 here): convert the model with "
            ".half() or .bfloat16() before sparsify_graph"
        )
    out_features, in_features = weight.shape
    if in_features % 4:
        return f"in_features={in_features} is not a multiple of 4 (2:4 groups four input columns)"
    rows, cols = _min_tile(weight.dtype)
    if out_features % rows or in_features % cols:
        return (
            f"its weight is {out_features}x{in_features}: torch's 2:4 kernels ({_backend().BACKEND}) take weights "
            f"whose out_features is a multiple of {rows} and in_features a multiple of {cols}; keep this layer "
            "dense (target it with a dense rule) or use storage='csr' / 'auto'"
        )
    per_group = (weight.detach() != 0).reshape(out_features, in_features // 4, 4).sum(dim=-1)
    bad = (per_group > 2).nonzero()
    if bad.numel():
        row, group = (int(v) for v in bad[0])
        return (
            f"its weight is not 2:4 sparse: row {row} has {int(per_group[row, group])} non-zeros in columns "
            f"{4 * group}..{4 * group + 3} ({bad.shape[0]} such groups); prune it with method '2:4'"
        )
    return None


def _backend() -> Any:
    """The class ``torch.sparse.to_sparse_semi_structured`` converts to (the same choice it makes)."""
    sparse = torch.sparse
    return (
        sparse.SparseSemiStructuredTensorCUTLASS
        if sparse.SparseSemiStructuredTensor._FORCE_CUTLASS
        else sparse.SparseSemiStructuredTensorCUSPARSELT
    )


def _min_tile(dtype: torch.dtype) -> tuple[int, int]:
    """The (rows, cols) a weight's shape must be a multiple of for that backend and dtype (torch's own table)."""
    shape = _backend()._DTYPE_SHAPE_CONSTRAINTS[dtype]
    return int(shape.sparse_min_rows), int(shape.sparse_min_cols)


def _convert(weight: Tensor) -> Tensor:
    return torch.sparse.to_sparse_semi_structured(weight.detach().contiguous())


class SemiStructuredLinear(nn.Module):
    """A ``Linear`` whose weight is a ``SparseSemiStructuredTensor`` (2:4, CUDA, float16 / bfloat16).

    ``state_dict()`` writes the weight dense under ``weight`` and ``load_state_dict`` takes a dense 2:4
    weight (re-converted). For inference: the weight takes no gradient.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.weight = nn.Parameter(_convert(weight), requires_grad=False)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_exporting():
            raise RuntimeError(
                "torch.export cannot trace a semi-structured sparse layer; squash with "
                "storage='dense' (the default) for export"
            )
        return F.linear(x.contiguous(), self.weight, self.bias)  # torch's semi-sparse linear views x as 2-D

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight.to_dense()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            return
        incoming = state_dict[key]
        shape = (self.out_features, self.in_features)
        if tuple(incoming.shape) != shape:
            error_msgs.append(
                f"size mismatch for {key}: copying a param with shape {tuple(incoming.shape)} from "
                f"checkpoint, the shape in current model is {shape}."
            )
        else:
            dense = incoming.to_dense() if incoming.layout != torch.strided else incoming
            dense = dense.to(device=self.weight.device, dtype=self.weight.dtype)
            problem = semi_structured_problem(dense)
            if problem:
                error_msgs.append(f"{key}: {problem} (a semi-structured layer keeps 2:4 weights only)")
            else:
                with torch.no_grad():
                    self.weight = nn.Parameter(_convert(dense), requires_grad=False)
        rest = {k: v for k, v in state_dict.items() if k != key}
        missing: list[str] = []
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing, unexpected_keys, error_msgs)
        missing_keys.extend(k for k in missing if k != key)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, 2:4 semi-structured, "
            f"bias={self.bias is not None}"
        )
