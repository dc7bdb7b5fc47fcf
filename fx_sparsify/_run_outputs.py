"""What ``fx-sparsify run`` writes besides the weights: an exported program, the new widths, a config
the factory rebuilds the shrunk model from, and the summary (parameters, file sizes, latency).

Every function here takes plain modules and returns data or text; the command line (``cli.py``)
prints and writes. A run's files go to a temporary folder beside ``--out`` and are moved in only when
all of them were written (:func:`staged_folder`), so a failed rerun leaves the previous run whole.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

__all__ = [
    "RUN_FILES",
    "export_program",
    "resized_modules",
    "factory_kwargs_for",
    "hf_config",
    "parameter_counts",
    "measure_latency",
    "Latency",
    "staged_folder",
]

#: every file ``run`` may write; a rerun into the same folder removes the ones it did not write again
RUN_FILES = (
    "report.md",
    "graph.svg",
    "sparsity.png",
    "model.safetensors",
    "model.pt2",
    "widths.json",
    "model_kwargs.json",
    "config.json",
    "storage.json",
    "spec.json",
)

#: module attributes that describe a size (an int that ``squash(shrink=True)`` may change)
_SIZE_ATTRIBUTES = (
    "in_features",
    "out_features",
    "in_channels",
    "out_channels",
    "groups",
    "num_features",
    "embedding_dim",
    "num_embeddings",
    "normalized_shape",
    "num_heads",
    "head_dim",
    "embed_dim",
    "hidden_size",
    "nf",
    "kdim",
    "vdim",
)


def _batch_dims(value: Any) -> Any:
    """``dynamic_shapes`` for one input: dim 0 of a tensor free (``Dim.AUTO``: export decides), else None."""
    if isinstance(value, torch.Tensor):
        return {0: torch.export.Dim.AUTO} if value.dim() else None
    if isinstance(value, (list, tuple)):
        return type(value)(_batch_dims(v) for v in value)
    if isinstance(value, dict):
        return {k: _batch_dims(v) for k, v in value.items()}
    return None


def export_program(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], path: Path) -> str | None:
    """``torch.export.save`` of ``module`` called on the example batch, the batch size free where the model allows;
    None, or why it could not be exported."""
    args, kwargs = tuple(args), dict(kwargs)
    dynamic = {
        **{f"_{i}": _batch_dims(a) for i, a in enumerate(args)},
        **{k: _batch_dims(v) for k, v in kwargs.items()},
    }
    try:
        try:
            program = torch.export.export(module, args, kwargs or None, dynamic_shapes=_by_name(module, dynamic, args))
        except Exception:  # a model that fixes its batch size (a reshape to the example's): the example's shapes
            program = torch.export.export(module, args, kwargs or None)
        torch.export.save(program, str(path))
    except Exception as err:  # export refuses many constructs: the run goes on, the reason is reported
        path.unlink(missing_ok=True)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"{type(err).__name__}: {first[:300]}"
    return None


def _by_name(module: nn.Module, dynamic: dict[str, Any], args: tuple[Any, ...]) -> Any:
    """The per-input dynamic shapes as the forward's parameter names (positional inputs by position)."""
    try:
        names = [n for n in inspect.signature(module.forward).parameters]
    except (TypeError, ValueError):
        names = []
    if len(names) < len(args):
        return None
    return {
        **{names[i]: dynamic[f"_{i}"] for i in range(len(args))},
        **{k: v for k, v in dynamic.items() if not k.startswith("_")},
    }


