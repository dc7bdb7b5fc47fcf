"""Modules captured with ``capture="export"`` go through ``torch.compile`` and a strict ``torch.export``: as
captured, squashed and shrunk. Each case runs in a fresh process (inside a warm one, an earlier compile can
hide a failure): the guard function was rebuilt in a namespace without ``__builtins__``, and dynamo raised
``KeyError: '__builtins__'``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

CASE = """
import sys, torch, fx_sparsify as fxs
from models import MLP
torch.manual_seed(0)
x = torch.randn(4, 16)
sgm = fxs.sparsify_graph(MLP(), {"weights": [{"target": "head", "method": "l1_unstructured", "sparsity": 0.5}],
                                 "channels": [{"target": "fc1", "sparsity": 0.25}]}, capture="export",
                         example_inputs=(x,))
sgm(x)
sgm.step()
tool, form = sys.argv[1], sys.argv[2]
module = {"captured": lambda: sgm, "squashed": sgm.squash, "shrunk": lambda: sgm.squash(shrink=True)}[form]()
if tool == "compile":
    out = torch.compile(module, backend="eager", fullgraph=True)(x)
else:
    out = torch.export.export(module, (x,), strict=True).module()(x)
assert torch.allclose(out, sgm(x), atol=1e-6), (out - sgm(x)).abs().max()
print("ok")
"""


#: ~20 s a fresh process on a busy 2-core machine: three run by default, all with --runslow
CASES = [
    ("compile", "captured"),
    ("compile", "shrunk"),
    ("strict-export", "squashed"),
    pytest.param("compile", "squashed", marks=pytest.mark.slow),
    pytest.param("strict-export", "captured", marks=pytest.mark.slow),
    pytest.param("strict-export", "shrunk", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("tool,form", CASES)
def test_export_captures_compile_and_export_strictly(tool: str, form: str) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", CASE, tool, form], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
