"""Multi-head attention that keeps working after some of its heads are removed.

``nn.MultiheadAttention`` assumes ``num_heads * head_dim == embed_dim``: its packed ``in_proj_weight``
is ``(3 * embed_dim, embed_dim)``. A ``heads`` rule removes whole heads (the q, k and v rows of a head
and the matching ``out_proj`` columns) while the module's input and output keep ``embed_dim``, so the
shrunk module computes with ``num_heads' * head_dim < embed_dim``. :func:`multi_head_attention` is
that computation (the one ``torch.nn.functional.multi_head_attention_forward`` does, with the inner
width read from the projection weights), and :class:`HeadPrunedMultiheadAttention` is the
``nn.MultiheadAttention`` whose ``forward`` calls it: ``squash(shrink=True)`` and ``squash_into(model,
shrink=True)`` give a shrunk attention that class, with ``num_heads`` updated (``head_dim`` and
``embed_dim`` stay).

For an export capture the attention is recorded as one op (:data:`MHA_OP`, while :func:`attention_as_op`
is active) instead of the ops torch.export would trace it into, whose sizes fold heads into the batch
dim and are fixed in the graph; the op reads its sizes from its tensors, so a shrunk graph runs it too. Squash
turns the op back into an ``nn.MultiheadAttention`` module call (:func:`attention_module`), which
``torch.export`` traces into torch's own ops and a pickle re-traces as one call.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "HeadPrunedMultiheadAttention",
    "multi_head_attention",
    "attention_as_op",
    "as_head_pruned",
    "MHA_OP",
    "MHA_CALL",
    "attention_call",
    "attention_module",
    "OP_TENSORS",
    "OP_CALL_ARGS",
]


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def multi_head_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    in_proj_weight: Tensor | None,
    in_proj_bias: Tensor | None,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    head_dim: int,
    batch_first: bool,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    q_proj_weight: Tensor | None = None,
    k_proj_weight: Tensor | None = None,
    v_proj_weight: Tensor | None = None,
    bias_k: Tensor | None = None,
    bias_v: Tensor | None = None,
    add_zero_attn: bool = False,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor | None]:
    """``nn.MultiheadAttention``'s computation with ``num_heads`` read from the projections (rows / ``head_dim``).

    A 3-D ``attn_mask`` holds one mask per head, so it must have ``batch * num_heads`` of the shrunk module.
    """
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    length, batch, _ = query.shape
    if in_proj_weight is not None:
        w_q, w_k, w_v = in_proj_weight.chunk(3)
    else:
        assert q_proj_weight is not None and k_proj_weight is not None and v_proj_weight is not None
        w_q, w_k, w_v = q_proj_weight, k_proj_weight, v_proj_weight
    b_q, b_k, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    heads = w_q.shape[0] // head_dim
    attn_mask = _float_mask(attn_mask, q.dtype)
    key_padding_mask = _float_mask(key_padding_mask, q.dtype)
    if bias_k is not None and bias_v is not None:
        k = torch.cat([k, bias_k.repeat(1, batch, 1)])
        v = torch.cat([v, bias_v.repeat(1, batch, 1)])
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    q = q.reshape(length, batch * heads, head_dim).transpose(0, 1)
    k = k.reshape(k.shape[0], batch * heads, head_dim).transpose(0, 1)
    v = v.reshape(v.shape[0], batch * heads, head_dim).transpose(0, 1)
    if add_zero_attn:
        k = torch.cat([k, k.new_zeros(batch * heads, 1, head_dim)], dim=1)
        v = torch.cat([v, v.new_zeros(batch * heads, 1, head_dim)], dim=1)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    source = k.shape[1]
    if attn_mask is not None and attn_mask.dim() == 3:
        if attn_mask.shape[0] != batch * heads:
            raise ValueError(
                f"a 3-D attn_mask holds one mask per head: this attention has {heads} heads after its heads were "
                f"removed, so it needs {batch * heads} masks, got {attn_mask.shape[0]}"
            )
        attn_mask = attn_mask.view(batch, heads, length, source)
    if key_padding_mask is not None:
        padding = key_padding_mask.view(batch, 1, 1, source)
        attn_mask = padding if attn_mask is None else attn_mask + padding
    q4, k4, v4 = (t.view(batch, heads, t.shape[1], head_dim) for t in (q, k, v))
    weights: Tensor | None = None
    if need_weights:
        scores = q4 @ k4.transpose(-2, -1) / math.sqrt(head_dim)
        if attn_mask is not None:
            scores = scores + attn_mask
        weights = torch.softmax(scores, dim=-1)
        out = F.dropout(weights, p=dropout_p) @ v4 if dropout_p > 0.0 else weights @ v4
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            weights = weights.squeeze(0)
    else:
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask, dropout_p)
    out = out.permute(2, 0, 1, 3).reshape(length, batch, heads * head_dim)
    out = F.linear(out, out_proj_weight, out_proj_bias)
    if not batched:
        out = out.squeeze(1)
    elif batch_first:
        out = out.transpose(0, 1)
    return out, weights


class HeadPrunedMultiheadAttention(nn.MultiheadAttention):
    """An ``nn.MultiheadAttention`` with ``num_heads * head_dim`` less than ``embed_dim`` (heads removed).

    Same parameters, state_dict keys and call signature; ``num_heads`` counts the heads left. Made from a
    shrunk ``nn.MultiheadAttention`` by :func:`as_head_pruned`, not constructed directly.
    """

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        # is_causal is a hint that attn_mask is causal; like nn.MultiheadAttention, the mask is what is applied
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True needs attn_mask (as for nn.MultiheadAttention)")
        return multi_head_attention(
            query,
            key,
            value,
            self.in_proj_weight,
            self.in_proj_bias,
            self.out_proj.weight,
            self.out_proj.bias,
            self.head_dim,
            self.batch_first,
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            self.q_proj_weight,
            self.k_proj_weight,
            self.v_proj_weight,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout if self.training else 0.0,
        )


def _projection(module: nn.MultiheadAttention) -> Tensor:
    return module.in_proj_weight if module.in_proj_weight is not None else module.q_proj_weight  # type: ignore[return-value]


def as_head_pruned(module: nn.Module) -> None:
    """Make a shrunk ``nn.MultiheadAttention`` a :class:`HeadPrunedMultiheadAttention` (in place) with
    ``num_heads`` from its projections; a module with all its heads is left as it is."""
    assert isinstance(module, nn.MultiheadAttention)
    rows = _projection(module).shape[0] // (3 if module.in_proj_weight is not None else 1)
    if type(module) is nn.MultiheadAttention and rows == module.embed_dim:
        return
    module.__class__ = HeadPrunedMultiheadAttention
    module.num_heads = rows // module.head_dim
    # nn.TransformerEncoderLayer / nn.TransformerEncoder take a fused fast path for a packed attention
    # whose heads fill embed_dim; this flag is one of the conditions that keeps them on the plain path
    module._qkv_same_embed_dim = False


def attention_call(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    in_proj_weight: Optional[Tensor],
    in_proj_bias: Optional[Tensor],
    out_proj_weight: Tensor,
    out_proj_bias: Optional[Tensor],
    head_dim: int,
    batch_first: bool,
    key_padding_mask: Optional[Tensor],
    need_weights: bool,
    attn_mask: Optional[Tensor],
    average_attn_weights: bool,
    q_proj_weight: Optional[Tensor],
    k_proj_weight: Optional[Tensor],
    v_proj_weight: Optional[Tensor],
    bias_k: Optional[Tensor],
    bias_v: Optional[Tensor],
    add_zero_attn: bool,
    dropout_p: float,
) -> tuple[Tensor, Tensor]:
    out, weights = multi_head_attention(
        query,
        key,
        value,
        in_proj_weight,
        in_proj_bias,
        out_proj_weight,
        out_proj_bias,
        head_dim,
        batch_first,
        key_padding_mask,
        need_weights,
        attn_mask,
        average_attn_weights,
        q_proj_weight,
        k_proj_weight,
        v_proj_weight,
        bias_k,
        bias_v,
        add_zero_attn,
        dropout_p,
    )
    return out, (weights if weights is not None else out.new_empty(0))


#: the attention as one custom op (None on a torch without torch.library.custom_op), and the overload graphs call
MHA_OP: Any = None
MHA_CALL: Any = None
if hasattr(torch, "library") and hasattr(torch.library, "custom_op"):
    MHA_OP = torch.library.custom_op("fx_sparsify::multi_head_attention", attention_call, mutates_args=())
    MHA_OP.register_fake(attention_call)  # the computation itself runs on fake tensors: shapes follow the weights
    MHA_CALL = torch.ops.fx_sparsify.multi_head_attention.default


def _as_op(module: nn.MultiheadAttention) -> Any:
    def forward(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        out, weights = MHA_OP(
            query,
            key,
            value,
            module.in_proj_weight,
            module.in_proj_bias,
            module.out_proj.weight,
            module.out_proj.bias,
            module.head_dim,
            module.batch_first,
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            module.q_proj_weight,
            module.k_proj_weight,
            module.v_proj_weight,
            module.bias_k,
            module.bias_v,
            module.add_zero_attn,
            module.dropout if module.training else 0.0,
        )
        return out, (weights if need_weights else None)

    return forward


#: MHA_OP's argument positions → the attention's tensor attribute / its call's arguments
OP_TENSORS: dict[int, str] = {
    3: "in_proj_weight",
    4: "in_proj_bias",
    5: "out_proj.weight",
    6: "out_proj.bias",
    13: "q_proj_weight",
    14: "k_proj_weight",
    15: "v_proj_weight",
    16: "bias_k",
    17: "bias_v",
}
OP_CALL_ARGS: dict[int, str] = {
    0: "query",
    1: "key",
    2: "value",
    9: "key_padding_mask",
    10: "need_weights",
    11: "attn_mask",
    12: "average_attn_weights",
}


def _attach(module: nn.Module, name: str, tensor: Tensor | None) -> None:
    if tensor is None or isinstance(tensor, nn.Parameter):
        module.register_parameter(name, tensor)  # type: ignore[arg-type]
    else:
        module.register_buffer(name, tensor)


def attention_module(
    tensors: dict[str, Tensor | None], head_dim: int, batch_first: bool, add_zero_attn: bool, dropout: float
) -> nn.MultiheadAttention:
    """An ``nn.MultiheadAttention`` (a :class:`HeadPrunedMultiheadAttention` when heads are gone) holding
    ``tensors`` (the same objects, by the names of :data:`OP_TENSORS`)."""
    module = nn.MultiheadAttention.__new__(nn.MultiheadAttention)
    nn.Module.__init__(module)
    out_weight = tensors["out_proj.weight"]
    assert out_weight is not None
    packed = tensors["in_proj_weight"] is not None
    module.embed_dim = out_weight.shape[0]
    k_weight, v_weight = tensors["k_proj_weight"], tensors["v_proj_weight"]
    module.kdim = module.embed_dim if packed or k_weight is None else k_weight.shape[1]
    module.vdim = module.embed_dim if packed or v_weight is None else v_weight.shape[1]
    module._qkv_same_embed_dim = packed
    module.head_dim, module.batch_first, module.add_zero_attn, module.dropout = (
        head_dim,
        batch_first,
        add_zero_attn,
        dropout,
    )
    module.num_heads = module.embed_dim // head_dim
    for name in (
        "in_proj_weight",
        "in_proj_bias",
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "bias_k",
        "bias_v",
    ):
        _attach(module, name, tensors[name])
    out_proj = nn.modules.linear.NonDynamicallyQuantizableLinear.__new__(
        nn.modules.linear.NonDynamicallyQuantizableLinear
    )
    nn.Module.__init__(out_proj)
    out_proj.out_features, out_proj.in_features = out_weight.shape
    _attach(out_proj, "weight", out_weight)
    _attach(out_proj, "bias", tensors["out_proj.bias"])
    module.out_proj = out_proj
    as_head_pruned(module)
    return module


@contextlib.contextmanager
def attention_as_op(modules: list[nn.MultiheadAttention]) -> Iterator[None]:
    """While active, ``modules`` run as one :data:`MHA_OP` call (what torch.export records for them)."""
    if MHA_OP is None:  # a torch without torch.library.custom_op: the attention is traced into its ops
        yield
        return
    own = {id(m): vars(m)["forward"] for m in modules if "forward" in vars(m)}  # a forward set on the instance
    for module in modules:
        module.forward = _as_op(module)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for module in modules:
            del module.forward
            if id(module) in own:
                module.forward = own[id(module)]  # type: ignore[method-assign]
