"""Method strings: registered names and d-Matrix-style shorthands.

    >>> parse_method("BTOPK{4:8,-1}(U)")
    ParsedMethod(name='nm', options={'n': 4, 'm': 8, 'dim': -1}, gradient='ste')
    >>> parse_method("2:4")
    ParsedMethod(name='nm', options={'n': 2, 'm': 4}, gradient=None)

Parsed once with regular expressions, never ``eval``. ``(U)`` maps to the straight-through
gradient mode (``"ste"``), ``(M)`` to the masked gradient (``"mask"``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ParsedMethod", "parse_method", "format_method"]

_SUFFIX = re.compile(r"^(?P<body>.*?)\s*\((?P<mode>[UM])\)$")
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_TOPK = re.compile(rf"^TOPK\{{\s*(?P<density>{_NUM})\s*\}}$")
_BTOPK = re.compile(r"^BTOPK\{\s*(?P<n>\d+)\s*:\s*(?P<m>\d+)\s*(?:,\s*(?P<dim>[-+]?\d+)\s*)?\}$")
_NM = re.compile(r"^(?P<n>\d+)\s*:\s*(?P<m>\d+)$")
_BERN = re.compile(rf"^BERN(?:\{{\s*(?P<density>{_NUM})\s*\}})?$")
_GRADIENT = {"U": "ste", "M": "mask"}


@dataclass(frozen=True)
class ParsedMethod:
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    gradient: str | None = None


def parse_method(method: str) -> ParsedMethod:
    """Turn a method string (registered name or shorthand) into name, options and gradient mode."""
    if not isinstance(method, str):
        raise TypeError(f"a mask method is named by a string, got {type(method).__name__}: {method!r}")
    text = method.strip()
    gradient = None
    suffix = _SUFFIX.match(text)
    if suffix:
        text, gradient = suffix["body"], _GRADIENT[suffix["mode"]]
    if m := _TOPK.match(text):
        density = float(m["density"])
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"{method!r}: TOPK density must be in [0, 1], got {density}")
        return ParsedMethod("topk", {"density": density}, gradient)
    if m := _BTOPK.match(text):
        opts: dict[str, Any] = {"n": int(m["n"]), "m": int(m["m"])}
        if m["dim"] is not None:
            opts["dim"] = int(m["dim"])
        return ParsedMethod("nm", opts, gradient)
    if m := _NM.match(text):
        return ParsedMethod("nm", {"n": int(m["n"]), "m": int(m["m"])}, gradient)
    if m := _BERN.match(text):
        return ParsedMethod("bernoulli", {} if m["density"] is None else {"density": float(m["density"])}, gradient)
    if text == "DENSE":
        return ParsedMethod("dense", {}, gradient)
    if re.match(r"^[A-Z]+\{", text) or text in ("TOPK", "BTOPK"):
        raise ValueError(
            f"cannot parse the method shorthand {method!r}; accepted forms: 'TOPK{{0.5}}', "
            "'BTOPK{4:8,-1}', 'BERN', 'DENSE', '2:4', each with an optional '(U)' or '(M)' suffix"
        )
    return ParsedMethod(text, {}, gradient)


_SUFFIX_OF = {mode: letter for letter, mode in _GRADIENT.items()}


def format_method(parsed: ParsedMethod) -> str:
    """The shortest string that :func:`parse_method` turns back into ``parsed``.

    >>> format_method(ParsedMethod("nm", {"n": 4, "m": 8, "dim": -1}, "ste"))
    'BTOPK{4:8,-1}(U)'
    >>> format_method(ParsedMethod("topk", {"density": 0.25}))
    'TOPK{0.25}'

    Only options a shorthand can carry are allowed; anything else raises ``ValueError`` (pass such
    options separately, next to the method name).
    """
    name, opts = parsed.name, dict(parsed.options)
    if parsed.gradient is not None and parsed.gradient not in _SUFFIX_OF:
        raise ValueError(f"gradient mode {parsed.gradient!r} has no shorthand suffix; use 'ste' or 'mask'")
    if name == "topk" and set(opts) == {"density"}:
        body = f"TOPK{{{float(opts['density'])!r}}}"
    elif name == "nm" and set(opts) in ({"n", "m"}, {"n", "m", "dim"}):
        n, m = int(opts["n"]), int(opts["m"])
        body = f"BTOPK{{{n}:{m},{int(opts['dim'])}}}" if "dim" in opts else f"{n}:{m}"
    elif name == "bernoulli" and set(opts) <= {"density"}:
        body = f"BERN{{{float(opts['density'])!r}}}" if opts else "BERN"
    elif name == "dense" and not opts:
        body = "DENSE"
    elif not opts and parse_method(name) == ParsedMethod(name, {}, None):
        body = name
    else:
        raise ValueError(f"{name!r} with options {opts!r} has no shorthand; pass the options next to the method name")
    return body if parsed.gradient is None else f"{body}({_SUFFIX_OF[parsed.gradient]})"
