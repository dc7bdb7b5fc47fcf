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
#: the deepest nesting a recipe may have (a real one nests 5 levels: spec, list, rule, options, a list)
MAX_DEPTH = 32
#: the most values a YAML recipe may expand to through its aliases (a real one holds a few hundred)
MAX_VALUES = 100_000
#: the largest recipe file read
MAX_BYTES = 1 << 20


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


def _deep_line(text: str) -> int | None:
    """The line where brackets (``[`` / ``{`` outside quotes) first nest past :data:`MAX_DEPTH`, if they do."""
    depth, quote, line = 0, "", 1
    for i, ch in enumerate(text):
        if ch == "\n":
            line += 1
        elif quote:
            quote = "" if ch == quote and text[i - 1] != "\\" else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return line
        elif ch in "]}":
            depth -= 1
    return None


def _too_deep(path: Path, line: int | None) -> ValueError:
    return ValueError(
        f"{path}: {f'line {line}: ' if line else ''}the recipe nests deeper than {MAX_DEPTH} levels; "
        "a recipe is a table of rules, each a table of options"
    )


def _huge_int(path: Path, text: str, err: ValueError) -> ValueError:
    """Python's digit-limit error, as a short one naming the file and the line of the longest digit run."""
    runs = list(re.finditer(r"\d{100,}", text))
    longest = max(runs, key=lambda m: len(m[0]), default=None)
    line = text.count("\n", 0, longest.start()) + 1 if longest else None
    found = re.search(r"value has (\d+) digits", str(err))
    digits = found[1] if found else "too many"
    return ValueError(
        f"{path}: {f'line {line}: ' if line else ''}an integer with {digits} digits; recipe numbers "
        "are sparsities, counts and sizes"
    )


def _yaml_load(path: Path, text: str, yaml: Any) -> Any:
    """``yaml.safe_load`` after counting the values the document expands to through its aliases (a 578-byte
    "billion laughs" expands to 10**9) and checking its depth, with the line of the offending node."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        sizes: dict[int, int] = {}
        stack: list[tuple[Any, int, bool]] = [(node, 1, False)]
        while stack:  # iterative post-order: the expanded size of each distinct node, once
            current, depth, done = stack.pop()
            if depth > MAX_DEPTH:
                raise _too_deep(path, current.start_mark.line + 1)
            children = _children(current)
            if done:
                sizes[id(current)] = 1 + sum(sizes[id(c)] for c in children)
                if sizes[id(current)] > MAX_VALUES:
                    raise ValueError(
                        f"{path}: line {current.start_mark.line + 1}: its aliases expand to more than "
                        f"{MAX_VALUES} values; a recipe holds a few hundred"
                    )
            elif id(current) not in sizes:
                stack.append((current, depth, True))
                stack.extend((c, depth + 1, False) for c in children if id(c) not in sizes)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _children(node: Any) -> list[Any]:
    if isinstance(node.value, list):
        return [part for item in node.value for part in (item if isinstance(item, tuple) else (item,))]
    return []


def _parse(path: Path, text: str) -> Any:
    """The file's content as Python data; a ``ValueError`` naming the file and line on a syntax error, on nesting
    deeper than :data:`MAX_DEPTH`, on YAML aliases expanding past :data:`MAX_VALUES` and on a huge integer."""
    try:
        return _parse_text(path, text)
    except RecursionError:  # the parsers recurse: nesting thousands deep
        raise _too_deep(path, _deep_line(text)) from None
    except ValueError as err:
        if "integer string conversion" not in str(err):
            raise
        raise _huge_int(path, text, err) from None


def _parse_text(path: Path, text: str) -> Any:
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
            if "integer string conversion" in str(err):
                raise
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
            return _yaml_load(path, text, yaml)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
            problem = getattr(err, "problem", None) or str(err)
            raise ValueError(f"{path}: {where}: invalid YAML: {problem}") from None
    raise ValueError(
        f"{path}: unknown recipe format {path.suffix or '(no suffix)'!r}; use one of {', '.join(SPEC_SUFFIXES)}"
    )


def _check_depth(path: Path, text: str, data: Any) -> None:
    """Nesting past :data:`MAX_DEPTH` that the parser took (JSON / TOML): refused before anything recurses on it."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _too_deep(path, _deep_line(text))
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((c, depth + 1) for c in children)


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
    if path.stat().st_size > MAX_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, more than the {MAX_BYTES} a recipe may take")
    text = path.read_text(encoding="utf-8")
    data = _parse(path, text)
    _check_depth(path, text, data)
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
