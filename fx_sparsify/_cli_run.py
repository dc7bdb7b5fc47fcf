"""``fx-sparsify run``: build the model, sparsify, calibrate, step, squash, and write the run's files.

The command line's ``run`` sub-command (:mod:`fx_sparsify.cli` parses the arguments); the files it writes
and the summary come from :mod:`fx_sparsify._run_outputs`. It calls the facade only, never the passes.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import _run_outputs as outputs
from ._cli_model import Batch, UserError, build_model, load_factory, say
from ._progress import progress
from .passes.sparse_storage import storage_table

__all__ = ["cmd_run", "parse_shape", "save_weights"]


#: the most entries of one random ``--input`` batch (8 GiB as float32)
MAX_INPUT = 2**31


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1x3x224x224"`` → ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(s) for s in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise UserError(f"--input {text!r}: expected a shape such as 1x3x224x224") from None
    if not shape or any(s <= 0 for s in shape):
        raise UserError(f"--input {text!r}: every dimension must be a positive integer")
    if math.prod(shape) > MAX_INPUT:  # torch's allocation error (or the OOM killer) would come instead
        raise UserError(
            f"--input {text!r}: a random batch of {math.prod(shape):,} entries ({math.prod(shape) * 4 / 2**30:,.0f} "
            f"GiB as float32); an example batch takes at most {MAX_INPUT:,} entries"
        )
    return shape


def as_batch(item: Any, where: str) -> Batch:
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, tuple):
        return item, {}
    if isinstance(item, dict) and all(isinstance(k, str) for k in item):
        return (), dict(item)
    raise UserError(
        f"{where}: a batch is a tensor, a tuple of positional inputs or a dict of keyword inputs, "
        f"got {type(item).__name__}"
    )


def batches(args: argparse.Namespace) -> tuple[Batch, Callable[[int], Batch]]:
    """The example batch and a function giving calibration batch ``i`` (a file's batches in turn, or fresh
    random ones)."""
    if args.inputs:
        path = Path(args.inputs)
        if not path.is_file():
            raise UserError(f"--inputs {args.inputs!r}: file does not exist")
        try:
            data = torch.load(path, weights_only=True)
        except Exception as err:
            raise UserError(f"--inputs {args.inputs!r}: torch.load(weights_only=True) failed: {err}") from None
        if isinstance(data, list):  # a list of batches
            if not data:
                raise UserError(f"--inputs {args.inputs!r}: the list of batches is empty")
            batches = [as_batch(b, f"--inputs {args.inputs!r}[{i}]") for i, b in enumerate(data)]
        else:
            batches = [as_batch(data, f"--inputs {args.inputs!r}")]
        return batches[0], lambda i: batches[i % len(batches)]
    shapes = [parse_shape(s) for s in args.input]
    generator = torch.Generator().manual_seed(args.seed)

    def random_batch(i: int) -> Batch:
        return tuple(torch.randn(s, generator=generator) for s in shapes), {}

    return random_batch(0), random_batch


def squash_options(sgm: Any, args: argparse.Namespace) -> dict[str, Any]:
    """``--shrink`` / ``--storage`` for ``squash()``; a clear error where this build's squash lacks them."""
    wanted: dict[str, Any] = {}
    if args.shrink:
        wanted["shrink"] = True
    if args.storage is not None:
        wanted["storage"] = storage_argument(args.storage)
    accepted = inspect.signature(sgm.squash).parameters
    missing = [k for k in wanted if k not in accepted]
    if missing:
        flags = ", ".join(f"--{k}" for k in missing)
        raise UserError(
            f"{flags}: this version of fx_sparsify's squash() does not take {', '.join(missing)} yet; run without it"
        )
    return wanted


def storage_argument(value: str) -> Any:
    """``--storage``: a layout name (``dense``, ``csr``, ``bsr``, ``bitmask``, ``auto``), or the ``storage.json`` of an
    earlier run (or any file ``fxs.save_storage_choices`` wrote): every layer gets the layout recorded there."""
    if not value.endswith(".json"):
        return value
    import fx_sparsify as fxs

    if not Path(value).is_file():
        raise UserError(
            f"--storage {value!r}: no such file; give a layout (dense, csr, bsr, bitmask, auto) or the "
            "storage.json an earlier run wrote"
        )
    return fxs.load_storage_choices(value)


