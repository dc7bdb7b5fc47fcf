"""Hugging Face models built from a config (random weights, no downloads): the `models` extra."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

import fx_sparsify as fxs

from helpers import fxs_nodes
from models import hf_bert, hf_first, hf_inputs, hf_llama

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.models


def _gpt2() -> tuple[torch.nn.Module, str]:
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg), "re:transformer\\.h\\.\\d+\\.mlp\\.c_(fc|proj)"


@pytest.mark.parametrize("build", [hf_bert, _gpt2, hf_llama], ids=["bert", "gpt2", "llama"])
def test_hugging_face_model_end_to_end(build: Callable[[], tuple[torch.nn.Module, str]]) -> None:
    torch.manual_seed(0)
    model, selector = build()
    model.eval()
    kwargs = hf_inputs(model)
    spec = {"weights": [{"target": selector, "method": "l1_unstructured", "sparsity": 0.5}]}
    sgm = fxs.sparsify_graph(model, spec, example_kwargs=kwargs)
    assert sgm._fxs.capture == "export"
    assert len(sgm.masks()) >= 4
    with torch.no_grad():
        torch.testing.assert_close(hf_first(sgm(**kwargs)), hf_first(model(**kwargs)))
        sgm.step()
        masked = hf_first(sgm(**kwargs))
        squashed = sgm.squash()
        torch.testing.assert_close(hf_first(squashed(**kwargs)), masked)
    assert not fxs_nodes(squashed)
    assert all(abs(v - 0.5) < 1e-6 for v in sgm.sparsity().values())
    fresh, _ = build()
    fresh.load_state_dict(squashed.state_dict())  # strict: same keys and shapes
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_first(fresh(**kwargs)), masked)
