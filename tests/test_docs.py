"""The docs' spec reference (docs/spec.md) and ``help(fxs.sparsify_graph)`` name every key the code accepts;
the README and the docs site show only code that exists under examples/ and runs in a test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import fx_sparsify as fxs
from fx_sparsify import spec as spec_module
from fx_sparsify.methods import get_mask_method

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
SPEC_PAGE = (DOCS / "spec.md").read_text()

#: rule kind → its class in fx_sparsify.spec (a kind this version lacks is skipped)
RULES = {"weights": "WeightRule", "global": "GlobalRule", "activations": "ActivationRule", "channels": "ChannelRule"}


def _spec_reference() -> str:
    """The spec reference page, from its title on."""
    return SPEC_PAGE[SPEC_PAGE.index("# Spec reference\n") :]


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
    tables = _tables(_spec_reference())
    documented = set(_first_column(tables["top"]))
    assert set(_code_top_level_keys()) <= documented


@pytest.mark.parametrize("kind", list(RULES))
def test_every_rule_key_is_documented_and_exists(kind: str) -> None:
    keys = _rule_keys(kind)
    if keys is None:
        pytest.skip(f"this version has no {RULES[kind]}")
    documented = set(_first_column(_tables(_spec_reference())[kind]))
    assert keys == documented, (
        f"docs/spec.md spec reference for {kind!r}: add {keys - documented}, drop {documented - keys}"
    )


def test_every_method_and_option_is_documented() -> None:
    section = _spec_reference()
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
        assert name in rows, f"docs/spec.md 'Method options' lacks method {name!r}"
        assert set(method.options) <= rows[name], (
            f"docs/spec.md 'Method options' for {name!r} lacks {set(method.options) - rows[name]}"
        )


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


def test_the_readme_explains_every_file_run_writes() -> None:
    from fx_sparsify._run_outputs import RUN_FILES

    section = README[README.index("## What `fx-sparsify run` writes") :]
    described = set(re.findall(r"^\| `([^`]+)` \|", section, re.M))
    page = set(re.findall(r"^\| `([^`]+)` \|", (DOCS / "outputs.md").read_text(), re.M))  # the full reference
    assert set(RUN_FILES) <= page, f"docs/outputs.md lacks {set(RUN_FILES) - page}"
    lacking = set(RUN_FILES) - described - page
    assert not lacking, f"README 'What fx-sparsify run writes' lacks {lacking}"


def test_every_docs_page_is_in_the_site_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text().split("\nnav:", 1)[1]
    listed = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", nav, re.M))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.glob("**/*.md")}
    assert pages <= listed, f"mkdocs.yml nav: add {sorted(pages - listed)} (title: file.md)"


def test_the_api_reference_lists_every_public_name() -> None:
    listed = set(re.findall(r"^::: fx_sparsify\.(\w+)", (DOCS / "api.md").read_text(), re.M))
    missing = sorted(set(fxs.__all__) - listed)
    assert not missing, f"docs/api.md: add '::: fx_sparsify.<name>' for {missing}"


def test_readme_and_docs_mention_load_spec_and_the_cli() -> None:
    recipes = (DOCS / "recipes.md").read_text()
    for text in (README, recipes):
        assert "fxs.load_spec(" in text and "fx-sparsify run " in text and "python -m fx_sparsify" in text


def _code_lines(text: str) -> list[str]:
    """Lines of Python code without comments, blank lines and surrounding whitespace."""
    lines = []
    for line in text.splitlines():
        code = "" if line.lstrip().startswith("#") else re.sub(r"\s+#.*$", "", line).strip()
        if code:
            lines.append(code)
    return lines


def _python_blocks() -> list[tuple[str, str, str]]:
    """(page, the text before the block, the block) for every ```python block of the README and docs/."""
    blocks = []
    for page in [ROOT / "README.md", *sorted(DOCS.glob("**/*.md"))]:
        text = page.read_text()
        for found in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S):
            blocks.append((str(page.relative_to(ROOT)), text[: found.start()], found[1]))
    return blocks


def test_every_python_snippet_names_an_example_that_a_test_runs() -> None:
    tests_text = "\n".join(p.read_text() for p in (ROOT / "tests").glob("**/*.py"))
    for page, before, _ in _python_blocks():
        named = re.findall(r"examples/(\w+)\.py", "\n".join(before.splitlines()[-8:]))
        assert named, f"{page}: a python snippet that names no examples/<file>.py in the lines before it"
        example = ROOT / "examples" / f"{named[-1]}.py"
        assert example.exists(), f"{page}: {example} does not exist"
        assert named[-1] in tests_text, f"{page}: no test under tests/ runs examples/{named[-1]}.py"


def test_every_python_snippet_is_taken_from_its_example() -> None:
    """Each code line of a snippet (comments and blank lines aside) is a line of the example it names."""
    for page, before, block in _python_blocks():
        named = re.findall(r"examples/(\w+)\.py", "\n".join(before.splitlines()[-8:]))
        example = ROOT / "examples" / f"{named[-1]}.py" if named else None
        if example is None or not example.exists():
            continue  # the test above names the problem
        lines = set(_code_lines(example.read_text()))
        missing = [line for line in _code_lines(block) if line not in lines]
        assert not missing, f"{page}: snippet lines not in examples/{named[-1]}.py: {missing}"


def test_readme_quickstart_is_the_example_file() -> None:
    (block,) = [b for page, before, b in _python_blocks() if page == "README.md" and "quickstart.py" in before[-300:]]
    example = set(_code_lines((ROOT / "examples" / "quickstart.py").read_text()))
    missing = [line for line in _code_lines(block) if line not in example]
    assert not missing, f"README quick start lines not in examples/quickstart.py: {missing}"
