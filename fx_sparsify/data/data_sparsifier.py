"""``DataSparsifier``: a data sparsifier driven by any mask method of the registry (SPEC section 4).

    >>> import torch, fx_sparsify.data as fxd
    >>> sparsifier = fxd.DataSparsifier(method="l1_unstructured", sparsity=0.5)
    >>> _ = sparsifier.add_data("w", torch.tensor([0.1, -3.0, 2.0, 0.2]))
    >>> _ = sparsifier.add_data("v", torch.randn(4, 8), method="nm", n=2, m=4)  # per-data method
    >>> sparsifier.step()
    >>> sparsifier.get_mask("w")
    tensor([False,  True,  True, False])

Options are checked against the method's signature when data is added, so a misspelt option fails
before anything is registered. Passing ``method=`` to ``add_data`` replaces the whole method config
(the default options belong to the default method); other keys override the defaults one by one.
Random methods draw from a generator seeded from ``seed`` and the data name (same as the graph
pipeline), or from torch's default generator when ``seed`` is None.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from torch import Tensor

from ..methods import compute_mask, get_mask_method, parse_method, validate_options
from ..methods._random import generator_for
from ..methods._selectors import ENTRY_COUNTS, warn_if_percent_like
from .base_data_sparsifier import BaseDataSparsifier

__all__ = ["DataSparsifier"]


class DataSparsifier(BaseDataSparsifier):
    """Masks from a registered mask method (``"l1_unstructured"``, ``"nm"``, ``"2:4"``, ``"block"``, ...).

    Args:
        data_list: optional ``(name, data)`` pairs.
        method: a mask method name or shorthand; the default of every added data.
        seed: seeds random methods per data name (``None``: torch's default generator).
        **options: the method's options, e.g. ``sparsity=0.5``.

    ``step()`` ranks the original (unmasked) data, as the reference data sparsifier does, so a mask
    can change between steps.
    """

    def __init__(
        self,
        data_list: Iterable[tuple[str, Any]] | None = None,
        *,
        method: str,
        seed: int | None = None,
        **options: Any,
    ) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}: {seed!r}")
        self.seed = seed
        _check_method({"method": method, **options})
        super().__init__(data_list=data_list, method=method, **options)

    def add_data(self, name: str, data: Any, reuse_mask: bool = True, **config: Any) -> Tensor:
        out = super().add_data(name, data, reuse_mask, **config)
        method, options = _check_method(self.data_groups[name])
        if method in ENTRY_COUNTS:  # "sparsity": 50 prunes 50 entries: warn where that looks like a percentage
            warn_if_percent_like(options.get("sparsity"), self._data[name].numel(), f"DataSparsifier data {name!r}")
        return out

    def _merge_config(self, base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
        if "method" in update and update["method"] != base.get("method"):
            return dict(update)
        return super()._merge_config(base, update)

    def _check_config(self, name: str, data: Tensor, config: dict[str, Any]) -> dict[str, Any]:
        method, options = _check_method(
            config
        )  # then what cannot fit this data's shape (N:M on an indivisible dim, ...)
        get_mask_method(method).check_shape(tuple(data.shape), options, f"data {name!r}")
        return config

    def update_mask(self, name: str, data: Tensor, method: str, **options: Any) -> None:  # type: ignore[override]
        generator = None if self.seed is None else generator_for(self.seed, name, data.device)
        self.get_mask(name).copy_(compute_mask(method, data, generator=generator, **options))


def _check_method(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The method's registered name and its merged options, checked (shape-free)."""
    if "method" not in config:
        raise TypeError(f"DataSparsifier needs a method (e.g. method='l1_unstructured'); got config {config!r}")
    parsed = parse_method(config["method"])
    get_mask_method(parsed.name)  # KeyError listing the known methods
    options = {**parsed.options, **{k: v for k, v in config.items() if k != "method"}}
    validate_options(parsed.name, options)
    return parsed.name, options
