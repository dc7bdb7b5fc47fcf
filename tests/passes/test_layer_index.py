"""Finding a layer's call and its input (passes/layer_index.py): tied weights, export and fx captures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_sparsify as fxs

from helpers import fxs_nodes
from models import hf_first, hf_inputs


class TiedLM(nn.Module):
    """An embedding and a Linear head sharing one weight, as GPT-2's / T5's ``lm_head``."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.emb(ids))))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_activation_rule_on_a_head_tied_to_the_embedding(capture: str) -> None:
    """The head's weight is read by the embedding lookup first; the rule finds the head's own call (an export
    capture refused with 'input not visible' while the embedding's use came first)."""
    torch.manual_seed(0)
    model = TiedLM().eval()
    ids = torch.randint(0, 50, (4, 7))
    spec = {"activations": [{"target": "head", "mask": "l1_unstructured", "sparsity": 0.5}]}
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(ids,), capture=capture)
    observers = [n for n in sgm.graph.nodes if n.op == "call_module" and n.target == "head_input_observer"]
    assert len(observers) == 1 and observers[0].args[0].target in (torch.relu, torch.ops.aten.relu.default)
    with torch.no_grad():
        torch.testing.assert_close(sgm(ids), model(ids))
        sgm(ids)
        sgm.step()
        masked = sgm(ids)
        mask = sgm.get_buffer("head_input_mask")
        assert float((mask == 0).float().mean()) == 0.5
        expected = torch.relu(model.fc(model.emb(ids))) * mask @ model.emb.weight.T
        torch.testing.assert_close(masked, expected)
        squashed = sgm.squash()
        torch.testing.assert_close(squashed(ids), masked)
    assert not fxs_nodes(squashed)
    # the embedding table (the same tensor as the head's weight) is not folded into
    torch.testing.assert_close(squashed.state_dict()["emb.weight"], model.emb.weight)


@pytest.mark.models
def test_activation_rule_on_hugging_face_gpt2_lm_head() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    kwargs = hf_inputs(model)
    spec = {"activations": [{"target": "lm_head", "mask": "l1_unstructured", "sparsity": 0.25}]}
    sgm = fxs.sparsify_graph(model, spec, example_kwargs=kwargs)
    assert sgm._fxs.capture == "export"
    with torch.no_grad():
        torch.testing.assert_close(hf_first(sgm(**kwargs)), hf_first(model(**kwargs)))
        sgm.step()
        masked = hf_first(sgm(**kwargs))
        assert float((sgm.get_buffer("lm_head_input_mask") == 0).float().mean()) == 0.25
        hidden = model.transformer(**kwargs).last_hidden_state
        torch.testing.assert_close(masked, (hidden * sgm.get_buffer("lm_head_input_mask")) @ model.lm_head.weight.T)
        torch.testing.assert_close(hf_first(sgm.squash()(**kwargs)), masked)


@pytest.mark.models
def test_activation_rule_on_hugging_face_t5_lm_head() -> None:
    """T5 ties lm_head to the shared embedding (and scales the decoder output before it)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=100,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        decoder_start_token_id=0,
        tie_word_embeddings=True,
    )
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    assert model.lm_head.weight is model.shared.weight
    kwargs = {
        "input_ids": torch.randint(1, 100, (2, 7)),
        "decoder_input_ids": torch.randint(1, 100, (2, 5)),
        "use_cache": False,
    }
    spec = {"activations": [{"target": "lm_head", "mask": "l1_unstructured", "sparsity": 0.25}]}
    sgm = fxs.sparsify_graph(model, spec, example_kwargs=kwargs)
    assert sgm._fxs.capture == "export"
    with torch.no_grad():
        torch.testing.assert_close(hf_first(sgm(**kwargs)), hf_first(model(**kwargs)))
        sgm.step()
        assert float((sgm.get_buffer("lm_head_input_mask") == 0).float().mean()) == 0.25
        masked = hf_first(sgm(**kwargs))
        squashed = sgm.squash()
        torch.testing.assert_close(hf_first(squashed(**kwargs)), masked)
    torch.testing.assert_close(squashed.state_dict()["shared.weight"], model.shared.weight)
