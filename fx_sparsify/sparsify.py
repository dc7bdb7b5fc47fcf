"""``fxs.Sparsify``: a standalone sparsifying module in the spirit of d-Matrix's ``Sparsify``.

    >>> sp = Sparsify((4, 8), sparseness="TOPK{0.5}", backward_mode="STE")
    >>> y = sp(torch.randn(4, 8))          # x * mask, mask from the scores of x
    >>> sp.density
    0.5

``backward_mode``:
- ``"STE"``: the mask is recomputed from ``|x|``-style scores of the input on every forward; the
  gradient reaches every entry of ``x`` (straight-through), so pruned entries can come back.
- ``"MASK"``: as ``STE`` but the gradient is masked too (pruned entries get zero gradient).
- ``"supermask"``: a learnable ``scores`` parameter ranks the mask; ``x`` gets no gradient; the scores
  get ``grad_out * x`` through a straight-through estimator. ``bernoulli`` samples
  ``sigmoid(scores)`` while training (deterministic ``sigmoid(scores) > 0.5`` in eval).
- ``"joint"``: as ``supermask`` and ``x`` is trained too (masked gradient).

The graph passes use the same module for rules with ``"gradient": "supermask"`` / ``"joint"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .methods import get_mask_method, parse_method
from .methods._registry import validate_options

__all__ = ["Sparsify", "BACKWARD_MODES"]

BACKWARD_MODES = ("STE", "MASK", "supermask", "joint")
_MODE_ALIASES = {"ste": "STE", "mask": "MASK", "U": "STE", "M": "MASK"}


class Sparsify(nn.Module):
    """``forward(x) = x * mask`` with a mask method and a choice of gradient (see module docstring)."""

    def __init__(
        self,
        shape: tuple[int, ...] | torch.Size,
        sparseness: str = "DENSE",
        backward_mode: str | None = None,
        generator: torch.Generator | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.generator = generator
        self.register_buffer("mask", torch.ones(self.shape, dtype=torch.bool))  # bool keep-mask (SPEC §15)
        self.scores: nn.Parameter | None = None
        self.options: dict[str, Any] = {}
        self.method, self.backward_mode = "dense", "STE"
        self.configure(sparseness=sparseness, backward_mode=backward_mode, **options)

    def configure(self, sparseness: str | None = None, backward_mode: str | None = None, **options: Any) -> Sparsify:
        """Change the method (a name or shorthand, with options) and/or the backward mode.

        ``backward_mode`` defaults to the shorthand's ``(U)`` / ``(M)`` suffix, else stays as it is
        (``"STE"`` for a new module). A bad argument raises and leaves the module unchanged.
        """
        method, merged = self.method, {**self.options, **options}
        if sparseness is not None:
            parsed = parse_method(sparseness)
            method, merged = get_mask_method(parsed.name).name, {**parsed.options, **options}
            backward_mode = backward_mode or parsed.gradient
        validate_options(method, merged)
        mode = _MODE_ALIASES.get(backward_mode, backward_mode) if backward_mode else self.backward_mode
        if mode not in BACKWARD_MODES:
            raise ValueError(f"backward_mode={backward_mode!r}: use one of {', '.join(BACKWARD_MODES)}")
        self.method, self.options, self.backward_mode = method, merged, mode
        if mode in ("supermask", "joint") and self.scores is None:
            self.scores = nn.Parameter(torch.randn(self.shape).abs_().mul_(0.01))
        return self

    @property
    def density(self) -> float:
        """Fraction of entries the current mask keeps."""
        return float((self.mask != 0).float().mean())

    def init_scores(self, values: Tensor) -> None:
        """Start the learnable scores from ``values`` (for example ``|weight|``)."""
        if self.scores is None:
            raise ValueError("init_scores() needs backward_mode 'supermask' or 'joint'")
        with torch.no_grad():
            self.scores.copy_(values)

    def keep_mask(self, scores: Tensor, options: dict[str, Any] | None = None) -> Tensor:
        """The keep-mask of ``scores`` under the configured method (or ``options``); nothing is stored."""
        with torch.no_grad():
            if self.method == "bernoulli" and self.scores is not None:
                prob = torch.sigmoid(scores)
                return torch.bernoulli(prob, generator=self.generator) if self.training else (prob > 0.5).float()
            return get_mask_method(self.method)(scores, generator=self.generator, **(options or self.options))

    def compute_mask(self, scores: Tensor) -> Tensor:
        """The bool keep-mask of ``scores`` under the configured method (stored in ``self.mask``)."""
        self.mask = self.keep_mask(scores).to(device=scores.device, dtype=torch.bool)
        return self.mask

    def forward(self, x: Tensor) -> Tensor:
        if self.backward_mode in ("supermask", "joint"):
            assert self.scores is not None
            scores = self.scores
            mask = self.compute_mask(scores.detach())
            probe = torch.sigmoid(scores) if self.method == "bernoulli" else scores
            through = probe - probe.detach()  # value 0; gradient: straight through to the scores
            ste_mask = mask + through  # value: mask
            base = x if self.backward_mode == "joint" else x.detach()
            if self.backward_mode == "joint":
                return base * mask + base.detach() * through
            return base * ste_mask
        mask = self.compute_mask(x.detach())
        if self.backward_mode == "STE":
            return x + (x * mask - x).detach()
        return x * mask

    def extra_repr(self) -> str:
        return f"shape={self.shape}, method={self.method}, options={self.options}, backward_mode={self.backward_mode}"
