"""``BaseDataSparsifier``: masks for tensors, parameters and embedding tables outside a traced model.

The API is that of ``torch.ao.pruning._experimental.data_sparsifier.BaseDataSparsifier``, so code
written against it runs unchanged; the internals are lean. Where the reference registers every tensor
as a buffer of a container module and wraps it in a ``FakeSparsity`` parametrization (a float mask
the size of the data, recomputing ``mask * data`` on every access), this class keeps three plain dicts:

* ``data_groups``: name -> config (what ``update_mask`` receives as keyword arguments),
* ``state``: name -> ``{"mask": bool tensor}`` (1 byte per entry, never changes dtype),
* the caller's own tensor (an embedding contributes its ``weight``), never copied.

Example (with the ready subclass :class:`~fx_sparsify.data.DataNormSparsifier`)::

    >>> import torch, fx_sparsify.data as fxd
    >>> sparsifier = fxd.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 2))
    >>> x = torch.tensor([[1.0, 2.0, 0.1, 0.2]])
    >>> sparsifier.add_data("x", x)  # returns the masked data; the mask starts all-keep
    tensor([[1.0000, 2.0000, 0.1000, 0.2000]])
    >>> sparsifier.step()
    >>> sparsifier.get_mask("x")
    tensor([[ True,  True, False, False]])
    >>> sparsifier.squash_mask()  # writes the masked values into the caller's own tensor
    >>> x
    tensor([[1., 2., 0., 0.]])
"""

from __future__ import annotations

import abc
import contextlib
import copy
import logging
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from ._packing import pack_mask, unpack_mask

__all__ = ["BaseDataSparsifier", "SUPPORTED_TYPES", "EMBEDDING_TYPES"]

logger = logging.getLogger(__name__)

EMBEDDING_TYPES: tuple[type[nn.Embedding], type[nn.EmbeddingBag]] = (nn.Embedding, nn.EmbeddingBag)
SUPPORTED_TYPES: tuple[type, ...] = (torch.Tensor, nn.Parameter, *EMBEDDING_TYPES)

_STATE_VERSION = 1


class DataNameError(ValueError, KeyError):
    """A bad or unknown data name. Both a ``ValueError`` (what the reference raises for unknown
    names) and a ``KeyError`` (what it raises for names containing ``'.'``)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"data name must be a str, got {type(name).__name__}: {name!r}")
    if not name:
        raise DataNameError("data name must be a non-empty string, got ''")
    if "." in name:
        raise DataNameError(
            f"data name {name!r} contains '.', which is reserved for nested names; "
            f"use another separator, e.g. {name.replace('.', '_')!r}"
        )
    return name


def _extract_weight(data: object) -> Tensor:
    """The tensor a supported object contributes: itself, or an embedding's ``weight``."""
    if isinstance(data, EMBEDDING_TYPES):
        return data.weight
    if isinstance(data, Tensor):
        return data
    raise TypeError(
        f"data of type {type(data).__name__} is not supported; pass a torch.Tensor, nn.Parameter, "
        "nn.Embedding or nn.EmbeddingBag (for another module, pass its weight tensor)"
    )


@contextlib.contextmanager
def _naming(where: str) -> Iterator[None]:
    """Prefix a ``TypeError`` / ``ValueError`` / ``KeyError`` with ``where`` (which data it concerns)."""
    try:
        yield
    except (TypeError, ValueError, KeyError) as err:
        message = str(err.args[0]) if err.args else str(err)
        if where.split(": ", 1)[-1] in message:
            raise
        try:
            new = type(err)(f"{where}: {message}")
        except Exception:
            new = ValueError(f"{where}: {message}")
        raise new from err


