"""dmx-style shorthands: parsing, round trips through format_method, and errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fx_sparsify.methods import ParsedMethod, format_method, parse_method


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("TOPK{0.5}", ParsedMethod("topk", {"density": 0.5})),
        ("TOPK{ .25 }(M)", ParsedMethod("topk", {"density": 0.25}, "mask")),
        ("BTOPK{4:8,-1}(U)", ParsedMethod("nm", {"n": 4, "m": 8, "dim": -1}, "ste")),
        ("BTOPK{2:4}", ParsedMethod("nm", {"n": 2, "m": 4})),
        ("2:4", ParsedMethod("nm", {"n": 2, "m": 4})),
        ("1:8(M)", ParsedMethod("nm", {"n": 1, "m": 8}, "mask")),
        ("BERN", ParsedMethod("bernoulli", {})),
        ("BERN{0.3}(U)", ParsedMethod("bernoulli", {"density": 0.3}, "ste")),
        ("DENSE", ParsedMethod("dense", {})),
        ("l1_unstructured", ParsedMethod("l1_unstructured", {})),
        ("block(U)", ParsedMethod("block", {}, "ste")),
    ],
)
def test_parse(text: str, parsed: ParsedMethod) -> None:
    assert parse_method(text) == parsed
    assert parse_method(format_method(parsed)) == parsed


@pytest.mark.parametrize("text", ["TOPK{1.5}", "TOPK{abc}", "BTOPK{2;4}", "TOPK", "BERN{x}", "FOO{1}"])
def test_bad_shorthands(text: str) -> None:
    with pytest.raises(ValueError):
        parse_method(text)


def test_no_eval() -> None:
    assert parse_method("__import__('os')").name == "__import__('os')"  # just an (unknown) name


def test_format_rejects_options_without_shorthand() -> None:
    with pytest.raises(ValueError, match="no shorthand"):
        format_method(ParsedMethod("l1_unstructured", {"sparsity": 0.5}))


gradients = st.sampled_from([None, "ste", "mask"])


@st.composite
def parsed_methods(draw: st.DrawFn) -> ParsedMethod:
    kind = draw(st.sampled_from(["topk", "nm", "nm_dim", "bern", "bern_d", "dense", "name"]))
    g = draw(gradients)
    if kind == "topk":
        return ParsedMethod("topk", {"density": draw(st.floats(0, 1))}, g)
    if kind.startswith("nm"):
        m = draw(st.integers(1, 64))
        opts = {"n": draw(st.integers(0, m)), "m": m}
        if kind == "nm_dim":
            opts["dim"] = draw(st.integers(-4, 4))
        return ParsedMethod("nm", opts, g)
    if kind.startswith("bern"):
        return ParsedMethod("bernoulli", {"density": draw(st.floats(0, 1))} if kind == "bern_d" else {}, g)
    if kind == "dense":
        return ParsedMethod("dense", {}, g)
    return ParsedMethod(draw(st.sampled_from(["l1_unstructured", "block", "my_method"])), {}, g)


@settings(max_examples=60, deadline=None)
@given(parsed_methods())
def test_round_trip(parsed: ParsedMethod) -> None:
    assert parse_method(format_method(parsed)) == parsed
