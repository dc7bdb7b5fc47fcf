"""Hugging Face BERT, LLaMA, GPT-2, OPT, T5 and Whisper built from configs: channels + heads rules, shrunk ≡ masked
(SPEC §10), and squash_into(shrink=True) resizing each family's config for save_pretrained → from_pretrained."""

from __future__ import annotations

import copy
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
        model = transformers.BertModel(
            transformers.BertConfig(
                vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
            )
        )
        spec = {
            "channels": [
                {"target": "re:encoder\\.layer\\.\\d+\\.intermediate\\.dense", "sparsity": 0.5},
                {"target": "re:encoder\\.layer\\.\\d+\\.attention\\.self", "heads": 0.5},
            ]
        }
        ffn, q = "encoder.layer.0.intermediate.dense.weight", "encoder.layer.0.attention.self.query.weight"
    else:
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=100,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=64,
                bos_token_id=0,
                eos_token_id=0,
            )
        )
        kwargs["use_cache"] = False
        spec = {
            "channels": [
                {"target": "re:model\\.layers\\.\\d+\\.mlp\\.up_proj", "sparsity": 0.5},
                {"target": "re:model\\.layers\\.\\d+\\.self_attn", "heads": 0.5},
            ]
        }
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
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            bos_token_id=0,
            eos_token_id=0,
        )
    ).eval()


def test_squash_into_shrink_resizes_the_config_and_reloads_bit_exact(tmp_path: Any) -> None:
    ids = torch.randint(1, 100, (2, 7))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    model = _llama()
    spec = {
        "channels": [
            {"target": "re:model\\.layers\\.\\d+\\.mlp\\.up_proj", "sparsity": 0.5},
            {"target": "re:model\\.layers\\.\\d+\\.self_attn", "heads": 0.5},
        ]
    }
    sgm = fxs.sparsify_graph(model, spec, example_kwargs=kwargs)
    sgm.step()
    with torch.no_grad():
        masked = sgm(**kwargs).logits
    assert sgm.squash_into(model, shrink=True) is model
    config = model.config
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
        32,
        2,
        1,
        8,
    )
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
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
        )
    ).eval()
    sgm = fxs.sparsify_graph(
        bert, {"channels": [{"target": "encoder.layer.0.attention.self", "heads": 0.5}]}, example_kwargs=kwargs
    )
    sgm.step()
    with pytest.raises(ValueError, match="head_dim"):
        sgm.squash_into(bert, shrink=True)


def test_gpt2_conv1d_mlp_channels_shrink() -> None:
    ids = torch.randint(1, 100, (2, 7))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    ).eval()
    sgm = fxs.sparsify_graph(
        model,
        {"channels": [{"target": "re:transformer\\.h\\.\\d+\\.mlp\\.c_fc", "sparsity": 0.5}]},
        example_kwargs=kwargs,
    )
    sgm.step()
    small = sgm.squash(shrink=True)
    with torch.no_grad():
        torch.testing.assert_close(small(**kwargs).logits, sgm(**kwargs).logits, atol=1e-5, rtol=1e-5)
    assert small.state_dict()["transformer.h.0.mlp.c_fc.weight"].shape == (32, 64)  # Conv1D: (in, out)
    assert small.state_dict()["transformer.h.0.mlp.c_proj.weight"].shape == (64, 32)


def _encoder_decoder(arch: str) -> tuple[Any, dict[str, Any], str, str]:
    """A tiny ``arch`` model, its inputs, and the patterns of its encoder / decoder FFN input layers."""
    ids = torch.randint(1, 100, (2, 7))
    if arch == "t5":
        model = transformers.T5ForConditionalGeneration(
            transformers.T5Config(
                vocab_size=100,
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_decoder_layers=3,
                num_heads=4,
                decoder_start_token_id=0,
                pad_token_id=0,
            )
        )
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": ids[:, :5]}
        enc = "re:encoder\\.block\\.\\d+\\.layer\\.1\\.DenseReluDense\\.wi"
        dec = "re:decoder\\.block\\.\\d+\\.layer\\.2\\.DenseReluDense\\.wi"
    else:
        model = transformers.WhisperForConditionalGeneration(
            transformers.WhisperConfig(
                vocab_size=100,
                num_mel_bins=8,
                d_model=32,
                encoder_layers=2,
                decoder_layers=3,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                max_source_positions=10,
                max_target_positions=16,
                pad_token_id=0,
                bos_token_id=0,
                eos_token_id=0,
                decoder_start_token_id=0,
            )
        )
        kwargs = {"input_features": torch.randn(2, 8, 20), "decoder_input_ids": ids[:, :5]}
        enc, dec = "re:model\\.encoder\\.layers\\.\\d+\\.fc1", "re:model\\.decoder\\.layers\\.\\d+\\.fc1"
    return model.eval(), {**kwargs, "use_cache": False}, enc, dec


