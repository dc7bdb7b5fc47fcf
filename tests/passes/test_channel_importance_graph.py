"""Calibrated channel importance and consumer refit in sparse modules (passes/channels/importance.py).

Each model kind (MLP, gated MLP, attention heads under GQA, a CNN, Hugging Face LLaMA, GPT-2 Conv1D,
BERT): the step refits the consumers, the masked module equals the shrunk one, and reconstruction
lowers the output error on the calibration data. The refit is checked against torch.linalg.lstsq of
the consumer's calibration inputs; the activation ranking against FLAP's formula.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fx_sparsify as fxs

from _channel_models import MLP, Block

torch.manual_seed(0)


class GatedMLP(nn.Module):
    """LLaMA's feed-forward: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, dim: int = 16, hidden: int = 48) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(F.relu(self.c1(x)))


def _calibrate(sgm: nn.Module, batches: list[Any]) -> None:
    with torch.no_grad():
        for b in batches:
            sgm(*b) if isinstance(b, tuple) else sgm(b)


def _error(a: nn.Module, b: nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float((a(x) - b(x)).square().mean()) for x in batches)


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], dict[str, Any]]] = {
    "mlp": (MLP, lambda: torch.randn(32, 20), {"target": "fc1", "sparsity": 0.5}),
    "gated": (GatedMLP, lambda: torch.randn(32, 16), {"target": "up", "sparsity": 0.5}),
    "heads-gqa": (lambda: Block(heads=4, kv=2), lambda: torch.randn(4, 6, 32), {"target": "attn", "heads": 2}),
    "heads": (lambda: Block(heads=4, kv=4), lambda: torch.randn(4, 6, 32), {"target": "attn", "heads": 1}),
    "cnn": (ConvNet, lambda: torch.randn(4, 3, 8, 8), {"target": "c1", "sparsity": 0.5}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reconstruct_lowers_the_error_and_shrinks_exactly(case: str) -> None:
    build, data, rule = CASES[case]
    torch.manual_seed(1)
    model = build().eval()
    batches = [data() for _ in range(6)]
    errors = {}
    for importance in ("magnitude", "activation", "obs"):
        for reconstruct in (False, True):
            spec = {"channels": [{**rule, "importance": importance, "reconstruct": reconstruct, "round_to": 1}]}
            sgm = fxs.sparsify_graph(model, spec, example_inputs=(batches[0],))
            _calibrate(sgm, batches)
            sgm.step()
            small = sgm.squash(shrink=True)
            with torch.no_grad():
                assert float((small(batches[0]) - sgm(batches[0])).abs().max()) <= 1e-4
            assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
            errors[importance, reconstruct] = _error(sgm, model, batches)
            if reconstruct:
                assert "reconstructed" in sgm.report()
    for importance in ("magnitude", "activation", "obs"):
        assert errors[importance, True] < errors[importance, False], errors
    assert errors["obs", True] <= errors["magnitude", True] * 1.0001, errors


class TwoReaders(nn.Module):
    """fc1's channels are read by two layers (and a residual add of their outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.a = nn.Linear(32, 12)
        self.b = nn.Linear(32, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        return x + self.a(h) + torch.tanh(self.b(h))


def test_a_group_with_two_consumers_refits_both() -> None:
    torch.manual_seed(4)
    model = TwoReaders().eval()
    batches = [torch.randn(32, 12) for _ in range(3)]
    errors = {}
    for reconstruct in (False, True):
        spec = {
            "channels": [
                {"target": "fc1", "sparsity": 0.5, "round_to": 1, "importance": "obs", "reconstruct": reconstruct}
            ]
        }
        sgm = fxs.sparsify_graph(model, spec, example_inputs=(batches[0],))
        _calibrate(sgm, batches)
        sgm.step()
        small = sgm.squash(shrink=True)
        with torch.no_grad():
            assert float((small(batches[0]) - sgm(batches[0])).abs().max()) <= 1e-4
        errors[reconstruct] = _error(sgm, model, batches)
    assert errors[True] < errors[False]
    rows = [line for line in sgm.report().splitlines() if "reconstructed" in line]
    assert any(line.startswith("| a.weight") for line in rows) and any(line.startswith("| b.weight") for line in rows)


def test_report_says_when_no_bias_took_the_mean() -> None:
    """A consumer without a bias (LLaMA's down projection) is refit without one, and the report says so."""
    batches = [torch.randn(16, 16) for _ in range(2)]
    spec = {"channels": [{"target": "up", "sparsity": 0.5, "importance": "obs", "reconstruct": True}]}
    sgm = fxs.sparsify_graph(GatedMLP(), spec, example_inputs=(batches[0],))
    _calibrate(sgm, batches)
    sgm.step()
    line = next(line for line in sgm.report().splitlines() if line.startswith("| down.weight"))
    assert "reconstructed (no bias" in line
    spec = {"channels": [{"target": "fc1", "sparsity": 0.5, "importance": "obs", "reconstruct": True}]}
    sgm = fxs.sparsify_graph(MLP(), spec, example_inputs=(torch.randn(2, 20),))
    _calibrate(sgm, [torch.randn(16, 20)])
    sgm.step()
    assert "reconstructed" in sgm.report() and "no bias" not in sgm.report()


@pytest.mark.parametrize("importance", ["obs", "activation"])
def test_global_calibrated_rule_prunes_the_exact_total(importance: str) -> None:
    model = nn.Sequential(nn.Linear(8, 40), nn.GELU(), nn.Linear(40, 24), nn.GELU(), nn.Linear(24, 4)).eval()
    batches = [torch.randn(32, 8) for _ in range(3)]
    spec = {
        "channels": [
            {
                "target": r"re:[02]$",
                "sparsity": 0.5,
                "global": True,
                "round_to": 1,
                "importance": importance,
                "reconstruct": True,
            }
        ]
    }
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(batches[0],))
    _calibrate(sgm, batches)
    sgm.step()
    kept = [int(sgm.masks()[f"{i}.bias"].sum()) for i in (0, 2)]
    assert sum(kept) == 32 and all(k >= 1 for k in kept), kept
    small = sgm.squash(shrink=True)
    with torch.no_grad():
        assert float((small(batches[0]) - sgm(batches[0])).abs().max()) <= 1e-4


def test_refit_equals_least_squares_on_the_calibration_inputs() -> None:
    model = MLP().eval()
    batches = [torch.randn(64, 20) for _ in range(3)]
    spec = {
        "channels": [
            {
                "target": "fc1",
                "sparsity": 0.5,
                "round_to": 1,
                "importance": "activation",
                "reconstruct": True,
                "damp": 0.0,
            }
        ]
    }
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(batches[0],))
    _calibrate(sgm, batches)
    sgm.step()
    keep = sgm.masks()["fc1.bias"].bool()
    with torch.no_grad():
        x = torch.cat([F.gelu(model.fc1(b)) for b in batches]).double()
        y = x @ model.fc2.weight.double().T + model.fc2.bias.double()
        a = torch.cat([x[:, keep], torch.ones(len(x), 1, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(a, y).solution
    torch.testing.assert_close(sgm.fc2.weight[:, keep].double(), sol[:-1].T, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(sgm.fc2.bias.double(), sol[-1], atol=2e-4, rtol=1e-3)
    assert model.fc2.weight.data_ptr() != sgm.fc2.weight.data_ptr()  # the user's model is untouched


def test_activation_importance_keeps_flap_top_channels() -> None:
    model = MLP().eval()
    batches = [torch.randn(64, 20) * torch.linspace(0.1, 3, 20) for _ in range(3)]
    spec = {"channels": [{"target": "fc1", "sparsity": 0.25, "round_to": 1, "importance": "activation"}]}
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(batches[0],))
    _calibrate(sgm, batches)
    sgm.step()
    with torch.no_grad():
        h = torch.cat([F.gelu(model.fc1(b)) for b in batches]).double()
        fluct = h.var(0, unbiased=False) * model.fc2.weight.double().square().sum(0)
    expected = torch.zeros(64, dtype=torch.bool)
    expected[torch.argsort(fluct, descending=True)[:48]] = True
    assert torch.equal(sgm.masks()["fc1.bias"].bool(), expected)


def test_reconstruct_without_calibration_names_the_consumers() -> None:
    spec = {"channels": [{"target": "fc1", "sparsity": 0.5, "reconstruct": True}]}
    sgm = fxs.sparsify_graph(MLP(), spec, example_inputs=(torch.randn(2, 20),))
    with pytest.raises(ValueError, match="calibration.*'fc2'"):
        sgm.step()
    spec = {"channels": [{"target": "fc1", "sparsity": 0.5, "importance": "obs"}]}
    sgm = fxs.sparsify_graph(MLP(), spec, example_inputs=(torch.randn(2, 20),))
    with pytest.raises(ValueError, match="rule 'fc1': 'fc2'"):
        sgm.step()


def test_misspelt_importance_and_bad_options() -> None:
    with pytest.raises(KeyError, match="Did you mean 'activation'"):
        fxs.sparsify_graph(MLP(), {"channels": [{"target": "fc1", "sparsity": 0.5, "importance": "activaton"}]})
    with pytest.raises(TypeError, match="reconstruct"):
        fxs.SparsitySpec.from_dict({"channels": [{"target": "fc1", "sparsity": 0.5, "reconstruct": "yes"}]})
    with pytest.raises(ValueError, match="damp"):
        fxs.SparsitySpec.from_dict({"channels": [{"target": "fc1", "sparsity": 0.5, "damp": -1}]})


def test_registered_importance_is_used() -> None:
    @fxs.register_channel_importance("test-last-channels", override=True)
    def last(group: Any) -> torch.Tensor:
        return torch.arange(group.units, dtype=torch.float64)  # keeps the highest indices

    spec = {"channels": [{"target": "fc1", "sparsity": 0.5, "round_to": 1, "importance": "test-last-channels"}]}
    sgm = fxs.sparsify_graph(MLP(), spec, example_inputs=(torch.randn(2, 20),))
    _calibrate(sgm, [torch.randn(8, 20)])
    sgm.step()
    assert torch.equal(sgm.masks()["fc1.bias"].bool(), torch.arange(64) >= 32)


def test_sequential_reconstructs_block_after_block_and_exports() -> None:
    model = nn.Sequential(MLP(), nn.Linear(5, 64), nn.GELU(), nn.Linear(64, 5)).eval()
    batches = [torch.randn(32, 20) for _ in range(4)]
    errors = {}
    for sequential in (False, True):
        spec = {
            "channels": [
                {
                    "target": r"re:(0\.fc1|1)$",
                    "sparsity": 0.5,
                    "round_to": 1,
                    "importance": "obs",
                    "reconstruct": True,
                    "sequential": sequential,
                }
            ]
        }
        sgm = fxs.sparsify_graph(model, spec, example_inputs=(batches[0],))
        _calibrate(sgm, batches)
        sgm.step()
        small = sgm.squash(shrink=True)
        with torch.no_grad():
            assert float((small(batches[0]) - sgm(batches[0])).abs().max()) <= 1e-4
        errors[sequential] = _error(sgm, model, batches)
    assert errors[True] <= errors[False] * 1.05, errors
    exported = torch.export.export(small, (batches[0],))
    torch.testing.assert_close(exported.module()(batches[1]), small(batches[1]))


def test_sequential_refit_aims_at_the_calibration_outputs() -> None:
    """The second group's consumer is refit on its inputs through the pruned first group, towards the outputs it
    gave in the calibration forwards: lstsq of the dense layer's outputs on the replayed inputs' kept columns."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(20, 32), nn.GELU(), nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16)).eval()
    batches = [torch.randn(64, 20) for _ in range(3)]
    spec = {
        "channels": [
            {
                "target": r"re:[02]$",
                "sparsity": 0.5,
                "round_to": 1,
                "importance": "activation",
                "reconstruct": True,
                "sequential": True,
                "damp": 0.0,
            }
        ]
    }
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(batches[0],))
    _calibrate(sgm, batches)
    sgm.step()
    p, m = dict(sgm.named_parameters()), sgm.masks()
    w = {k: p[k] * m[k] if k in m else p[k] for k in p}
    with torch.no_grad():
        x = torch.cat(batches)
        h = F.gelu(F.linear(x, w["0.weight"], w["0.bias"]))
        x_new = F.gelu(F.linear(h, w["2.weight"], w["2.bias"])).double()
        y = model(x).double()
    keep = m["2.bias"].bool()
    a = torch.cat([x_new[:, keep], torch.ones(len(x), 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(a, y).solution
    torch.testing.assert_close(p["4.weight"][:, keep].double(), sol[:-1].T, atol=5e-4, rtol=1e-3)
    torch.testing.assert_close(p["4.bias"].double(), sol[-1], atol=5e-4, rtol=1e-3)
    assert all(not o.kept for o in sgm.modules() if hasattr(o, "kept"))  # the kept rows go with the step


def test_a_second_step_uses_the_new_calibration() -> None:
    spec = {"channels": [{"target": "fc1", "sparsity": 0.25, "round_to": 1, "importance": "obs", "reconstruct": True}]}
    sgm = fxs.sparsify_graph(MLP(), spec, example_inputs=(torch.randn(2, 20),))
    _calibrate(sgm, [torch.randn(32, 20)])
    sgm.step()
    with pytest.raises(ValueError, match="calibration"):
        sgm.step()  # statistics restart after each step
    _calibrate(sgm, [torch.randn(32, 20)])
    sgm.step()
    assert int(sgm.masks()["fc1.bias"].sum()) == 48


transformers = pytest.importorskip("transformers")


def _hf(arch: str) -> tuple[nn.Module, dict[str, Any], list[dict[str, Any]]]:
    ids = [torch.randint(1, 100, (2, 9)) for _ in range(4)]
    if arch == "llama":
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
        rules = [
            {"target": r"re:model\.layers\.\d+\.mlp\.up_proj", "sparsity": 0.5},
            {"target": r"re:model\.layers\.\d+\.self_attn", "heads": 2},
        ]
    elif arch == "gpt2":
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
        )
        rules = [{"target": r"re:transformer\.h\.\d+\.mlp\.c_fc", "sparsity": 0.5}]
    else:
        model = transformers.BertModel(
            transformers.BertConfig(
                vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
            )
        )
        rules = [
            {"target": r"re:encoder\.layer\.\d+\.intermediate\.dense", "sparsity": 0.5},
            {"target": r"re:encoder\.layer\.\d+\.attention\.self", "heads": 2},
        ]
    kwargs = [
        {"input_ids": i, "attention_mask": torch.ones_like(i)} | ({} if arch == "bert" else {"use_cache": False})
        for i in ids
    ]
    spec = {"channels": [{**r, "importance": "obs", "reconstruct": True} for r in rules]}
    return model.eval(), spec, kwargs


def _out(o: Any) -> torch.Tensor:
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _step_and_beat_magnitude(
    model: nn.Module, sgm: fxs.SparseGraphModule, rules: list[dict[str, Any]], kwargs: list[dict[str, Any]]
) -> list[torch.Tensor]:
    """Steps the calibrated ``sgm`` and the same channel ``rules`` by magnitude without reconstruction: ``sgm``'s
    outputs are closer to the dense model's over the batches, and its shrunk model equals the masked one.
    Returns ``sgm``'s masked outputs."""
    plain = fxs.sparsify_graph(
        model,
        {"channels": [{**r, "importance": "magnitude", "reconstruct": False} for r in rules]},
        example_kwargs=kwargs[0],
    )
    plain.step()
    sgm.step()
    with torch.no_grad():
        dense = [_out(model(**kw)) for kw in kwargs]
        masked = [_out(sgm(**kw)) for kw in kwargs]
        err = sum(float((m - d).square().mean()) for m, d in zip(masked, dense))
        err_plain = sum(float((_out(plain(**kw)) - d).square().mean()) for kw, d in zip(kwargs, dense))
        assert err < err_plain
        small = sgm.squash(shrink=True)
        assert float((_out(small(**kwargs[0])) - masked[0]).abs().max()) <= 1e-4
    return masked


@pytest.mark.models
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_hugging_face_models(arch: str, tmp_path: Any) -> None:
    model, spec, kwargs = _hf(arch)
    sgm = fxs.sparsify_graph(model, spec, example_kwargs=kwargs[0])
    with torch.no_grad():
        for kw in kwargs:
            sgm(**kw)
    masked = _step_and_beat_magnitude(model, sgm, spec["channels"], kwargs)
    if arch != "llama":
        return
    target = copy.deepcopy(model)
    sgm.squash_into(target, shrink=True)
    config = target.config
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads) == (32, 2, 1)
    with torch.no_grad():
        torch.testing.assert_close(_out(target(**kwargs[0])), masked[0], atol=1e-4, rtol=1e-4)
        target.save_pretrained(tmp_path)
        reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
        assert torch.equal(_out(reloaded(**kwargs[0])), _out(target(**kwargs[0])))


def test_obs_takes_at_most_16_greedy_steps_per_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Structured OBS removes a large group's units in at most 16 blocks (each block's joint error is exact,
    tests/methods): 16 sweeps of the consumer's inverse Hessian cost a fraction of 64, at the same loss."""
    from fx_sparsify.methods import channel_importance as ci

    seen: list[tuple[int, int]] = []

    def spy(group: Any) -> torch.Tensor:
        seen.append((group.pruned, group.block))
        return ci.obs_scores(group)

    monkeypatch.setitem(ci._IMPORTANCES, "obs", (spy, True))  # the registry entry, restored afterwards
    model = nn.Sequential(nn.Linear(8, 512), nn.GELU(), nn.Linear(512, 4)).eval()
    spec = {"channels": [{"target": "0", "sparsity": 0.5, "round_to": 1, "importance": "obs"}]}
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(torch.randn(2, 8),))
    _calibrate(sgm, [torch.randn(64, 8) for _ in range(12)])
    sgm.step()
    assert seen and all(pruned == 256 and -(-pruned // block) <= 16 for pruned, block in seen), seen
    assert int(sgm.masks()["0.bias"].sum()) == 256


@pytest.mark.models
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_hugging_face_models_sequential_aim_at_the_residual_sums(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sequential reconstruct on Hugging Face blocks: every consumer's output reaches a residual add (LLaMA's
    o_proj and down_proj directly, GPT-2's c_proj and BERT's output dense through dropout), so each gets a
    residual observer; the pruned model is closer to the dense one than magnitude pruning, shrunk == masked."""
    from fx_sparsify.passes.channels import importance
    from fx_sparsify.passes.channels.residual import ResidualRowsObserver

    aimed: list[bool] = []
    corrected_weight = importance.corrected_weight

    def spy(c: Any, cross: torch.Tensor, damp: float, residual: torch.Tensor | None = None) -> Any:
        aimed.append(residual is not None)
        return corrected_weight(c, cross, damp, residual)

    monkeypatch.setattr(importance, "corrected_weight", spy)
    model, spec, kwargs = _hf(arch)
    rules = spec["channels"]
    sgm = fxs.sparsify_graph(model, {"channels": [{**r, "sequential": True} for r in rules]}, example_kwargs=kwargs[0])
    consumers = {"llama": 4, "gpt2": 2, "bert": 4}[arch]
    assert sum(isinstance(m, ResidualRowsObserver) for m in sgm.modules()) == consumers
    with torch.no_grad():
        for kw in kwargs:
            sgm(**kw)
    _step_and_beat_magnitude(model, sgm, rules, kwargs)
    assert aimed == [True] * (consumers - 1)  # every group after the first (one consumer each) aims at its add