def storage_text(kwargs: dict[str, Any], args: argparse.Namespace) -> str:
    """How the report names the squash options (the choices of a file by the file's name)."""
    shown = {
        k: (f"the choices of {args.storage}" if k == "storage" and not isinstance(v, str) else v)
        for k, v in kwargs.items()
    }
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "dense"


def storage_lines(result: nn.Module) -> list[str]:
    """A table of the layers whose layout squash chose (``storage.json`` holds the same)."""
    choices = getattr(result, "storage_choices", None)
    if not choices:
        return []
    return [
        "## Storage per layer",
        "",
        storage_table(choices),
        "",
        "`storage.json` records these choices: `--storage storage.json` in a rerun gives every layer the same "
        "layout without timing again.",
        "",
    ]


def save_weights(module: nn.Module, path: Path) -> str:
    import fx_sparsify as fxs

    save = getattr(fxs, "save_compressed", None)
    if save is not None:
        save(module, str(path))
        return "compressed (values + 1-bit mask)"
    from safetensors.torch import save_file

    seen: dict[int, str] = {}
    tensors = {}
    for key, value in module.state_dict().items():  # safetensors refuses shared storage: copy aliases
        value = value.detach().contiguous()
        tensors[key] = value.clone() if value.data_ptr() in seen else value
        seen.setdefault(value.data_ptr(), key)
    save_file(tensors, str(path))
    return "dense"


def pictures(sgm: Any, widths: dict[str, Any], out: Path, args: argparse.Namespace) -> list[str]:
    """``graph.svg`` (repeated blocks collapsed) and ``sparsity.png``, both with the new widths of resized layers."""
    written: list[str] = []
    try:
        from . import viz
    except ImportError as err:  # pragma: no cover - viz.py imports lazily
        say(args, f"warning: pictures skipped: {err}")
        return written
    for name, draw in (
        ("graph.svg", lambda p: viz.draw(sgm, p, widths=widths)),
        ("sparsity.png", lambda p: viz.plot_sparsity(sgm, p, widths=widths)),
    ):
        try:
            draw(out / name)
            written.append(name)
        except ImportError as err:
            say(args, f"warning: {name} not written: {err}")
    return written


def calibrate_once(
    sgm: Any, positional: tuple[Any, ...], keywords: dict[str, Any], i: int, args: argparse.Namespace
) -> None:
    """One calibration forward; a batch the model cannot take is one clear error (torch.fx prints the generated
    code's traceback to stderr before re-raising: it is shown with --debug only)."""
    shown = io.StringIO()
    try:
        with contextlib.redirect_stderr(shown):
            sgm(*positional, **keywords)
    except Exception as err:
        if getattr(args, "debug", False):
            sys.stderr.write(shown.getvalue())
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = f"--inputs {args.inputs!r}" if args.inputs else "--input"
        raise UserError(
            f"calibration batch {i}: the model fails on it ({first}); check the batches of {where}"
        ) from None
    sys.stderr.write(shown.getvalue())  # warnings and anything else the forward printed


def check_inputs(example: Batch, model: nn.Module) -> None:
    """Run the model once on the example batch before capture, so a wrong --input shape is one clear error."""
    try:
        with torch.no_grad():
            model(*example[0], **example[1])
    except Exception as err:  # the model's own error, without torch.fx's traceback of the capture
        shapes = ", ".join("x".join(map(str, t.shape)) for t in example[0] if isinstance(t, torch.Tensor))
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"the model fails on the example inputs ({shapes or 'keyword inputs'}): {first}; "
            "check --input / --inputs against what the model's forward expects"
        ) from None