@pytest.mark.parametrize("arch", ["gpt2", "opt", "t5", "whisper"])
def test_squash_into_shrink_resizes_each_family_ffn_field_and_reloads(arch: str, tmp_path: Any) -> None:
    ids = torch.randint(1, 100, (2, 7))
    if arch == "gpt2":  # n_inner=None: the MLP is 4 * n_embd wide
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
        ).eval()
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
        rules = [{"target": "re:transformer\\.h\\.\\d+\\.mlp\\.c_fc", "sparsity": 0.5}]
        fields = {"n_inner": 64}
    elif arch == "opt":
        model = transformers.OPTForCausalLM(
            transformers.OPTConfig(
                vocab_size=100,
                hidden_size=32,
                num_hidden_layers=2,
                ffn_dim=64,
                num_attention_heads=4,
                word_embed_proj_dim=32,
                max_position_embeddings=32,
                pad_token_id=1,
                bos_token_id=0,
                eos_token_id=0,
            )
        ).eval()
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
        rules = [{"target": "re:model\\.decoder\\.layers\\.\\d+\\.fc1", "sparsity": 0.5}]
        fields = {"ffn_dim": 32}
    else:  # encoder and decoder FFNs; Whisper has one field per stack, T5 one d_ff for both
        model, kwargs, enc, dec = _encoder_decoder(arch)
        sparsity = {"t5": (0.5, 0.5), "whisper": (0.5, 0.25)}[arch]
        rules = [{"target": enc, "sparsity": sparsity[0]}, {"target": dec, "sparsity": sparsity[1]}]
        fields = {"d_ff": 32} if arch == "t5" else {"encoder_ffn_dim": 32, "decoder_ffn_dim": 48}
    sgm = fxs.sparsify_graph(model, {"channels": rules}, example_kwargs=kwargs)
    sgm.step()
    small = sgm.squash(shrink=True)
    fresh = type(model)(copy.deepcopy(model.config)).eval()  # the same config, other random weights
    assert sgm.squash_into(fresh, shrink=True) is fresh
    assert {k: getattr(fresh.config, k) for k in fields} == fields
    with torch.no_grad():
        expected = small(**kwargs).logits
        torch.testing.assert_close(fresh(**kwargs).logits, expected, atol=1e-5, rtol=1e-5)
        fresh.save_pretrained(tmp_path)
        reloaded = type(model).from_pretrained(tmp_path).eval()
        assert {k: getattr(reloaded.config, k) for k in fields} == fields
        torch.testing.assert_close(reloaded(**kwargs).logits, expected, atol=1e-5, rtol=1e-5)


def test_squash_into_shrink_refuses_a_shared_encoder_decoder_field_it_cannot_fill() -> None:
    model, kwargs, enc, dec = _encoder_decoder("t5")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        (
            [{"target": enc, "sparsity": 0.5}, {"target": dec, "sparsity": 0.25}],
            "d_ff is one T5Config field for both the encoder and the decoder layers, which would get 32 and 48",
        ),
        (
            [{"target": enc, "sparsity": 0.5}],  # the decoder's FFNs keep 64
            "d_ff would differ between layers \\(the 3 decoder layers \\(num_decoder_layers\\) keep 64\\)",
        ),
        (
            [
                {"target": "encoder.block.0.layer.1.DenseReluDense.wi", "sparsity": 0.5},
                {"target": dec, "sparsity": 0.5},
            ],
            "d_ff would differ between layers \\(1 of the 2 encoder layers \\(num_layers\\) get \\[32\\], "
            "the others keep 64",
        ),
    ]
    for rules, message in cases:
        sgm = fxs.sparsify_graph(model, {"channels": rules}, example_kwargs=kwargs)
        sgm.step()
        with pytest.raises(ValueError, match=message):
            sgm.squash_into(model, shrink=True)
        assert model.config.d_ff == 64
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing changed


def test_squash_into_shrink_refuses_heads_of_an_encoder_decoder_model() -> None:
    # T5's num_heads sizes the encoder's and the decoder's attention: pruning the one encoder layer's heads
    # used to set num_heads=2, and from_pretrained then failed on the decoder's 4-head weights
    ids = torch.randint(1, 100, (2, 7))
    model = transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=100,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
    ).eval()
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "decoder_input_ids": ids[:, :5],
        "use_cache": False,
    }
    sgm = fxs.sparsify_graph(
        model, {"channels": [{"target": "encoder.block.0.layer.0.SelfAttention", "heads": 0.5}]}, example_kwargs=kwargs
    )
    sgm.step()
    with pytest.raises(ValueError, match="encoder-decoder model whose T5Config head count.*FFN channels only"):
        sgm.squash_into(model, shrink=True)
    assert model.config.num_heads == 4 and model.encoder.block[0].layer[0].SelfAttention.q.out_features == 32
