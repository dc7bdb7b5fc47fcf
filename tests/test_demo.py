from __future__ import annotations

import pytest

from fx_sparsify import demo


def test_demo_runs_and_checks_itself(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main() == 0
    out = capsys.readouterr().out
    assert "fx_sparsify.ops.apply_mask" in out and "embedding_masked" in out  # mask nodes printed
    assert "| target" in out and "conv.weight" in out  # the report
    assert "OK: exported outputs equal the masked model" in out
    assert out.startswith("== spec ==\n{") and '"method": "l1_unstructured"' in out.split("==", 3)[2]
    assert (
        "== outcome ==" in out
        and "values are zero" in out
        and "on disk: torch.save" in out
        and "forward, median ms" in out
    )
    assert "1 thread" in out and "unstructured zeros save no time in dense kernels" in out  # the times, explained


def test_import_warns_nothing_without_numpy() -> None:
    import subprocess
    import sys

    code = "import sys; sys.modules['numpy'] = None; import fx_sparsify"  # numpy is not a dependency
    done = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
