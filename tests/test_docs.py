"""The README's spec reference and ``help(fxs.sparsify_graph)`` name every key the code accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import fx_sparsify as fxs
from fx_sparsify import spec as spec_module
from fx_sparsify.methods import get_mask_method

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

#: rule kind → its class in fx_sparsify.spec (a kind this version lacks is skipped)
RULES = {"weights": "WeightRule", "global": "GlobalRule", "activations": "ActivationRule", "channels": "ChannelRule"}


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def _first_column(table_text: str) -> list[str]:
    keys = []
    for line in table_text.splitlines():
        found = re.match(r"\|\s*`([^`]+)`", line)
        if found:
            keys.append(found[1])
    return keys


def _tables(section: str) -> dict[str, str]:
    """``"top"`` and each ``**`kind` rules**`` heading → the text of its table."""
    parts = re.split(r"\n\*\*`(\w+)` rules\*\*", section.split("**Method options**")[0])
    out = {"top": parts[0]}
    out.update({parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)})
    return out


def _code_top_level_keys() -> list[str]:
    with pytest.raises(KeyError) as err:
        fxs.SparsitySpec.from_dict({"no such key": 1})
    return err.value.args[0].split("known keys: ")[1].split(", ")


def _rule_keys(kind: str) -> set[str] | None:
    cls = getattr(spec_module, RULES[kind], None)
    return None if cls is None else set(cls._KEYS)


def test_top_level_keys_are_documented() -> None:
    tables = _tables(_section("Spec reference"))
    documented = set(_first_column(tables["top"]))
    assert set(_code_top_level_keys()) <= documented


@pytest.mark.parametrize("kind", list(RULES))
def test_every_rule_key_is_documented_and_exists(kind: str) -> None:
    keys = _rule_keys(kind)
    if keys is None:
        pytest.skip(f"this version has no {RULES[kind]}")
    documented = set(_first_column(_tables(_section("Spec reference"))[kind]))
    assert keys == documented, f"README spec reference for {kind!r}: add {keys - documented}, drop {documented - keys}"


def test_every_method_and_option_is_documented() -> None:
    section = _section("Spec reference")
    rows = {}
    for line in section.split("**Method options**")[1].splitlines():
        names = re.match(r"\|\s*((?:`\w+`(?: / )?)+)\s*\|(.*)\|", line)
        if names:
            for name in re.findall(r"`(\w+)`", names[1]):
                rows[name] = set(re.findall(r"`(\w+)`", names[2]))
    for name in fxs.available_mask_methods():
        method = get_mask_method(name)
        if not method.fn.__module__.startswith("fx_sparsify."):
            continue  # registered by a user (or another test), not a built-in
        assert name in rows, f"README 'Method options' lacks method {name!r}"
        assert set(method.options) <= rows[name], f"README 'Method options' for {name!r} lacks {set(method.options) - rows[name]}"


def test_help_documents_the_spec_keys() -> None:
    for doc in (fxs.sparsify_graph.__doc__, fxs.SparsitySpec.from_dict.__doc__):
        assert doc is not None
        for key in _code_top_level_keys():
            assert f"``{key}``" in doc, key
        for kind in RULES:
            for key in _rule_keys(kind) or ():
                assert f"``{key}``" in doc, (kind, key)


def test_version_matches_the_package_metadata() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert fxs.__version__ == re.search(r'^version = "([^"]+)"', text, re.M)[1]  # type: ignore[index]


def test_readme_mentions_load_spec_and_the_cli() -> None:
    assert "fxs.load_spec(" in README and "fx-sparsify run " in README and "python -m fx_sparsify" in README
