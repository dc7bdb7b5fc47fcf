"""The layout reads top-down: api → sparse_graph_module → passes → state, methods, ops (no circles)."""

import ast
import pathlib

import fx_sparsify

PKG = pathlib.Path(fx_sparsify.__file__).parent


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.rsplit(".", 1)[-1])
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name.rsplit(".", 1)[-1] for a in node.names)
    return names


def test_passes_never_import_the_facade():
    for path in sorted((PKG / "passes").glob("*.py")):
        found = _imports(path) & {"sparse_graph_module", "api", "SparseGraphModule"}
        assert not found, f"{path.name} imports {found}"


def test_state_and_report_sit_below_the_facade():
    for name in ("state.py", "report.py"):
        found = _imports(PKG / name) & {"sparse_graph_module", "api", "SparseGraphModule"}
        assert not found, f"{name} imports {found}"


# --- the package's import graph -------------------------------------------------------------------------
ROOT = PKG.parent


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _package_imports(name: str) -> list[tuple[int, str, str, str | None]]:
    """(line, imported module, module imported from, imported name) for every import in module ``name``,
    function-level ones included (a deferred import still ties two modules); imports under
    ``if TYPE_CHECKING:`` are left out (annotations only, never run)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    guarded = [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]
    skipped = {id(sub) for node in guarded for child in node.body for sub in ast.walk(child)}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: list[tuple[int, str, str, str | None]] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import ops` imports the module ops
                full = f"{source}.{alias.name}"
                out.append((node.lineno, full if full in MODULES else source, source, alias.name))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name, alias.name, None) for alias in node.names)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_circle():  # the circle test cannot pass by a finder that finds nothing
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]] and _cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_circle():
    graph = {name: {m for _, m, _, _ in _package_imports(name) if m in MODULES and m != name} for name in MODULES}
    assert _cycles(graph) == []


def test_no_private_name_is_imported_from_another_module():
    crossing = [
        f"{MODULES[name].relative_to(ROOT)}:{line} imports {source}.{imported}"
        for name in MODULES
        for line, _, source, imported in _package_imports(name)
        if imported
        and imported.startswith("_")
        and not imported.startswith("__")
        and source.startswith("fx_sparsify")
        and f"{source}.{imported}" not in MODULES  # a private module is fine
    ]
    assert crossing == []


def test_no_module_is_over_600_lines():
    long = {
        str(path.relative_to(ROOT)): n for path in MODULES.values() if (n := len(path.read_text().splitlines())) > 600
    }
    assert long == {}
