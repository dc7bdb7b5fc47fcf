"""``squash_into`` on Hugging Face models (SPEC §14): save_pretrained → from_pretrained keeps the sparsity."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import fx_sparsify as fxs

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.models


def _bert() -> tuple[Any, str]:
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64)
    return transformers.BertModel(cfg), "re:encoder\\.layer\\.\\d+\\.(intermediate|output)\\.dense"


def _llama() -> tuple[Any, str]:
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=64, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg), "re:model\\.layers\\.\\d+\\.(mlp|self_attn)\\.\\w+_proj"


def _first(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("build", [_bert, _llama], ids=["bert", "llama"])
def test_squash_into_then_save_and_from_pretrained(build: Callable[[], tuple[Any, str]], tmp_path: Path) -> None:
    model, selector = build()
    model.eval()
    ids = torch.randint(1, 100, (2, 7))
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if not isinstance(model, transformers.BertModel):
        kwargs["use_cache"] = False
    sgm = fxs.sparsify_graph(model, {"weights": [{"target": selector, "method": "l1_unstructured", "sparsity": 0.5}]},
                             example_kwargs=kwargs)
    sgm.step()
    with torch.no_grad():
        masked = _first(sgm(**kwargs))
    own = sgm.squash_into(model)
    assert own is model and type(own) is type(model)  # still the Hugging Face class, with its methods
    own.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(_first(loaded(**kwargs)), masked)
    for name in sgm.masks():
        weight = loaded.get_parameter(name)
        assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-6), name
