"""The command line: ``fx-sparsify`` (also ``python -m fx_sparsify``), SPEC §12.

    fx-sparsify run RECIPE --model PKG.MODULE:FACTORY [--model-kwargs JSON] [--input 1x3x224x224 | --inputs FILE.pt]
                           [--calibrate N] [--shrink] [--storage auto] [--threads N] [--latency-runs N] --out DIR
    fx-sparsify inspect CHECKPOINT          (.safetensors, a state dict .pt, or an exported model.pt2)
    fx-sparsify methods

``run`` (:mod:`fx_sparsify._cli_run`) builds the model from the factory, sparsifies it with the recipe,
runs ``N`` calibration batches (random inputs of the given shape, or the batches saved in ``FILE.pt``),
steps, squashes and writes ``report.md`` (with a dense-vs-result summary), ``graph.svg``,
``sparsity.png``, ``model.safetensors``, ``model.pt2``, ``widths.json``, ``spec.json`` and, for a
shrunk model, ``model_kwargs.json`` / ``config.json`` into ``DIR`` (docs/outputs.md says what each is
for). Progress goes to stderr. Exit status: 0 on success, 2 for a user error (message on stderr, no
traceback unless ``--debug``).

The command line calls the facade only (``fx_sparsify.api`` and friends), never the passes.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from . import _run_outputs as outputs
from ._checkpoint import INDEX
from ._cli_model import UserError
from ._cli_run import cmd_run

__all__ = ["main", "build_parser", "UserError"]

PROG = "fx-sparsify"


# --- inspect ---------------------------------------------------------------------------------------
def _flatten(data: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(data, torch.Tensor):
        yield prefix or "tensor", data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            yield from _flatten(value, f"{prefix}.{i}" if prefix else str(i))


def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save``d state dict (``weights_only=True``)."""
    p = Path(path)
    if p.is_dir():  # a folder of shards (what prune_streamed writes), read through its index
        if not (p / INDEX).is_file():
            raise UserError(
                f"inspect: {path!r} is a folder without {INDEX}; pass a checkpoint file, or a folder of "
                "safetensors shards with its index"
            )
        from ._compressed import load_compressed

        try:
            return dict(load_compressed(p))
        except (OSError, ValueError) as err:
            raise UserError(f"inspect: {path!r} is not a readable folder of shards: {err}") from None
    if not p.is_file():
        raise UserError(f"inspect: {path!r} does not exist")
    if p.suffix == ".pt2":
        try:
            program = torch.export.load(str(p))
        except Exception as err:
            raise UserError(
                f"inspect: {path!r} is not a readable torch.export archive: "
                f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
            ) from None
        found = {**program.state_dict, **{k: v for k, v in program.constants.items() if isinstance(v, torch.Tensor)}}
        return {k: v.detach() for k, v in found.items()}
    if p.suffix == ".safetensors":
        import fx_sparsify as fxs

        load = getattr(fxs, "load_compressed", None)
        try:
            if load is not None:
                return dict(load(str(p)))
            from safetensors.torch import load_file

            return dict(load_file(str(p)))
        except (OSError, ValueError, RuntimeError) as err:
            raise UserError(f"inspect: {path!r} is not a readable safetensors file: {err}") from None
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(
            f"inspect: {path!r} could not be read with torch.load(weights_only=True) "
            f"(a state_dict .pt or a .safetensors file is expected): {str(err).splitlines()[0]}"
        ) from None
    tensors = dict(_flatten(data))
    if not tensors:
        raise UserError(f"inspect: {path!r} holds no tensors (got {type(data).__name__})")
    return tensors


