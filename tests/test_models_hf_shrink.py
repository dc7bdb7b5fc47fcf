"""Hugging Face BERT and LLaMA built from configs: channels + heads rules, shrunk ≡ masked (SPEC §10)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import fx_sparsify as fxs

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.models


def _first(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_ffn_channels_and_heads_shrink_exactly(arch: str) -> None:
    ids = torch.randint(1, 100, (2, 7))
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch == "bert":
        model = transformers.BertModel(transformers.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
        spec = {"channels": [{"target": "re:encoder\\.layer\\.\\d+\\.intermediate\\.dense", "sparsity": 0.5},
                             {"target": "re:encoder\\.layer\\.\\d+\\.attention\\.self", "heads": 0.5}]}
        ffn, q = "encoder.layer.0.intermediate.dense.weight", "encoder.layer.0.attention.self.query.weight"
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, bos_token_id=0, eos_token_id=0))
        kwargs["use_cache"] = False
        spec = {"channels": [{"target": "re:model\\.layers\\.\\d+\\.mlp\\.up_proj", "sparsity": 0.5},
                             {"target": "re:model\\.layers\\.\\d+\\.self_attn", "heads": 0.5}]}
        ffn, q = "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"
    model.eval()
    sgm = fxs.sparsify_graph(model, spec, example_kwargs=kwargs)
    sgm.step()
    assert "no" not in [row.split("|")[5].strip() for row in sgm.shrink_plan().splitlines()[3:]]
    small = sgm.squash(shrink=True)
    with torch.no_grad():
        torch.testing.assert_close(_first(small(**kwargs)), _first(sgm(**kwargs)), atol=1e-5, rtol=1e-5)
    sd = small.state_dict()
    assert sd[ffn].shape == (32, 32) and sd[q].shape == (16, 32)  # half the neurons, half the query heads
    if arch == "llama":  # GQA: one of the two kv heads goes, with its two query heads
        assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (8, 32)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def _llama() -> Any:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, bos_token_id=0, eos_token_id=0)).eval()


def test_squash_into_shrink_resizes_the_config_and_reloads_bit_exact(tmp_path: Any) -> None:
    ids = torch.randint(1, 100, (2, 7))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    model = _llama()
    spec = {"channels": [{"target": "re:model\\.layers\\.\\d+\\.mlp\\.up_proj", "sparsity": 0.5},
                         {"target": "re:model\\.layers\\.\\d+\\.self_attn", "heads": 0.5}]}
    sgm = fxs.sparsify_graph(model, spec, example_kwargs=kwargs)
    sgm.step()
    with torch.no_grad():
        masked = sgm(**kwargs).logits
    assert sgm.squash_into(model, shrink=True) is model
    config = model.config
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 2, 1, 8)
    assert model.model.layers[0].mlp.up_proj.out_features == 32
    with torch.no_grad():
        torch.testing.assert_close(model(**kwargs).logits, masked, atol=1e-5, rtol=1e-5)
        model.save_pretrained(tmp_path)
        reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
        assert torch.equal(reloaded(**kwargs).logits, model(**kwargs).logits)


def test_squash_into_shrink_refuses_what_a_config_cannot_say() -> None:
    ids = torch.randint(1, 100, (2, 7))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    model = _llama()
    one_layer = {"channels": [{"target": "model.layers.0.mlp.up_proj", "sparsity": 0.5}]}
    sgm = fxs.sparsify_graph(model, one_layer, example_kwargs=kwargs)
    sgm.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="differ between layers.*'global': false"):
        sgm.squash_into(model, shrink=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing changed
    kwargs.pop("use_cache")
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)).eval()
    sgm = fxs.sparsify_graph(bert, {"channels": [{"target": "encoder.layer.0.attention.self", "heads": 0.5}]},
                             example_kwargs=kwargs)
    sgm.step()
    with pytest.raises(ValueError, match="head_dim"):
        sgm.squash_into(bert, shrink=True)


def test_gpt2_conv1d_mlp_channels_shrink() -> None:
    ids = torch.randint(1, 100, (2, 7))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)).eval()
    sgm = fxs.sparsify_graph(model, {"channels": [{"target": "re:transformer\\.h\\.\\d+\\.mlp\\.c_fc", "sparsity": 0.5}]},
                             example_kwargs=kwargs)
    sgm.step()
    small = sgm.squash(shrink=True)
    with torch.no_grad():
        torch.testing.assert_close(small(**kwargs).logits, sgm(**kwargs).logits, atol=1e-5, rtol=1e-5)
    assert small.state_dict()["transformer.h.0.mlp.c_fc.weight"].shape == (32, 64)  # Conv1D: (in, out)
    assert small.state_dict()["transformer.h.0.mlp.c_proj.weight"].shape == (64, 32)
