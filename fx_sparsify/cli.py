"""The command line: ``fx-sparsify`` (also ``python -m fx_sparsify``), SPEC §12.

    fx-sparsify run RECIPE --model PKG.MODULE:FACTORY [--model-kwargs JSON] [--input 1x3x224x224 | --inputs FILE.pt]
                           [--calibrate N] [--shrink] [--storage auto] --out DIR
    fx-sparsify inspect CHECKPOINT
    fx-sparsify methods

``run`` builds the model from the factory, sparsifies it with the recipe, runs ``N`` calibration
batches (random inputs of the given shape, or the batches saved in ``FILE.pt``), steps, squashes and
writes ``report.md``, ``graph.svg``, ``sparsity.png``, ``model.safetensors`` and ``spec.json`` into
``DIR``. Progress goes to stderr. Exit status: 0 on success, 2 for a user error (message on stderr,
no traceback unless ``--debug``).

The command line calls the facade only (``fx_sparsify.api`` and friends), never the passes.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

__all__ = ["main", "build_parser", "UserError"]

PROG = "fx-sparsify"


class UserError(Exception):
    """A mistake in the command line or its files: exit status 2 with the message on stderr."""


# --- run -------------------------------------------------------------------------------------------
def _load_factory(ref: str) -> Callable[..., Any]:
    """``pkg.module:factory`` or ``path/to/file.py:factory`` → the callable."""
    module_ref, sep, attr = ref.rpartition(":")
    if not sep or not module_ref or not attr:
        raise UserError(f"--model {ref!r}: expected PKG.MODULE:FACTORY (e.g. torchvision.models:resnet18) "
                        "or path/to/file.py:FACTORY")
    if module_ref.endswith(".py"):
        path = Path(module_ref)
        if not path.is_file():
            raise UserError(f"--model {ref!r}: file {module_ref!r} does not exist")
        name = f"_fx_sparsify_model_{path.stem}"  # never shadows an importable module of the same name
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look the defining module up
        sys.path.insert(0, str(path.resolve().parent))  # so the file can import its neighbours
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:  # as `python -m` does: modules in the working directory
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_ref)
        except ModuleNotFoundError as err:
            raise UserError(f"--model {ref!r}: cannot import {module_ref!r} ({err}); check the module path "
                            "and that its package is installed, or give path/to/file.py:FACTORY") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise UserError(f"--model {ref!r}: {module_ref} has no callable {attr!r}; callables there: "
                        f"{', '.join(names[:12]) or '(none)'}")
    return factory  # type: ignore[no-any-return]


def _build_model(ref: str, kwargs_json: str | None) -> nn.Module:
    kwargs: Any = {}
    if kwargs_json:
        try:
            kwargs = json.loads(kwargs_json)
        except json.JSONDecodeError as err:
            raise UserError(f"--model-kwargs: not valid JSON ({err.msg} at column {err.colno}): {kwargs_json!r}") from None
        if not isinstance(kwargs, dict):
            raise UserError(f"--model-kwargs: expected a JSON object such as '{{\"num_classes\": 10}}', got {kwargs_json!r}")
    factory = _load_factory(ref)
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise UserError(f"--model {ref!r}: calling the factory with {kwargs} failed: {err}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {ref!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1x3x224x224"`` → ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(s) for s in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise UserError(f"--input {text!r}: expected a shape such as 1x3x224x224") from None
    if not shape or any(s <= 0 for s in shape):
        raise UserError(f"--input {text!r}: every dimension must be a positive integer")
    return shape


Batch = tuple[tuple[Any, ...], dict[str, Any]]


def _as_batch(item: Any, where: str) -> Batch:
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, tuple):
        return item, {}
    if isinstance(item, dict) and all(isinstance(k, str) for k in item):
        return (), dict(item)
    raise UserError(f"{where}: a batch is a tensor, a tuple of positional inputs or a dict of keyword inputs, "
                    f"got {type(item).__name__}")


def _batches(args: argparse.Namespace) -> tuple[Batch, Callable[[int], Batch]]:
    """The example batch and a function giving calibration batch ``i`` (a file's batches in turn, or fresh random ones)."""
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
            batches = [_as_batch(b, f"--inputs {args.inputs!r}[{i}]") for i, b in enumerate(data)]
        else:
            batches = [_as_batch(data, f"--inputs {args.inputs!r}")]
        return batches[0], lambda i: batches[i % len(batches)]
    shapes = [parse_shape(s) for s in args.input]
    generator = torch.Generator().manual_seed(args.seed)

    def random_batch(i: int) -> Batch:
        return tuple(torch.randn(s, generator=generator) for s in shapes), {}

    return random_batch(0), random_batch


def _progress(total: int, what: str, quiet: bool) -> Any:
    """A progress bar on stderr (tqdm when installed), else one plain line per item."""
    if quiet:
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        return _LineProgress(total, what)
    return tqdm(total=total, desc=what, file=sys.stderr, leave=True, unit="batch")


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class _LineProgress:
    def __init__(self, total: int, what: str) -> None:
        self.total, self.what, self.done = total, what, 0

    def update(self, n: int = 1) -> None:
        self.done += n
        print(f"{self.what}: {self.done}/{self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _squash_kwargs(sgm: Any, args: argparse.Namespace) -> dict[str, Any]:
    """``--shrink`` / ``--storage`` for ``squash()``; a clear error where this build's squash lacks them."""
    wanted: dict[str, Any] = {}
    if args.shrink:
        wanted["shrink"] = True
    if args.storage is not None:
        wanted["storage"] = args.storage
    accepted = inspect.signature(sgm.squash).parameters
    missing = [k for k in wanted if k not in accepted]
    if missing:
        flags = ", ".join(f"--{k}" for k in missing)
        raise UserError(f"{flags}: this version of fx_sparsify's squash() does not take {', '.join(missing)} yet; "
                        "run without it")
    return wanted


def _size_line(model: nn.Module) -> str:
    tensors = list(model.state_dict().values())
    total = sum(t.numel() for t in tensors)
    zeros = sum(int((t == 0).sum()) for t in tensors if t.is_floating_point())
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return f"{total:,} elements ({nbytes / 2**20:.2f} MiB dense), {zeros:,} zeros ({zeros / max(total, 1):.1%})"


def _save_weights(module: nn.Module, path: Path) -> str:
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


def _pictures(sgm: Any, out: Path, args: argparse.Namespace) -> list[str]:
    written = []
    try:
        from . import viz
    except ImportError as err:  # pragma: no cover - viz.py imports lazily
        _say(args, f"warning: pictures skipped: {err}")
        return written
    for name, draw in (("graph.svg", lambda p: viz.draw(sgm, p)), ("sparsity.png", lambda p: viz.plot_sparsity(sgm, p))):
        try:
            draw(out / name)
            written.append(name)
        except ImportError as err:
            _say(args, f"warning: {name} not written: {err}")
    return written


def cmd_run(args: argparse.Namespace) -> int:
    import fx_sparsify as fxs

    if not args.input and not args.inputs:
        raise UserError("run needs example inputs: --input 1x3x224x224 (random batches of that shape; repeat "
                        "the flag for several inputs) or --inputs FILE.pt")
    if args.calibrate < 0:
        raise UserError(f"--calibrate {args.calibrate}: expected a count >= 0")
    torch.manual_seed(args.seed)
    spec = fxs.load_spec(args.recipe)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {args.out!r} exists and is not a directory")
    example, batch = _batches(args)
    _say(args, f"building {args.model}")
    model = _build_model(args.model, args.model_kwargs).eval()
    start = time.perf_counter()
    sgm = fxs.sparsify_graph(model, spec, example_inputs=example[0], example_kwargs=example[1] or None)
    _say(args, f"sparsified: {len(sgm.sparsity())} targets, capture={sgm._fxs.capture} "
               f"({time.perf_counter() - start:.1f} s)")
    squash_kwargs = _squash_kwargs(sgm, args)  # fail before the long part
    if args.calibrate:
        bar = _progress(args.calibrate, "calibrate", args.quiet)
        with torch.no_grad():
            for i in range(args.calibrate):
                positional, keywords = batch(i)
                sgm(*positional, **keywords)
                bar.update(1)
        bar.close()
    _say(args, "step: computing masks")
    sgm.step()
    _say(args, "squash")
    squashed = sgm.squash(**squash_kwargs)

    out.mkdir(parents=True, exist_ok=True)
    report = sgm.report()
    (out / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2, default=repr) + "\n")
    try:
        how = _save_weights(squashed, out / "model.safetensors")
    except ModuleNotFoundError as err:  # safetensors >= 0.6 writes torch tensors through numpy
        raise UserError(f"writing model.safetensors failed: {err}; the installed safetensors needs it to save "
                        f"torch tensors: pip install {err.name or 'numpy'}") from None
    pictures = _pictures(sgm, out, args)
    lines = [
        f"# fx-sparsify report: {args.model}",
        "",
        f"Recipe: `{args.recipe}`; calibration batches: {args.calibrate}; squash: "
        f"{', '.join(f'{k}={v}' for k, v in squash_kwargs.items()) or 'dense'}.",
        "",
        f"- original model: {_size_line(model)}",
        f"- squashed model: {_size_line(squashed)}",
        f"- `model.safetensors`: {(out / 'model.safetensors').stat().st_size / 2**20:.2f} MiB on disk ({how})",
        "",
        "```",
        report.splitlines()[0],
        "```",
        "",
        *report.splitlines()[1:],
        "",
        "Files: " + ", ".join(f"`{n}`" for n in ["report.md", *pictures, "model.safetensors", "spec.json"]),
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    print(report)
    print(f"\nwrote {', '.join(['report.md', *pictures, 'model.safetensors', 'spec.json'])} to {out}")
    return 0


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
    if not p.is_file():
        raise UserError(f"inspect: {path!r} does not exist")
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
        raise UserError(f"inspect: {path!r} could not be read with torch.load(weights_only=True) "
                        f"(a state_dict .pt or a .safetensors file is expected): {str(err).splitlines()[0]}") from None
    tensors = dict(_flatten(data))
    if not tensors:
        raise UserError(f"inspect: {path!r} holds no tensors (got {type(data).__name__})")
    return tensors


def cmd_inspect(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    tensors = load_checkpoint(args.checkpoint)
    rows = []
    total = zeros = 0
    for name, t in tensors.items():
        dense = t.to_dense() if t.layout != torch.strided else t
        n, z = dense.numel(), int((dense == 0).sum())
        total, zeros = total + n, zeros + z
        rows.append([name, "x".join(map(str, t.shape)) or "scalar", str(t.dtype).removeprefix("torch."), n, z,
                     f"{z / max(n, 1):.1%}"])
    print(tabulate(rows, headers=["tensor", "shape", "dtype", "elements", "zeros", "sparsity"], tablefmt="github"))
    print(f"\n{len(rows)} tensors, {total:,} elements, {zeros:,} zeros ({zeros / max(total, 1):.1%} overall)")
    return 0


# --- methods ---------------------------------------------------------------------------------------
def cmd_methods(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    import fx_sparsify as fxs
    from .methods import get_mask_method

    rows = []
    for name, description in fxs.available_mask_methods().items():
        method = get_mask_method(name)
        options = [f"{o} (required)" if o in method.required else o for o in method.options]
        rows.append([name, ", ".join(options) or "-", description])
    print(tabulate(rows, headers=["method", "options", "description"], tablefmt="github"))
    print("\nShorthands: '2:4' (nm n=2 m=4), 'TOPK{0.5}', 'BTOPK{4:8,-1}', 'BERN', 'DENSE', with an optional "
          "(U) / (M) gradient suffix.")
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

    kernels = (f"C kernels loaded ({Path(_native.LIB._name).name})" if _native.LIB is not None
               else "C kernels not built (torch / numpy paths: same results, slower; reinstall with a C compiler)")
    return f"{PROG} {__version__} (torch {torch.__version__}); {kernels}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Graph-level sparsification of PyTorch models.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="the versions and whether the C kernels are in use (for bug reports)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,inspect,methods}")

    run = sub.add_parser("run", help="sparsify a model with a recipe and write the results",
                         description="Build the model, sparsify it with RECIPE, calibrate, step, squash, and "
                                     "write report.md, graph.svg, sparsity.png, model.safetensors, spec.json to DIR.")
    run.add_argument("recipe", metavar="RECIPE", help="spec file: .json, .toml or .yaml")
    run.add_argument("--model", required=True, metavar="PKG.MODULE:FACTORY",
                     help="a callable returning the nn.Module (also path/to/file.py:FACTORY)")
    run.add_argument("--model-kwargs", metavar="JSON", help="keyword arguments for the factory, as a JSON object")
    given = run.add_mutually_exclusive_group()
    given.add_argument("--input", action="append", default=[], metavar="SHAPE",
                       help="random float inputs of this shape, e.g. 1x3x224x224 (repeat for several inputs)")
    given.add_argument("--inputs", metavar="FILE.pt", help="torch.save()d batches: a tensor, a tuple of inputs, "
                                                            "a dict of keyword inputs, or a list of those")
    run.add_argument("--calibrate", type=int, default=0, metavar="N", help="calibration forward passes before step()")
    run.add_argument("--shrink", action="store_true", help="squash(shrink=True): remove pruned channels")
    run.add_argument("--storage", metavar="FORMAT", help="squash(storage=...): dense, csr, bsr, auto")
    run.add_argument("--seed", type=int, default=0, help="seed for random inputs (default 0)")
    run.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    run.add_argument("--quiet", action="store_true", help="no progress on stderr")
    run.set_defaults(func=cmd_run)

    insp = sub.add_parser("inspect", help="per-tensor sparsity of a checkpoint (.pt state dict or .safetensors)")
    insp.add_argument("checkpoint", metavar="CHECKPOINT")
    insp.set_defaults(func=cmd_inspect)

    methods = sub.add_parser("methods", help="list the mask methods and their options")
    methods.set_defaults(func=cmd_methods)
    for command in (run, insp, methods):  # --debug also after the command
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


#: exceptions that mean "the user asked for something wrong" (SPEC §9): exit 2, no traceback
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, TypeError, KeyError, FileNotFoundError,
                                                ImportError)


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