def cmd_inspect(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    tensors = load_checkpoint(args.checkpoint)
    rows = []
    total = zeros = counters = 0
    names = list(tensors)  # a state dict's / exported program's own order
    if Path(args.checkpoint).suffix == ".safetensors" or Path(args.checkpoint).is_dir():  # sorted by name in the file:
        # put layer2 before layer10 at least
        names.sort(key=outputs.natural_key)
    for name in names:
        t = tensors[name]
        dense = t.to_dense() if t.layout != torch.strided else t
        shape, dtype = "x".join(map(str, t.shape)) or "scalar", str(t.dtype).removeprefix("torch.")
        if not dense.is_floating_point():  # counters and indices (num_batches_tracked): no weights to be sparse
            counters += 1
            rows.append([name, shape, dtype, dense.numel(), "-", "-"])
            continue
        n, z = dense.numel(), int((dense == 0).sum())
        total, zeros = total + n, zeros + z
        rows.append([name, shape, dtype, n, z, f"{z / max(n, 1):.1%}"])
    print(tabulate(rows, headers=["tensor", "shape", "dtype", "elements", "zeros", "sparsity"], tablefmt="github"))
    others = f" (and {counters} integer tensors, not counted)" if counters else ""
    print(
        f"\n{len(rows)} tensors, {total:,} floating-point elements, {zeros:,} zeros "
        f"({zeros / max(total, 1):.1%} overall){others}"
    )
    return 0


# --- methods ---------------------------------------------------------------------------------------
def cmd_methods(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    import fx_sparsify as fxs

    from .methods import get_mask_method

    rows = []
    for name, description in fxs.available_mask_methods().items():
        method = get_mask_method(name)
        defaults = inspect.signature(method.fn).parameters
        options = [
            f"{o} (required)" if o in method.required else f"{o}={defaults[o].default!r}" for o in method.options
        ]
        rows.append([name, ", ".join(options) or "-", description])
    print(tabulate(rows, headers=["method", "options", "description"], tablefmt="github"))
    print(
        "\nShorthands: '2:4' (nm n=2 m=4), 'TOPK{0.5}', 'BTOPK{4:8,-1}', 'BERN', 'DENSE', with an optional "
        "(U) / (M) gradient suffix."
    )
    return 0


# --- entry point -----------------------------------------------------------------------------------
class _Version(argparse.Action):
    """``--version``: print :func:`version_line` on one line (argparse's own action wraps it) and exit 0."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(version_line())
        parser.exit(0)


def version_line() -> str:
    """fx_sparsify's and torch's versions, and which path the masked lookups and checkpoint decoding take."""
    from . import __version__, _native

    kernels = (
        f"C kernels loaded ({Path(_native.LIB._name).name})"
        if _native.LIB is not None
        else "C kernels not built (torch / numpy paths: same results, slower; reinstall with a C compiler)"
    )
    return f"{PROG} {__version__} (torch {torch.__version__}); {kernels}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Graph-level sparsification of PyTorch models.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument(
        "--version",
        action=_Version,
        nargs=0,
        help="the versions and whether the C kernels are in use (for bug reports)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,inspect,methods}")

    run = sub.add_parser(
        "run",
        help="sparsify a model with a recipe and write the results",
        description="Build the model, sparsify it with RECIPE, calibrate, step, squash, and "
        "write report.md, graph.svg, sparsity.png, model.safetensors, model.pt2, widths.json, spec.json "
        "(and model_kwargs.json / config.json for a shrunk model) to DIR; see docs/outputs.md.",
    )
    run.add_argument("recipe", metavar="RECIPE", help="spec file: .json, .toml or .yaml")
    run.add_argument(
        "--model",
        required=True,
        metavar="PKG.MODULE:FACTORY",
        help="a callable returning the nn.Module (also path/to/file.py:FACTORY)",
    )
    run.add_argument("--model-kwargs", metavar="JSON", help="keyword arguments for the factory, as a JSON object")
    given = run.add_mutually_exclusive_group()
    given.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="SHAPE",
        help="random float inputs of this shape, e.g. 1x3x224x224 (repeat for several inputs)",
    )
    given.add_argument(
        "--inputs",
        metavar="FILE.pt",
        help="torch.save()d batches: a tensor, a tuple of inputs, a dict of keyword inputs, or a list of those",
    )
    run.add_argument("--calibrate", type=int, default=0, metavar="N", help="calibration forward passes before step()")
    run.add_argument("--shrink", action="store_true", help="squash(shrink=True): remove pruned channels")
    run.add_argument(
        "--storage",
        metavar="FORMAT|FILE.json",
        help="squash(storage=...): dense, csr, bsr, bitmask, auto; or the storage.json of an earlier run (the same "
        "layout per layer, no timing)",
    )
    run.add_argument("--seed", type=int, default=0, help="seed for random inputs (default 0)")
    run.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    run.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch.set_num_threads(N) for the whole run and its latency measurement (default: torch's)",
    )
    run.add_argument(
        "--latency-runs",
        type=int,
        default=10,
        metavar="N",
        help="forward passes timed for the summary, dense and result each (default 10; 0 skips)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress on stderr")
    run.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="the model's weights: a safetensors file or a folder of shards (Hugging Face index)",
    )
    run.add_argument(
        "--stream",
        action="store_true",
        help="with --checkpoint: prune one block at a time (prune_streamed); DIR receives compressed shards + index",
    )
    run.set_defaults(func=cmd_run)

    insp = sub.add_parser(
        "inspect", help="per-tensor sparsity of a checkpoint (.pt state dict, .safetensors or an exported .pt2)"
    )
    insp.add_argument("checkpoint", metavar="CHECKPOINT")
    insp.set_defaults(func=cmd_inspect)

    methods = sub.add_parser("methods", help="list the mask methods and their options")
    methods.set_defaults(func=cmd_methods)
    for command in (run, insp, methods):  # --debug also after the command
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


#: exceptions that mean "the user asked for something wrong" (SPEC §9): exit 2, no traceback
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    ValueError,
    TypeError,
    KeyError,
    FileNotFoundError,
    ImportError,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for user errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 on usage errors
    try:
        return int(args.func(args))
    except USER_ERRORS as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        if not isinstance(err, UserError):
            print(f"({type(err).__name__}; run with --debug for the traceback)", file=sys.stderr)
        return 2


def entry_point() -> None:
    """The console script ``fx-sparsify``."""
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (``fx-sparsify inspect f | head``): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        status = 0
    raise SystemExit(status)
