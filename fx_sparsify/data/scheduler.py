"""Data schedulers: move one config value (e.g. ``sparsity_level``) of a data sparsifier per step.

The API of ``torch.ao.pruning._experimental.data_scheduler.BaseDataScheduler``::

    >>> import torch, fx_sparsify.data as fxd
    >>> sparsifier = fxd.DataNormSparsifier(sparsity_level=0.8)
    >>> _ = sparsifier.add_data("w", torch.randn(4, 8))
    >>> scheduler = fxd.LambdaDataScheduler(sparsifier, "sparsity_level", lambda epoch: 0.5 ** epoch)
    >>> for epoch in range(3):
    ...     sparsifier.step()
    ...     scheduler.step()
    >>> scheduler.get_last_param()
    {'w': 0.1}

Differences from the reference: the sparsifier counts its own steps (its ``step`` method is not
wrapped, so sparsifier and scheduler pickle cleanly); a value the sparsifier's config check rejects,
or a name it does not hold, raises before any config changes; ``verbose`` logs instead of printing.
"""

from __future__ import annotations

import abc
import logging
import warnings
from typing import Any, Callable

from .base_data_sparsifier import BaseDataSparsifier

__all__ = ["BaseDataScheduler", "LambdaDataScheduler"]

logger = logging.getLogger(__name__)


class BaseDataScheduler(abc.ABC):
    """Varies ``schedule_param`` of every data group of ``data_sparsifier`` over time.

    Subclasses implement :meth:`get_schedule_param` returning ``{name: value}``; ``step()`` writes
    the values into ``data_sparsifier.data_groups``. ``base_param`` holds the values at construction;
    ``last_epoch`` counts the scheduler's steps (the constructor takes the first one, as the reference).
    """

    def __init__(
        self, data_sparsifier: BaseDataSparsifier, schedule_param: str, last_epoch: int = -1, verbose: bool = False
    ) -> None:
        if not isinstance(data_sparsifier, BaseDataSparsifier):
            raise TypeError(
                f"{type(data_sparsifier).__name__} is not an instance of fx_sparsify.data.BaseDataSparsifier"
            )
        if not isinstance(schedule_param, str):
            raise TypeError(f"schedule_param must be a config key (str), got {schedule_param!r}")
        lacking = [n for n, c in data_sparsifier.data_groups.items() if schedule_param not in c]
        if lacking:
            keys = sorted({k for c in data_sparsifier.data_groups.values() for k in c})
            raise KeyError(
                f"schedule_param {schedule_param!r} is not in the config of data {', '.join(map(repr, lacking))}; "
                f"config keys: {', '.join(keys)}"
            )
        self.data_sparsifier = data_sparsifier
        self.schedule_param = schedule_param
        self.base_param: dict[str, Any] = {
            name: config.get(schedule_param) for name, config in data_sparsifier.data_groups.items()
        }
        self.last_epoch = last_epoch
        self.verbose = verbose
        self._step_count = 0
        self._last_param: dict[str, Any] = {}
        self._sparsifier_steps_at_init = data_sparsifier._step_count
        self.step()

    @abc.abstractmethod
    def get_schedule_param(self) -> dict[str, Any]:
        """``{data name: new value of schedule_param}`` for the current ``last_epoch``."""

    def step(self) -> None:
        if self._step_count == 1 and self.data_sparsifier._step_count <= self._sparsifier_steps_at_init:
            warnings.warn(
                "Detected call of `scheduler.step()` before `data_sparsifier.step()`. "
                "You have to make sure you run the data_sparsifier.step() BEFORE any "
                "calls to the scheduler.step().",
                UserWarning,
                stacklevel=2,
            )
        self.last_epoch += 1
        try:
            updates = dict(self.get_schedule_param())
        except BaseException:
            self.last_epoch -= 1
            raise
        sparsifier = self.data_sparsifier
        unknown = [n for n in updates if n not in sparsifier.data_groups]
        if unknown:
            self.last_epoch -= 1
            raise KeyError(
                f"{type(self).__name__}.get_schedule_param returned unknown data name(s) "
                f"{', '.join(map(repr, unknown))}; known: {', '.join(map(repr, sparsifier.data_groups))}"
            )
        try:
            for name, value in updates.items():
                config = {**sparsifier.data_groups[name], self.schedule_param: value}
                sparsifier._check_config(name, sparsifier._data[name], config)
        except BaseException:
            self.last_epoch -= 1
            raise
        self._step_count += 1
        for name, value in updates.items():
            sparsifier.data_groups[name][self.schedule_param] = value
            if self.verbose:
                logger.info("Adjusting %s for group %s to %s", self.schedule_param, name, value)
        self._last_param = {name: config.get(self.schedule_param) for name, config in sparsifier.data_groups.items()}
        sparsifier.enable_mask_update = True

    def get_last_param(self) -> dict[str, Any]:
        return self._last_param

    def state_dict(self) -> dict[str, Any]:
        """Every attribute but the sparsifier and callables (save the sparsifier's state separately)."""
        return {k: v for k, v in self.__dict__.items() if k != "data_sparsifier" and not callable(v)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (restore the sparsifier's state first)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"load_state_dict needs the dict from state_dict(), got {type(state_dict).__name__}")
        if "data_sparsifier" in state_dict:
            raise KeyError("a scheduler state dict must not contain 'data_sparsifier'; pass scheduler.state_dict()")
        self.__dict__.update(state_dict)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__} (\nData Sparsifier {self.data_sparsifier}\n"
            f"    {self.schedule_param}: {self.base_param}\n)"
        )


class LambdaDataScheduler(BaseDataScheduler):
    """``value = base_value * fn(last_epoch)`` for every data (as ``LambdaSL`` for weights)."""

    def __init__(
        self,
        data_sparsifier: BaseDataSparsifier,
        schedule_param: str,
        fn: Callable[[int], float],
        last_epoch: int = -1,
        verbose: bool = False,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be a callable epoch -> multiplier, got {type(fn).__name__}")
        self.fn = fn
        super().__init__(data_sparsifier, schedule_param, last_epoch, verbose)

    def get_schedule_param(self) -> dict[str, Any]:
        return {name: base * self.fn(self.last_epoch) for name, base in self.base_param.items()}
