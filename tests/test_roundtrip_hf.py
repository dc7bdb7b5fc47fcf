"""``squash_into`` on Hugging Face models (SPEC §14): save_pretrained → from_pretrained keeps the sparsity."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import fx_sparsify as fxs

from models import hf_bert, hf_first, hf_inputs, hf_llama

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.models


@pytest.mark.parametrize("build", [hf_bert, hf_llama], ids=["bert", "llama"])
def test_squash_into_then_save_and_from_pretrained(build: Callable[[], tuple[Any, str]], tmp_path: Path) -> None:
    model, selector = build()
    model.eval()
    kwargs = hf_inputs(model)
    sgm = fxs.sparsify_graph(
        model, {"weights": [{"target": selector, "method": "l1_unstructured", "sparsity": 0.5}]}, example_kwargs=kwargs
    )
    sgm.step()
    with torch.no_grad():
        masked = hf_first(sgm(**kwargs))
    own = sgm.squash_into(model)
    assert own is model and type(own) is type(model)  # still the Hugging Face class, with its methods
    own.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_first(loaded(**kwargs)), masked)
    for name in sgm.masks():
        weight = loaded.get_parameter(name)
        assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-6), name
