"""Hugging Face models built from a config (random weights, no downloads): the `models` extra."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

import fx_sparsify as fxs

from helpers import fxs_nodes

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.models


def _bert() -> tuple[torch.nn.Module, str]:
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64)
    return transformers.BertModel(cfg), "re:encoder\\.layer\\.\\d+\\.(intermediate|output)\\.dense"


def _gpt2() -> tuple[torch.nn.Module, str]:
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg), "re:transformer\\.h\\.\\d+\\.mlp\\.c_(fc|proj)"


def _llama() -> tuple[torch.nn.Module, str]:
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=64, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg), "re:model\\.layers\\.\\d+\\.(mlp|self_attn)\\.\\w+_proj"


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("build", [_bert, _gpt2, _llama], ids=["bert", "gpt2", "llama"])
def test_hugging_face_model_end_to_end(build: Callable[[], tuple[torch.nn.Module, str]]) -> None:
    torch.manual_seed(0)
    model, selector = build()
    model.eval()
    ids = torch.randint(1, 100, (2, 7))
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if not isinstance(model, transformers.BertModel):
        kwargs["use_cache"] = False
    spec = {"weights": [{"target": selector, "method": "l1_unstructured", "sparsity": 0.5}]}
    sgm = fxs.sparsify_graph(model, spec, example_kwargs=kwargs)
    assert sgm._fxs.capture == "export"
    assert len(sgm.masks()) >= 4
    with torch.no_grad():
        torch.testing.assert_close(_first(sgm(**kwargs)), _first(model(**kwargs)))
        sgm.step()
        masked = _first(sgm(**kwargs))
        squashed = sgm.squash()
        torch.testing.assert_close(_first(squashed(**kwargs)), masked)
    assert not fxs_nodes(squashed)
    assert all(abs(v - 0.5) < 1e-6 for v in sgm.sparsity().values())
    fresh, _ = build()
    fresh.load_state_dict(squashed.state_dict())  # strict: same keys and shapes
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(_first(fresh(**kwargs)), masked)
