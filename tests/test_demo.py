from __future__ import annotations

import pytest

from fx_sparsify import demo


def test_demo_runs_and_checks_itself(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main() == 0
    out = capsys.readouterr().out
    assert "fx_sparsify.ops.apply_mask" in out and "embedding_masked" in out  # mask nodes printed
    assert "| target" in out and "conv.weight" in out  # the report
    assert "OK: exported outputs equal the masked model" in out