def _sizes(module: nn.Module) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _SIZE_ATTRIBUTES:
        value = module.__dict__.get(name)
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            or (isinstance(value, tuple) and all(isinstance(v, int) for v in value))
        ):
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def resized_modules(original: nn.Module, result: nn.Module) -> dict[str, Any]:
    """The modules and tensors whose sizes differ between ``original`` and ``result`` (``widths.json``).

    ``{"modules": {path: {"type": ..., attr: new, ...}}, "tensors": {key: new shape}, "before": {key: old shape}}``;
    modules appear where the result still holds them (an fx capture; an export capture keeps tensors only).
    """
    before = {k: list(v.shape) for k, v in original.state_dict().items()}
    after = {k: list(v.shape) for k, v in result.state_dict().items()}
    changed = sorted((k for k in after if before.get(k) != after[k]), key=natural_key)
    modules: dict[str, Any] = {}
    originals = dict(original.named_modules())
    for path, module in result.named_modules():
        old = originals.get(path)
        if old is None or type(old) is not type(module):
            continue
        new_sizes, old_sizes = _sizes(module), _sizes(old)
        if new_sizes != old_sizes:
            modules[path] = {
                "type": type(module).__name__,
                **new_sizes,
                "before": {k: v for k, v in old_sizes.items() if new_sizes.get(k) != v},
            }
    return {
        "modules": modules,
        "tensors": {k: after[k] for k in changed},
        "before": {k: before.get(k) for k in changed},
    }


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that puts ``layer2`` before ``layer10`` (digit runs compare as numbers)."""
    import re

    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def factory_kwargs_for(
    factory: Callable[..., Any], given: Mapping[str, Any], target: nn.Module, budget: int = 200, seconds: float = 30.0
) -> dict[str, Any] | None:
    """Int arguments of ``factory`` under which it builds a model with ``target``'s tensor shapes, or None.

    A greedy search over the factory's int arguments (given or defaulted), each tried at the sizes that occur
    in ``target``'s tensors; the models are built on the meta device (no memory for weights), at most ``budget``
    of them and for at most ``seconds`` (a large model's build takes a while even without weights).
    """
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None
    current = dict(given)
    for name, p in parameters.items():
        if name not in current and p.default is not inspect.Parameter.empty:
            current[name] = p.default
    names = [
        n for n, v in current.items() if isinstance(v, int) and not isinstance(v, bool) and v > 0 and "seed" not in n
    ]
    want = _shapes(target)
    candidates = sorted({d for shape in want.values() for d in shape})
    builds = 0
    deadline = time.perf_counter() + seconds

    def misses(kwargs: dict[str, Any]) -> int | None:
        nonlocal builds
        builds = builds + 1 if time.perf_counter() < deadline else budget  # out of time: the last try
        state = torch.random.get_rng_state()
        try:
            with torch.device("meta"):
                got = _shapes(factory(**kwargs))
        except Exception:  # an argument value the factory refuses: not a candidate
            return None
        finally:
            torch.random.set_rng_state(state)
        if set(got) != set(want):
            return None
        return sum(got[k] != want[k] for k in want)

    best = misses(current)
    if best is None:
        return None
    while best and builds < budget:
        improved = False
        for name in names:
            for value in candidates:
                if value == current[name] or builds >= budget:
                    continue
                trial = {**current, name: value}
                score = misses(trial)
                if score is not None and score < best:
                    current, best, improved = trial, score, True
        if not improved:
            break
    if best != 0:
        return None
    return {k: v for k, v in current.items() if k in given or v != parameters[k].default}


def hf_config(sgm: Any, model: nn.Module, shrink: bool) -> dict[str, Any] | None:
    """The config of a Hugging Face ``model`` resized as ``sgm.squash_into(copy, shrink=True)`` writes it."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    resized = sgm.squash_into(copy.deepcopy(model), shrink=shrink)
    return dict(resized.config.to_dict())


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters): distinct tensors counted once; sparse layouts by their dense size."""
    total = nonzero = 0
    seen: set[int] = set()
    for tensor in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
        if id(tensor) in seen or not isinstance(tensor, nn.Parameter):
            continue
        seen.add(id(tensor))
        dense = tensor.detach().to_dense() if tensor.layout != torch.strided else tensor.detach()
        total += dense.numel()
        nonzero += int(dense.count_nonzero())
    return total, nonzero


@dataclass(frozen=True)
class Latency:
    """Median and range, in milliseconds, of one module's forward on the example batch."""

    median_ms: float
    low_ms: float
    high_ms: float
    runs: int


def measure_latency(
    modules: Mapping[str, nn.Module], args: tuple[Any, ...], kwargs: Mapping[str, Any], runs: int, warmup: int = 2
) -> dict[str, Latency]:
    """Forward time of each module, interleaved (one run of each in turn), under ``torch.no_grad()``."""
    times: dict[str, list[float]] = {name: [] for name in modules}
    with torch.no_grad():
        for i in range(warmup + runs):
            for name, module in modules.items():
                start = time.perf_counter()
                module(*args, **kwargs)
                if i >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    return {name: Latency(statistics.median(t), min(t), max(t), len(t)) for name, t in times.items()}


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to write a run into; on success its files replace ``out``'s.

    ``out`` is left as it was when the body raises. On success every file written moves into ``out``
    (one rename each) and files of :data:`RUN_FILES` that this run did not write are removed, so the
    folder never mixes two runs. A new ``out`` is the temporary folder itself, renamed.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    mask = _umask()  # mkdtemp makes the folder 0700 and some writers (safetensors) their files 0600: the usual modes
    os.chmod(staging, 0o777 & ~mask)
    for item in staging.iterdir():
        os.chmod(item, 0o666 & ~mask)
    if not out.exists():
        os.replace(staging, out)
        return
    written = {p.name for p in staging.iterdir()}
    for name in written:
        os.replace(staging / name, out / name)
    for name in RUN_FILES:
        if name not in written and (out / name).is_file():
            (out / name).unlink()
    shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
