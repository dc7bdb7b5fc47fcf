"""Sparsity schedules: how a rule's target sparsity moves with the step count (SPEC §8).

``{"kind": "cubic", ...}`` gives the values of ``torch.ao.pruning.scheduler.CubicSL`` (final sparsity:
the rule's ``sparsity``); ``{"kind": "linear", "start", "end", "steps"}``; or a callable
``step -> sparsity``. Step ``t`` is the number of ``step()`` calls made before the current one.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping

__all__ = ["CUBIC_DEFAULTS", "check_schedule", "scheduled_sparsity"]

CUBIC_DEFAULTS = {"init_sparsity": 0.0, "init_step": 0, "delta_step": 10, "total_steps": 100, "initially_zero": False}
_LINEAR_KEYS = ("start", "end", "steps")


def _fraction(schedule: Mapping[str, Any], key: str, where: str) -> None:
    value = schedule[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {key!r} is a sparsity, a float in [0, 1]; got {type(value).__name__}: {value!r}")
    if not 0.0 <= float(value) <= 1.0:  # NaN fails too
        raise ValueError(f"{where}: {key!r} is a sparsity, a float in [0, 1]; got {value!r}")


def _count(schedule: Mapping[str, Any], key: str, where: str, low: int) -> None:
    value = schedule[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{where}: {key!r} is a number of steps, an int >= {low}; got {type(value).__name__}: {value!r}"
        )
    if value < low:
        raise ValueError(f"{where}: {key!r} is a number of steps, an int >= {low}; got {value!r}")


def check_schedule(schedule: Mapping[str, Any] | Callable[[int], float], where: str) -> None:
    """Validate a schedule dict when the spec is built: keys, sparsities in [0, 1], step counts ints
    (callables are checked when called)."""
    if callable(schedule):
        return
    kind = schedule.get("kind")
    keys = set(schedule) - {"kind"}
    if kind == "cubic":
        unknown = keys - set(CUBIC_DEFAULTS)
        if unknown:
            raise KeyError(
                f"{where}: cubic schedule got unknown key(s) {sorted(unknown)}; known: {sorted(CUBIC_DEFAULTS)}"
            )
        full = {**CUBIC_DEFAULTS, **schedule}
        _fraction(full, "init_sparsity", where)
        _count(full, "init_step", where, 0)
        _count(full, "delta_step", where, 1)
        _count(full, "total_steps", where, 1)
        if not isinstance(full["initially_zero"], bool):
            raise TypeError(f"{where}: 'initially_zero' must be True or False, got {full['initially_zero']!r}")
    elif kind == "linear":
        if keys != set(_LINEAR_KEYS):
            raise KeyError(f"{where}: linear schedule needs exactly the keys {list(_LINEAR_KEYS)}, got {sorted(keys)}")
        _fraction(schedule, "start", where)
        _fraction(schedule, "end", where)
        _count(schedule, "steps", where, 1)
    else:
        raise ValueError(
            f"{where}: schedule kind {kind!r} is unknown; use 'cubic', 'linear' or a callable step -> sparsity"
        )


def scheduled_sparsity(schedule: Mapping[str, Any] | Callable[[int], float], final: float, t: int) -> float:
    """The target sparsity at step ``t``."""
    if callable(schedule):
        value = float(schedule(t))
    elif schedule["kind"] == "linear":
        frac = min(max(t / schedule["steps"], 0.0), 1.0)
        value = schedule["start"] + (schedule["end"] - schedule["start"]) * frac
    else:
        c = {**CUBIC_DEFAULTS, **schedule}
        s_0, t_0, dt, n = c["init_sparsity"], c["init_step"], c["delta_step"], c["total_steps"]
        if c["initially_zero"] and t < t_0:
            return 0.0
        value = final + (s_0 - final) * (1.0 - (t - t_0) / (dt * n)) ** 3
        lo, hi = min(s_0, final), max(s_0, final)
        value = min(max(value, lo), hi)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"schedule gave sparsity {value} at step {t}; a sparsity is in [0, 1]")
    return value
