"""Files: recipes (``load_spec``, SPEC §12) and compressed checkpoints (``save_compressed`` /
``load_compressed``, SPEC §11; the format lives in ``_compressed.py``).

    >>> spec = fxs.load_spec("examples/recipes/resnet_like.toml")           # doctest: +SKIP
    >>> fxs.load_spec(path) == fxs.SparsitySpec.from_dict(json.load(open(path)))  # doctest: +SKIP

A recipe file holds the same dict as :meth:`SparsitySpec.from_dict` takes, in JSON (``.json``), TOML
(``.toml``, the standard library's ``tomllib``; ``tomli`` on Python 3.10) or YAML (``.yaml`` /
``.yml``, the ``yaml`` extra: ``pip install fx-sparsify[yaml]``). Every error names the file, the
line (where the parser gives one, or where the offending key is written) and the key.
``SparsitySpec.to_dict`` writes a spec back (``json.dump(spec.to_dict(), f)``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

from ._compressed import load_compressed, save_compressed
from .spec import SparsitySpec

__all__ = ["load_compressed", "load_spec", "save_compressed"]

SPEC_SUFFIXES = (".json", ".toml", ".yaml", ".yml")


def _toml_loads() -> Callable[[str], Any]:
    try:
        import tomllib  # Python >= 3.11

        return tomllib.loads
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        try:
            import tomli  # type: ignore[import-not-found]
        except ModuleNotFoundError:
            raise ImportError(
                "reading a .toml recipe on Python 3.10 needs the 'tomli' package: pip install tomli "
                "(Python 3.11+ reads TOML with the standard library); or write the recipe as .json"
            ) from None
        return tomli.loads  # type: ignore[no-any-return]


def _parse(path: Path, text: str) -> Any:
    """The file's content as Python data; a ``ValueError`` naming the file and line on a syntax error."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {err.lineno}, column {err.colno}: invalid JSON: {err.msg}") from None
    if suffix == ".toml":
        loads = _toml_loads()
        try:
            return loads(text)
        except ValueError as err:  # tomllib.TOMLDecodeError is a ValueError; its message says "(at line L, column C)"
            found = re.search(r"line (\d+), column (\d+)", str(err))
            where = f"line {found[1]}, column {found[2]}" if found else "somewhere"
            msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(err))
            raise ValueError(f"{path}: {where}: invalid TOML: {msg}") from None
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError:
            raise ImportError(
                f"{path}: reading a YAML recipe needs PyYAML: pip install fx-sparsify[yaml] "
                "(or write the recipe as .json / .toml)"
            ) from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
            problem = getattr(err, "problem", None) or str(err)
            raise ValueError(f"{path}: {where}: invalid YAML: {problem}") from None
    raise ValueError(
        f"{path}: unknown recipe format {path.suffix or '(no suffix)'!r}; use one of {', '.join(SPEC_SUFFIXES)}"
    )


def _line_of(text: str, message: str) -> int | None:
    """The line where the key (or value) that ``message`` names is written: the innermost quoted name first."""
    lines = text.splitlines()
    for token in reversed(re.findall(r"'([^'\n]+)'", message)):
        if token.startswith("spec[") or token in ("weights", "global", "activations"):
            continue
        word = re.compile(r"(?<![\w.:*?\[\]-])" + re.escape(token) + r"(?![\w.:*?\[\]-])")
        for i, line in enumerate(lines, 1):
            if word.search(line.split("#", 1)[0]):
                return i
    return None


def load_spec(path: str | os.PathLike[str]) -> SparsitySpec:
    """Read a :class:`SparsitySpec` from a ``.json``, ``.toml`` or ``.yaml`` / ``.yml`` recipe file.

    The file holds what :meth:`SparsitySpec.from_dict` takes (a TOML recipe writes each rule as a
    ``[[weights]]`` / ``[[global]]`` / ``[[activations]]`` table). A syntax error is a ``ValueError``
    naming the file, line and column; a spec error keeps its type (``KeyError`` / ``TypeError`` /
    ``ValueError``) and is prefixed with the file and the line where the offending key is written.
    """
    path = Path(os.fspath(path))
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"recipe file {str(path)!r} {what} (working directory: {os.getcwd()})")
    text = path.read_text(encoding="utf-8")
    data = _parse(path, text)
    if not isinstance(data, dict):
        raise TypeError(
            f"{path}: a recipe holds a table of spec keys (seed, weights, global, activations, mode), "
            f"got {type(data).__name__}"
        )
    try:
        return SparsitySpec.from_dict(data)
    except (KeyError, TypeError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        line = _line_of(text, message)
        raise type(err)(f"{path}{f': line {line}' if line else ''}: {message}") from None
