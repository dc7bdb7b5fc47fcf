"""The data sparsifier flows under examples/ (docs/data.md) run as tests."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("data_*.py"))


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {
        "data_tensor_param_embeddingbag.py",
        "data_model_embeddings.py",
        "data_training_data.py",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path):
    runpy.run_path(str(path), run_name="__main__")


@pytest.mark.parametrize("module", ["base_data_sparsifier", "data_norm_sparsifier", "data_sparsifier", "scheduler"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"fx_sparsify.data.{module}"))
    assert result.attempted > 0 and result.failed == 0