def write_run(
    args: argparse.Namespace,
    folder: Path,
    model: nn.Module,
    sgm: Any,
    result: nn.Module,
    example: Batch,
    squash_kwargs: dict[str, Any],
    spec: Any,
) -> list[str]:
    """Write every file of the run into ``folder``; the names written, in the order the report lists them."""
    written: list[str] = []
    (folder / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2, default=repr) + "\n")
    try:
        how = save_weights(result, folder / "model.safetensors")
    except ModuleNotFoundError as err:  # safetensors >= 0.6 writes torch tensors through numpy
        raise UserError(
            f"writing model.safetensors failed: {err}; the installed safetensors needs it to save "
            f"torch tensors: pip install {err.name or 'numpy'}"
        ) from None
    written.append("model.safetensors")
    say(args, "export: model.pt2")
    why_not = outputs.export_program(result, example[0], example[1], folder / "model.pt2")
    if why_not is None:
        written.append("model.pt2")
    else:
        say(args, f"warning: model.pt2 not written: torch.export refused the result ({why_not})")
    widths = outputs.resized_modules(model, result)
    (folder / "widths.json").write_text(json.dumps(widths, indent=2) + "\n")
    written.append("widths.json")
    if getattr(result, "storage_choices", None):
        import fx_sparsify as fxs

        fxs.save_storage_choices(result.storage_choices, folder / "storage.json")  # type: ignore[arg-type]
        written.append("storage.json")
    rebuild = rebuild_files(args, folder, model, sgm, result, widths)
    written += rebuild
    written += pictures(sgm, widths, folder, args)
    notes = {"how": how, "export": why_not, "rebuild": rebuild, "storage": storage_lines(result)}
    summary = summary_lines(args, folder, model, result, example, written)
    (folder / "report.md").write_text(report_text(args, sgm, squash_kwargs, widths, summary, notes, written))
    written.insert(0, "report.md")
    written.append("spec.json")
    return written


def rebuild_files(
    args: argparse.Namespace, folder: Path, model: nn.Module, sgm: Any, result: nn.Module, widths: dict[str, Any]
) -> list[str]:
    """``config.json`` for a Hugging Face model, ``model_kwargs.json`` for a factory whose int arguments give the
    new shapes; nothing when no size changed."""
    if not widths["tensors"]:
        return []
    if hasattr(getattr(model, "config", None), "to_dict"):
        try:
            config = outputs.hf_config(sgm, model, bool(args.shrink))
        except ValueError as err:  # squash_into names why the config cannot hold the widths
            say(args, f"note: config.json not written: {err}")
            return []
        (folder / "config.json").write_text(json.dumps(config, indent=2, default=repr) + "\n")
        return ["config.json"]
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    found = outputs.factory_kwargs_for(load_factory(args.model), kwargs, result)
    if found is None:
        say(
            args,
            "note: no arguments of the factory give the new widths (they differ per layer); rebuild from "
            "model.pt2, or from widths.json",
        )
        return []
    (folder / "model_kwargs.json").write_text(json.dumps(found, indent=2) + "\n")
    return ["model_kwargs.json"]


def summary_lines(
    args: argparse.Namespace, folder: Path, model: nn.Module, result: nn.Module, example: Batch, written: list[str]
) -> list[str]:
    """Lines of the dense-vs-result table: parameters, sizes on disk, measured latency (same thread count)."""
    dense_params, _ = outputs.parameter_counts(model)
    params, nonzero = outputs.parameter_counts(result)
    dense_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    rows = [
        [
            "parameters",
            f"{dense_params:,}",
            f"{params:,} ({nonzero:,} non-zero)",
            f"{params / max(dense_params, 1):.2f}x ({nonzero / max(dense_params, 1):.2f}x non-zero)",
        ]
    ]
    for name in ("model.safetensors", "model.pt2"):
        if name in written:
            size = (folder / name).stat().st_size
            rows.append(
                [
                    f"`{name}`",
                    f"{dense_bytes / 2**20:.2f} MiB (dense tensors)",
                    f"{size / 2**20:.2f} MiB",
                    f"{size / max(dense_bytes, 1):.2f}x",
                ]
            )
    threads = torch.get_num_threads()
    if args.latency_runs > 0:
        say(args, f"latency: {args.latency_runs} runs each, {threads} thread(s)")
        timed = outputs.measure_latency({"dense": model, "result": result}, *example, runs=args.latency_runs)
        d, r = timed["dense"], timed["result"]
        rows.append(
            [
                f"latency (median of {r.runs}, {threads} thread(s))",
                f"{d.median_ms:.2f} ms ({d.low_ms:.2f}-{d.high_ms:.2f})",
                f"{r.median_ms:.2f} ms ({r.low_ms:.2f}-{r.high_ms:.2f})",
                f"{d.median_ms / max(r.median_ms, 1e-9):.2f}x speed",
            ]
        )
    from tabulate import tabulate

    table = tabulate(rows, headers=["", "dense", "result", "result / dense"], tablefmt="github")
    return [
        table,
        "",
        f"Measured on this machine with torch.set_num_threads({threads}) for both, on the example "
        "batch, forwards interleaved; other load on the machine moves these numbers.",
    ]


