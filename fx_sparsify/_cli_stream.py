"""``fx-sparsify run ... --checkpoint PATH [--stream]``: weights from a checkpoint, pruned one block at a time.

With ``--stream`` the model is built with its parameters on the meta device and pruned by
:func:`fx_sparsify.prune_streamed` from ``--checkpoint`` (a safetensors file or a folder of shards):
``DIR`` receives the compressed shards, ``model.safetensors.index.json``, ``spec.json`` and a short
``report.md``; ``fxs.load_compressed(DIR, model)`` loads the result. Progress: one line (or a bar) per
block. Without ``--stream`` the checkpoint's weights are loaded into the built model before the usual run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ._checkpoint import Checkpoint
from ._cli_model import Batch, UserError, build_model, say
from ._progress import Progress, progress
from ._streamed_io import mmap_large_allocations

__all__ = ["load_weights", "run_streamed"]


def load_weights(model: nn.Module, path: str) -> None:
    """Copy every tensor of the checkpoint at ``path`` into ``model`` (strict: the keys must match)."""
    try:
        checkpoint = Checkpoint(path)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(f"--checkpoint {path!r}: {err}") from None
    state = model.state_dict()
    missing = [k for k in state if k not in checkpoint]
    if missing:
        raise UserError(f"--checkpoint {path!r} lacks {len(missing)} of the model's tensors, e.g. {missing[:3]}")
    wrong = [
        f"{k} {list(checkpoint.shape(k))} (the model's {list(v.shape)})"
        for k, v in state.items()
        if checkpoint.shape(k) != tuple(v.shape)
    ]
    if wrong:  # before anything is read (load_state_dict raised a RuntimeError, a traceback)
        raise UserError(
            f"--checkpoint {path!r} holds {len(wrong)} tensor(s) of another shape, e.g. {', '.join(wrong[:3])}; "
            "is it the checkpoint of this model (and --model-kwargs)?"
        )
    try:
        loaded = {k: checkpoint.read(k, v.dtype) for k, v in state.items()}
    except ValueError as err:  # a dtype it cannot read, a file cut short
        raise UserError(f"--checkpoint {path!r}: {err}") from None
    model.load_state_dict(loaded)


def run_streamed(args: argparse.Namespace, spec: Any, out: Path, batch: Callable[[int], Batch]) -> int:
    """``prune_streamed`` with the run's factory, checkpoint, recipe and calibration batches into ``out``."""
    import fx_sparsify as fxs

    if not args.checkpoint:
        raise UserError("--stream reads the weights one block at a time from --checkpoint PATH; give it")
    if args.storage:
        raise UserError("--stream writes compressed shards; --storage applies to an in-memory run: drop one of them")
    calibration = []
    for i in range(max(1, args.calibrate)):  # the capture needs one batch even without calibration
        positional, keywords = batch(i)
        calibration.append(keywords if keywords else positional)
    bar: list[Progress] = []

    def shown(done: int, total: int, name: str) -> None:
        if not bar:
            bar.append(progress(total, "prune_streamed", not args.quiet, unit="block"))
        bar[0].update(1, name)

    say(args, f"streaming {args.model} from {args.checkpoint}, one block at a time")
    mmap_large_allocations()  # this process only runs the prune: steadier peaks (see _streamed_io)
    start = time.perf_counter()
    try:
        sparsity = fxs.prune_streamed(
            lambda: build_model(args.model, args.model_kwargs), args.checkpoint, spec, calibration, out, progress=shown
        )
    except (ValueError, TypeError, KeyError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    finally:
        if bar:
            bar[0].close()
    seconds = time.perf_counter() - start
    (out / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2, default=str))
    rows = "\n".join(f"| {name} | {value:.1%} |" for name, value in sparsity.items())
    (out / "report.md").write_text(
        f"# fx-sparsify report: {args.model} (streamed)\n\nRecipe: `{args.recipe}`; checkpoint: `{args.checkpoint}`; "
        f"calibration batches: {len(calibration)}; {seconds:.1f} s.\n\n| target | sparsity |\n|---|---|\n{rows}\n\n"
        "Load it with `fxs.load_compressed(DIR, model)`.\n"
    )
    print(
        f"pruned {len(sparsity)} targets in {seconds:.1f} s; wrote the shards and model.safetensors.index.json to {out}"
    )
    return 0
