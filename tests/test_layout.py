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