def report_text(
    args: argparse.Namespace,
    sgm: Any,
    squash_kwargs: dict[str, Any],
    widths: dict[str, Any],
    summary: list[str],
    notes: dict[str, Any],
    written: list[str],
) -> str:
    report = sgm.report()
    resized = widths["modules"] or widths["tensors"]
    lines = [
        f"# fx-sparsify report: {args.model}",
        "",
        f"Recipe: `{args.recipe}`; calibration batches: {args.calibrate}; squash: "
        f"{storage_text(squash_kwargs, args)}; "
        f"threads: {torch.get_num_threads()}.",
        "",
        "## Summary",
        "",
        *summary,
        "",
        f"`model.safetensors` is stored {notes['how']}. "
        + (
            "`model.pt2` is the result as a `torch.export` program (`torch.export.load`)."
            if notes["export"] is None
            else f"`model.pt2` was not written: torch.export refused the result ({notes['export']})."
        ),
        "",
        f"Resized: {len(widths['modules']) or len(widths['tensors'])} "
        f"{'modules' if widths['modules'] else 'tensors'} (`widths.json`)."
        if resized
        else "No tensor changed size.",
        *(["", f"Rebuild: `{notes['rebuild'][0]}` (see docs/outputs.md)."] if notes["rebuild"] else []),
        "",
        *notes["storage"],
        "## Targets",
        "",
        "```",
        report.splitlines()[0],
        "```",
        "",
        *report.splitlines()[1:],
        "",
        "Files: " + ", ".join(f"`{n}`" for n in ["report.md", *written, "spec.json"]),
        "",
    ]
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    import fx_sparsify as fxs

    if not args.input and not args.inputs:
        raise UserError(
            "run needs example inputs: --input 1x3x224x224 (random batches of that shape; repeat "
            "the flag for several inputs) or --inputs FILE.pt"
        )
    if args.calibrate < 0:
        raise UserError(f"--calibrate {args.calibrate}: expected a count >= 0")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads {args.threads}: expected a count >= 1")
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    spec = fxs.load_spec(args.recipe)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {args.out!r} exists and is not a directory")
    example, batch = batches(args)
    if args.stream:  # one block at a time from --checkpoint
        from ._cli_stream import run_streamed

        return run_streamed(args, spec, out, batch)
    say(args, f"building {args.model} ({torch.get_num_threads()} thread(s))")
    model = build_model(args.model, args.model_kwargs).eval()
    if args.checkpoint:
        from ._cli_stream import load_weights

        load_weights(model, args.checkpoint)
    check_inputs(example, model)
    start = time.perf_counter()
    sgm = fxs.sparsify_graph(model, spec, example_inputs=example[0], example_kwargs=example[1] or None)
    say(
        args,
        f"sparsified: {len(sgm.sparsity())} targets, capture={sgm._fxs.capture} ({time.perf_counter() - start:.1f} s)",
    )
    if args.shrink and not spec.channels:
        say(
            args,
            "note: --shrink: the recipe has no 'channels' rule, so no channel can be removed; writing the "
            "plain squash (pruned weights zeroed, shapes unchanged). Add a 'channels' rule to shrink",
        )
        args.shrink = False
    squash_kwargs = squash_options(sgm, args)  # fail before the long part
    if args.calibrate:
        bar = progress(args.calibrate, "calibrate", not args.quiet, unit="batch")
        with torch.no_grad():
            for i in range(args.calibrate):
                positional, keywords = batch(i)
                calibrate_once(sgm, positional, keywords, i, args)
                bar.update(1)
        bar.close()
    say(args, "step: computing masks")
    sgm.step(verbose=not args.quiet)
    say(args, "squash")
    result = sgm.squash(**squash_kwargs)
    with outputs.staged_folder(out) as folder:  # a failure leaves a previous run in --out as it was
        written = write_run(args, folder, model, sgm, result.eval(), example, squash_kwargs, spec)
    print(sgm.report())
    summary = (out / "report.md").read_text().split("## Summary\n\n", 1)[1].split("\n\n", 1)[0]
    print(f"\n{summary}\n(threads: {torch.get_num_threads()}, the same for dense and result)")
    print(f"\nwrote {', '.join(written)} to {out}")
    return 0