class BaseDataSparsifier(abc.ABC):
    r"""Base class of the data sparsifiers: subclasses implement :meth:`update_mask`.

    Args:
        data_list: optional list of ``(name, data)`` pairs added with the default config.
        **defaults: the default config of every added data; ``add_data(..., **config)`` overrides
            it key by key.

    Differences from the reference (all deliberate):

    * masks are ``torch.bool`` keep-masks (True = kept) of exactly the data's shape, also for 1-D
      data and after ``step()`` (the reference's become ``int8`` and, for 1-D data, ``(1, n)``);
    * ``squash_mask`` multiplies the caller's tensor in place, so every view of its storage sees the
      masked values (the reference ``set_``\ s the tensor to new storage);
    * ``state_dict()`` stores masks bit-packed (1 bit per entry; the reference stores sparse COO
      masks, 16 bytes per kept entry); ``load_state_dict`` also reads the reference's format;
    * re-adding a name does not warn (the "training data" flow re-adds every batch), and a squashed
      name can be re-added with ``reuse_mask=True``;
    * bad input raises ``TypeError`` / ``ValueError`` / ``KeyError`` before anything changes, never
      ``AssertionError``; subclasses validate their config in :meth:`_check_config` at ``add_data``
      time (the reference fails later, inside ``step()``).
    """

    def __init__(self, data_list: Iterable[tuple[str, Any]] | None = None, **defaults: Any) -> None:
        self.defaults: dict[str, Any] = dict(defaults)
        self.data_groups: dict[str, dict[str, Any]] = {}
        self.state: dict[str, dict[str, Tensor]] = {}
        self.enable_mask_update: bool = True
        self._step_count: int = 0
        self._data: dict[str, Tensor] = {}
        # name -> leave_parametrized of the squash_mask call that detached it
        self._squashed: dict[str, bool] = {}
        if data_list is not None:
            if isinstance(data_list, Mapping) or isinstance(data_list, (str, bytes)):
                raise TypeError(
                    f"data_list must be a list of (name, data) tuples, got {type(data_list).__name__}; "
                    "for a dict d pass list(d.items())"
                )
            for item in data_list:
                if not isinstance(item, (tuple, list)) or len(item) != 2:
                    raise TypeError(f"data_list items must be (name, data) pairs, got {item!r}")
                self.add_data(item[0], item[1])

    # ---- hooks for subclasses ------------------------------------------------------------------

    @abc.abstractmethod
    def update_mask(self, name: str, data: Tensor, **config: Any) -> None:
        """Recompute ``self.get_mask(name)`` in place from ``data`` (the unmasked values)."""

    def _check_config(self, name: str, data: Tensor, config: dict[str, Any]) -> dict[str, Any]:
        """Validate ``config`` for ``data`` and return it normalised; raise ``TypeError`` / ``ValueError``.

        Called by ``add_data`` (before anything is registered), by ``step()`` for every entry before
        any mask changes (a scheduler may have moved a value), and by ``load_state_dict``.
        """
        return config

    def _merge_config(self, base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
        """The config of an added data: ``base`` (the defaults, or the replaced data's config) updated
        key by key with the ``**config`` given to ``add_data``."""
        merged = copy.deepcopy(dict(base))
        merged.update(update)
        return merged

    # ---- adding and reading data ---------------------------------------------------------------

    def add_data(self, name: str, data: Any, reuse_mask: bool = True, **config: Any) -> Tensor:
        """Register ``data`` under ``name`` and return its masked values (``data * mask``).

        ``data`` is a ``torch.Tensor``, ``nn.Parameter``, ``nn.Embedding`` or ``nn.EmbeddingBag`` (an
        embedding contributes its ``weight``); it is held, not copied. If ``name`` exists, the data is
        replaced: its config is kept unless ``config`` overrides keys, and with ``reuse_mask=True`` its
        mask is kept (the new data must have the same shape); ``reuse_mask=False`` starts from an
        all-keep mask. On error nothing is registered or changed.
        """
        _check_name(name)
        weight = _extract_weight(data)
        if not isinstance(reuse_mask, bool):
            raise TypeError(f"reuse_mask must be a bool, got {type(reuse_mask).__name__}: {reuse_mask!r}")
        replacing = name in self._data
        base = self.data_groups[name] if replacing else self.defaults
        local = self._check_config(name, weight, self._merge_config(base, config))

        if replacing and reuse_mask:
            mask = self.state[name]["mask"]
            if mask.shape != weight.shape:
                raise ValueError(
                    f"add_data({name!r}): the new data has shape {tuple(weight.shape)} but the mask kept "
                    f"from the replaced data has shape {tuple(mask.shape)}; to keep the old mask the shapes "
                    "must match, or pass reuse_mask=False to start from an all-keep mask"
                )
            if mask.device != weight.device:
                mask.data = mask.data.to(weight.device)
        else:
            mask = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)

        self._data[name] = weight
        self.state[name] = {"mask": mask}
        self.data_groups[name] = local
        self._squashed.pop(name, None)
        if replacing:
            logger.debug("replaced data %r (reuse_mask=%s)", name, reuse_mask)
        return weight * mask

    def _entry(self, name: str) -> Tensor:
        if not isinstance(name, str):
            raise TypeError(f"data name must be a str, got {type(name).__name__}: {name!r}")
        if name not in self._data:
            known = ", ".join(map(repr, self._data)) or "none"
            raise DataNameError(f"data with name {name!r} does not exist; added names: {known}")
        return self._data[name]

    def get_mask(self, name: str) -> Tensor:
        """The boolean keep-mask of ``name`` (True = kept), the live tensor ``step()`` updates."""
        self._entry(name)
        return self.state[name]["mask"]

    def get_data(self, name: str, return_original: bool = True) -> Tensor:
        """The data of ``name``: the caller's own tensor (``return_original=True``) or ``data * mask``.

        After ``squash_mask`` the data is detached from its mask: ``return_original=False`` returns the
        tensor as squashed, and ``return_original=True`` raises if the squash overwrote the original
        values (``leave_parametrized=True``).
        """
        data = self._entry(name)
        if name in self._squashed:
            if return_original and self._squashed[name]:
                raise ValueError(
                    f"data {name!r} was squashed with its mask applied, so its original values no longer "
                    "exist; use get_data(name, return_original=False)"
                )
            return data
        if return_original:
            return data
        return data * self.state[name]["mask"]

    # ---- step and squash -----------------------------------------------------------------------

    def step(self) -> None:
        """Recompute every mask from the original (unmasked) data with its current config.

        All or nothing: every config is checked first, and a method failing on any data restores every
        mask (and torch's random state) as it was; the step count moves only when every mask was computed.
        Errors name the data.
        """
        if not self.enable_mask_update:
            self._step_count += 1
            return
        squashed = [n for n in self._data if n in self._squashed]
        if squashed:
            raise ValueError(
                f"step(): data {', '.join(map(repr, squashed))} was squashed and has no mask to update; "
                "re-add it with add_data(name, data) to keep sparsifying it"
            )
        configs = {name: self._check_config(name, data, self.data_groups[name]) for name, data in self._data.items()}
        saved = {name: (s["mask"], s["mask"].detach().clone()) for name, s in self.state.items()}
        rng = torch.random.get_rng_state()
        try:
            with torch.no_grad():
                for name, data in self._data.items():
                    with _naming(f"step(): data {name!r}"):
                        self.update_mask(name, data.detach(), **configs[name])
                        self._normalise_mask(name)
        except BaseException:
            for name, (mask, values) in saved.items():
                mask.data = values  # the values (and dtype) of before, in the tensor get_mask returned
                self.state[name]["mask"] = mask
            torch.random.set_rng_state(rng)
            raise
        self._step_count += 1

    def _normalise_mask(self, name: str) -> None:
        """Accept what a subclass written against the reference leaves (``mask.data = int8 / float``)."""
        mask = self.state[name]["mask"]
        data = self._data[name]
        if not isinstance(mask, Tensor):
            raise TypeError(
                f"{type(self).__name__}.update_mask left a {type(mask).__name__} as the mask of {name!r}; "
                "it must edit the tensor returned by self.get_mask(name) in place"
            )
        if mask.shape != data.shape:
            if mask.numel() != data.numel():
                raise ValueError(
                    f"{type(self).__name__}.update_mask set a mask of shape {tuple(mask.shape)} for data "
                    f"{name!r} of shape {tuple(data.shape)}; the mask must have the data's shape"
                )
            mask.data = mask.data.reshape(data.shape)
        if mask.dtype != torch.bool:
            mask.data = mask.data != 0

    def squash_mask(self, names: Iterable[str] | str | None = None, leave_parametrized: bool = True) -> None:
        """Detach ``names`` (default: every data not yet squashed) from their masks.

        With ``leave_parametrized=True`` the masked values are written into the caller's own tensor
        (or embedding weight), in place; with ``False`` the tensor keeps its unmasked values.
        """
        if not isinstance(leave_parametrized, bool):
            raise TypeError(f"leave_parametrized must be a bool, got {leave_parametrized!r}")
        if names is None:
            todo = [n for n in self._data if n not in self._squashed]
        else:
            todo = [names] if isinstance(names, str) else list(names)
            for name in todo:
                self._entry(name)
            again = [n for n in todo if n in self._squashed]
            if again:
                raise ValueError(
                    f"squash_mask: {', '.join(map(repr, again))} already squashed; "
                    "re-add with add_data(name, data) to sparsify it again"
                )
        with torch.no_grad():
            for name in todo:
                if leave_parametrized:
                    self._data[name].mul_(self.state[name]["mask"])
                self._squashed[name] = leave_parametrized

    # ---- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {name: {"mask": packed uint8, "mask_shape"}}, "data_groups", "_container", ...}``.

        ``_container`` maps each name to its data (a detached tensor sharing the caller's storage,
        as ``nn.Module.state_dict`` does); masks are packed to 1 bit per entry.
        """
        return {
            "state": {
                name: {"mask": pack_mask(s["mask"]), "mask_shape": tuple(s["mask"].shape)}
                for name, s in self.state.items()
            },
            "data_groups": copy.deepcopy(self.data_groups),
            "_container": {name: data.detach() for name, data in self._data.items()},
            "squashed": dict(self._squashed),
            "version": _STATE_VERSION,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restore masks, configs and (copies of) the data from :meth:`state_dict`.

        ``strict=True`` resets the sparsifier to exactly the loaded entries; ``strict=False`` keeps the
        data added before (a name present in both keeps the current entry) and adds the others.
        Also reads a state dict of the reference ``torch.ao.pruning`` data sparsifier. Every entry is
        validated before anything changes.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"load_state_dict needs a dict from state_dict(), got {type(state_dict).__name__}")
        missing = [k for k in ("state", "data_groups", "_container") if k not in state_dict]
        if missing:
            raise KeyError(
                f"state dict lacks {', '.join(map(repr, missing))}; pass the dict returned by state_dict() "
                f"(got keys {sorted(state_dict)})"
            )
        states, groups, container = state_dict["state"], state_dict["data_groups"], state_dict["_container"]
        squashed_in = dict(state_dict.get("squashed", {}))
        loaded: dict[str, tuple[Tensor, Tensor, dict[str, Any], bool | None]] = {}
        for name, entry in states.items():
            with _naming(f"load_state_dict: data {name!r}"):
                loaded[name] = self._read_entry(name, entry, groups, container, squashed_in, "squashed" in state_dict)

        if strict:
            self._data, self.state, self.data_groups, self._squashed = {}, {}, {}, {}
        for name, (data, mask, config, squashed) in loaded.items():
            if name in self._data:
                continue
            self._data[name] = data.detach().clone()
            self.state[name] = {"mask": mask.to(data.device)}
            self.data_groups[name] = config
            if squashed is not None:
                self._squashed[name] = squashed

    def _read_entry(
        self,
        name: Any,
        entry: Any,
        groups: Mapping[str, Any],
        container: Mapping[str, Any],
        squashed_in: Mapping[str, Any],
        has_squashed: bool,
    ) -> tuple[Tensor, Tensor, dict[str, Any], bool | None]:
        """One entry of a state dict, checked: (data, mask, config, squashed)."""
        _check_name(name)
        if name not in groups:
            raise KeyError(f"state dict has a mask for {name!r} but no config in 'data_groups'")
        if name in container:
            data = container[name]
            squashed = squashed_in.get(name, None if has_squashed else True)
        elif f"parametrizations.{name}.original" in container:  # the reference's format
            data = container[f"parametrizations.{name}.original"]
            squashed = None
        else:
            raise KeyError(f"state dict has a mask for {name!r} but no data for it in '_container'")
        if not isinstance(data, Tensor):
            raise TypeError(f"the data of {name!r} in '_container' must be a tensor, got {type(data).__name__}")
        mask = self._read_mask(name, entry, data)
        config = self._check_config(name, data, copy.deepcopy(dict(groups[name])))
        return data, mask, config, squashed

    @staticmethod
    def _read_mask(name: str, entry: Any, data: Tensor) -> Tensor:
        if not isinstance(entry, Mapping) or "mask" not in entry:
            raise KeyError(f"state dict entry {name!r} must be a dict with a 'mask', got {entry!r}")
        raw = entry["mask"]
        if not isinstance(raw, Tensor):
            raise TypeError(f"mask of {name!r} in the state dict must be a tensor, got {type(raw).__name__}")
        if "mask_shape" in entry:
            mask = unpack_mask(raw, entry["mask_shape"])
        else:  # the reference's (sparse or dense, float or int8) masks
            mask = (raw.to_dense() if raw.is_sparse else raw) != 0
            if mask.shape != data.shape and mask.numel() == data.numel():
                mask = mask.reshape(data.shape)  # the reference's (1, n) masks of 1-D data
        if mask.shape != data.shape:
            raise ValueError(
                f"state dict mask of {name!r} has shape {tuple(mask.shape)} but its data has shape {tuple(data.shape)}"
            )
        return mask

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["state"] = {
            name: {**s, "mask": pack_mask(s["mask"]), "mask_shape": tuple(s["mask"].shape)}
            for name, s in self.state.items()
        }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        packed = state.get("state", {})
        state["state"] = {}
        for name, s in packed.items():
            s = dict(s)
            shape = s.pop("mask_shape")
            s["mask"] = unpack_mask(s["mask"], shape)
            state["state"][name] = s
        self.__dict__.update(state)
        for name, s in self.state.items():
            s["mask"] = s["mask"].to(self._data[name].device)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for name, config in self.data_groups.items():
            lines += ["\tData Group", f"\t    name: {name}"]
            lines += [f"\t    {key}: {config[key]}" for key in sorted(config)]
        return "\n".join(lines) + "\n)"
