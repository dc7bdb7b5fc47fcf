"""``"method": "sparsegpt"`` through the pipeline: Hessian observers, step, report, squash (SPEC §16)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import fx_sparsify as fxs
from fx_sparsify.hessian import HessianObserver
from fx_sparsify.methods.sparsegpt import sparsegpt_prune
from tests.models import MLP, SmallCNN, TiedLM, transformer_encoder

SPEC = {
    "weights": [
        {"target": "type:Linear", "method": "sparsegpt", "sparsity": 0.5, "block_size": 8},
        {"target": "head", "method": "dense"},
    ]
}


class SharedInput(nn.Module):
    """Three projections of one input (like q, k, v), then one on their sum."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.o = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.q(x) * self.k(x)) + self.v(x))


def _observers(gm: nn.Module) -> list[str]:
    return [name for name, m in gm.named_modules() if isinstance(m, HessianObserver)]


def test_step_equals_the_algorithm_on_the_accumulated_inputs_of_uneven_3d_batches() -> None:
    model = MLP()
    sgm = fxs.sparsify_graph(model, SPEC)
    data = [torch.randn(3, 5, 16), torch.randn(2, 7, 16)]
    for x in data:
        sgm(x)
    sgm.step()
    x1 = torch.cat([x.reshape(-1, 16) for x in data])
    x2 = torch.relu(model.fc1(x1)).detach()  # one pass: fc2's inputs come from the dense fc1
    for layer, x in (("fc1", x1), ("fc2", x2)):
        keep, weight = sparsegpt_prune(getattr(model, layer).weight, x.T @ x, sparsity=0.5, block_size=8)
        assert torch.equal(sgm.masks()[f"{layer}.weight"], keep)
        torch.testing.assert_close(sgm.get_parameter(f"{layer}.weight"), weight)
    assert torch.equal(sgm.get_parameter("head.weight"), model.head.weight)  # the dense head is untouched
    assert sgm.sparsity()["fc1.weight"] == 0.5
    assert "sparsegpt(block_size=8) reconstructed" in sgm.report()


def test_reconstruction_lowers_the_output_error_versus_magnitude_masks() -> None:
    model = MLP(d_in=32, hidden=64)
    scale = torch.exp(torch.randn(32))  # outlier input features, as in language models
    data = [torch.randn(64, 32) * scale for _ in range(4)]
    held = torch.randn(256, 32) * scale
    sgm = fxs.sparsify_graph(model, SPEC)
    mag = fxs.sparsify_graph(
        model,
        {
            "weights": [
                {"target": "fc1", "method": "l1_unstructured", "sparsity": 0.5},
                {"target": "fc2", "method": "l1_unstructured", "sparsity": 0.5},
            ]
        },
    )
    for x in data:
        sgm(x)
    sgm.step()
    mag.step()
    with torch.no_grad():
        dense = model(held)
        assert (sgm(held) - dense).norm() < 0.7 * (mag(held) - dense).norm()


def test_layers_reading_one_input_share_one_hessian() -> None:
    sgm = fxs.sparsify_graph(
        SharedInput(), {"weights": [{"target": "type:Linear", "method": "sparsegpt", "n": 2, "m": 4}]}
    )
    assert len(_observers(sgm)) == 2  # q, k, v share one; o has its own
    sgm(torch.randn(8, 16))
    sgm.step()
    for name in ("q.weight", "k.weight", "v.weight", "o.weight"):
        assert torch.all(sgm.masks()[name].reshape(-1, 4).sum(-1) == 2)


def test_step_without_calibration_is_an_error_naming_the_targets_and_changes_nothing() -> None:
    sgm = fxs.sparsify_graph(MLP(), SPEC)
    before = sgm.get_parameter("fc1.weight").clone()
    with pytest.raises(ValueError, match=r"'fc1.weight', 'fc2.weight' saw no calibration forward"):
        sgm.step()
    assert torch.equal(sgm.get_parameter("fc1.weight"), before) and sgm._fxs.steps == 0
    sgm(torch.randn(4, 16))
    sgm.step()
    with pytest.raises(ValueError, match="since the last step"):  # statistics restart after each step
        sgm.step()
    assert sgm._fxs.steps == 1
    assert not torch.equal(sgm.get_parameter("fc1.weight"), before)


@pytest.mark.parametrize(
    "model,target,match",
    [
        (SmallCNN(), "type:Conv2d", r"'blocks.0.dw.weight': a Conv2d .* has groups=64"),
        (SmallCNN(), "reflect", r"'reflect.weight': a Conv2d .* has padding_mode='reflect'"),
        (TiedLM(), "emb", r"'emb.weight' \(Embedding\) is not the weight of either"),
        (MLP(), "fc1.bias", r"'fc1.bias' \(not a layer's weight\)"),
    ],
)
def test_non_linear_targets_are_an_error_naming_the_layer(model: nn.Module, target: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fxs.sparsify_graph(model, {"weights": [{"target": target, "method": "sparsegpt", "sparsity": 0.5}]})


@pytest.mark.parametrize(
    "spec,match",
    [
        (
            {"global": [{"targets": ["fc1", "fc2"], "method": "sparsegpt", "sparsity": 0.5}]},
            "cannot rank layers together",
        ),
        ({"weights": [{"target": "fc1", "method": "sparsegpt", "sparsity": 0.5, "scores": "wanda"}]}, "drop 'scores'"),
        (
            {"weights": [{"target": "fc1", "method": "sparsegpt", "sparsity": 0.5, "gradient": "supermask"}]},
            "gradient 'mask'",
        ),
        (
            {"weights": [{"target": "fc1", "method": "sparsegpt", "n": 3, "m": 5, "block_size": 5}]},
            "not divisible by m=5",
        ),
    ],
)
def test_rules_sparsegpt_cannot_follow_are_refused(spec: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fxs.sparsify_graph(MLP(), spec)


def test_schedule_moves_the_sparsity_and_pruned_weights_stay_pruned() -> None:
    spec = {
        "weights": [
            {
                "target": "fc2",
                "method": "sparsegpt",
                "sparsity": 0.75,
                "schedule": {"kind": "linear", "start": 0.25, "end": 0.75, "steps": 2},
            }
        ]
    }
    sgm = fxs.sparsify_graph(MLP(), spec)
    previous = None
    for expected in (0.25, 0.5, 0.75):
        for _ in range(2):
            sgm(torch.randn(16, 16))
        sgm.step()
        keep = sgm.masks()["fc2.weight"]
        assert sgm.sparsity()["fc2.weight"] == expected
        assert previous is None or not torch.any(keep & ~previous)
        previous = keep


def test_fine_tuning_after_the_step_keeps_pruned_weights_at_zero_and_squash_matches() -> None:
    sgm = fxs.sparsify_graph(MLP(), {"weights": [{"target": "type:Linear", "method": "sparsegpt", "n": 2, "m": 4}]})
    sgm(torch.randn(32, 16))
    sgm.step()
    keep = sgm.masks()
    opt = torch.optim.SGD(sgm.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        sgm(torch.randn(8, 16)).square().mean().backward()
        opt.step()
    x = torch.randn(5, 16)
    squashed = sgm.squash()
    assert not _observers(squashed)
    torch.testing.assert_close(squashed(x), sgm(x))
    for name, k in keep.items():
        assert torch.all(squashed.get_parameter(name)[~k] == 0)
    restored = MLP()
    restored.load_state_dict(squashed.state_dict())
    torch.testing.assert_close(restored(x), sgm(x))


def test_export_capture_and_deepcopy() -> None:
    model = transformer_encoder()
    x = torch.randn(2, 5, 16)
    spec = {"weights": [{"target": "re:layers\\.\\d+\\.linear\\d", "method": "sparsegpt", "n": 2, "m": 4}]}
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(x,), capture="export")
    copied = copy.deepcopy(sgm)
    for gm in (sgm, copied):
        gm(x)
        gm.step()
    assert sgm.sparsity() == {name: 0.5 for name in sgm.sparsity()} and len(sgm.sparsity()) == 4
    for name, keep in sgm.masks().items():
        assert torch.equal(copied.masks()[name], keep)
        torch.testing.assert_close(copied.get_parameter(name), sgm.get_parameter(name))
    torch.testing.assert_close(sgm.squash()(x), sgm(x))


def test_float64_hessian_option() -> None:
    spec = {"weights": [{"target": "fc1", "method": "sparsegpt", "sparsity": 0.5, "hessian_dtype": "float64"}]}
    sgm = fxs.sparsify_graph(MLP(), spec)
    sgm(torch.randn(8, 16))
    (name,) = _observers(sgm)
    assert sgm.get_submodule(name).stat.dtype == torch.float64
    sgm.step()
    assert sgm.get_parameter("fc1.weight").dtype == torch.float32


def test_calibration_statistics_round_trip_through_state_dict_and_pickle() -> None:
    import pickle

    model = MLP()
    sgm = fxs.sparsify_graph(model, SPEC)
    sgm(torch.randn(8, 16))
    fresh = fxs.sparsify_graph(model, SPEC)
    fresh.load_state_dict(sgm.state_dict())
    unpickled = pickle.loads(pickle.dumps(sgm))
    for gm in (sgm, fresh, unpickled):
        gm.step()
    for name, keep in sgm.masks().items():
        assert torch.equal(fresh.masks()[name], keep) and torch.equal(unpickled.masks()[name], keep)
        assert torch.equal(fresh.get_parameter(name), sgm.get_parameter(name))


SEQUENTIAL = {
    "weights": [
        {"target": "type:Linear", "method": "sparsegpt", "sparsity": 0.5, "block_size": 8, "sequential": True},
        {"target": "head", "method": "dense"},
    ]
}


def test_sequential_calibrates_each_layer_on_the_pruned_layers_before_it() -> None:
    model = MLP()
    sgm = fxs.sparsify_graph(model, SEQUENTIAL)
    data = [torch.randn(6, 16), torch.randn(10, 16)]
    for x in data:
        sgm(x)
    sgm.step()
    x1 = torch.cat(data)
    keep1, w1 = sparsegpt_prune(model.fc1.weight, x1.T @ x1, sparsity=0.5, block_size=8)
    x2 = torch.relu(torch.nn.functional.linear(x1, w1, model.fc1.bias)).detach()  # fc1 already pruned
    keep2, w2 = sparsegpt_prune(model.fc2.weight, x2.T @ x2, sparsity=0.5, block_size=8)
    torch.testing.assert_close(sgm.get_parameter("fc1.weight"), w1)
    torch.testing.assert_close(sgm.get_parameter("fc2.weight"), w2)
    assert torch.equal(sgm.masks()["fc2.weight"], keep2)
    assert sgm._fxs.calibration.inputs is None  # the recorded inputs go with the statistics
    with pytest.raises(ValueError, match="saw no calibration forward"):
        sgm.step()


def test_sequential_levels_follow_the_graph() -> None:
    from fx_sparsify.passes.reconstruct import _levels

    spec = {"weights": [{"target": "type:Linear", "method": "sparsegpt", "n": 2, "m": 4, "sequential": True}]}
    sgm = fxs.sparsify_graph(SharedInput(), spec)
    levels = _levels(sgm, sgm._fxs, list(sgm._fxs.targets.values()))
    assert [sorted(r.name for r in level) for level in levels] == [["k.weight", "q.weight", "v.weight"], ["o.weight"]]


def _fail_the_second_solve(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``reconstruct.sparsegpt_prune`` made to raise ``ValueError("boom")`` on its second call (the first level
    solves, the second fails); returns the function it replaced."""
    import fx_sparsify.passes.reconstruct as reconstruct

    real = reconstruct.sparsegpt_prune
    calls = []

    def failing_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(reconstruct, "sparsegpt_prune", failing_second)
    return real


def test_a_failing_sequential_step_puts_every_weight_and_mask_back(monkeypatch: pytest.MonkeyPatch) -> None:
    sgm = fxs.sparsify_graph(MLP(), SEQUENTIAL)
    sgm(torch.randn(8, 16))
    before = {k: v.clone() for k, v in sgm.state_dict().items() if isinstance(v, torch.Tensor)}
    _fail_the_second_solve(monkeypatch)
    with pytest.raises(ValueError, match=r"target 'fc2.weight': boom"):
        sgm.step()
    after = sgm.state_dict()
    for key, value in before.items():
        if not key.endswith("stat"):
            assert torch.equal(after[key], value), key
    assert sgm._fxs.steps == 0


def test_without_rollback_a_failing_sequential_step_leaves_the_levels_it_wrote(monkeypatch: pytest.MonkeyPatch) -> None:
    """prune_streamed throws a failed block away, so it steps without the copies that put weights back."""
    import fx_sparsify.passes.reconstruct as reconstruct

    sgm = fxs.sparsify_graph(MLP(), SEQUENTIAL)
    sgm(torch.randn(8, 16))
    before = sgm.get_parameter("fc1.weight").detach().clone()
    real = _fail_the_second_solve(monkeypatch)
    with reconstruct.without_rollback(), pytest.raises(ValueError, match="boom"):
        sgm.step()
    written = sgm.get_parameter("fc1.weight")
    assert not torch.equal(written, before) and float((written == 0).float().mean()) == 0.5  # fc1's level stays
    monkeypatch.setattr(reconstruct, "sparsegpt_prune", real)
    sgm(torch.randn(8, 16))
    with pytest.raises(ValueError, match="boom"):  # outside the context the copies are kept again
        _fail_the_second_solve(monkeypatch)
        sgm.step()
    assert torch.equal(sgm.get_parameter("fc1.weight"), written)


def test_sequential_without_recorded_inputs_is_an_error() -> None:
    model = MLP()
    source = fxs.sparsify_graph(model, SEQUENTIAL)
    source(torch.randn(8, 16))
    fresh = fxs.sparsify_graph(model, SEQUENTIAL)
    fresh.load_state_dict(source.state_dict())  # statistics, but not the inputs that made them
    with pytest.raises(ValueError, match="need the calibration forwards' inputs"):
        fresh.step()
    assert torch.equal(fresh.get_parameter("fc1.weight"), model.fc1.weight)


def test_bfloat16_model_sums_in_float64_solves_in_float32_and_keeps_its_dtype() -> None:
    model = MLP().to(torch.bfloat16)
    sgm = fxs.sparsify_graph(model, {"weights": [{"target": "fc1", "method": "sparsegpt", "n": 2, "m": 4}]})
    sgm(torch.randn(8, 16, dtype=torch.bfloat16))
    sgm.to(torch.bfloat16)  # casting the module mid-calibration does not break the accumulation
    sgm(torch.randn(8, 16, dtype=torch.bfloat16))
    (name,) = _observers(sgm)
    assert sgm.get_submodule(name).stat.dtype == torch.float64  # the sum over batches
    assert sgm.get_submodule(name).hessian().dtype == torch.float32  # rounded once, for the solve
    sgm.step()
    weight = sgm.get_parameter("fc1.weight")
    assert weight.dtype == torch.bfloat16 and torch.all(weight.reshape(-1, 4).count_nonzero(-1) <= 2)


def test_sequential_calibration_fills_only_the_first_levels_statistics() -> None:
    sgm = fxs.sparsify_graph(MLP(), SEQUENTIAL, example_inputs=(torch.randn(2, 16),))
    sgm(torch.randn(8, 16))
    stats = {name: sgm.get_submodule(name).stat.numel() for name in _observers(sgm)}
    assert stats == {"fc1_input_hessian_observer": 16 * 16, "fc2_input_hessian_observer": 0}
    sgm.step()  # fc2's statistic comes from re-running the input with fc1 pruned
    assert sgm.sparsity() == {"fc1.weight": 0.5, "fc2.weight": 0.5}
    sgm(torch.randn(8, 16))  # the next round works the same way
    sgm.step()
    assert sgm._fxs.steps == 2


def test_conv2d_is_reconstructed_from_its_unfolded_input() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1, dilation=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
    spec = {"weights": [{"target": "type:Conv2d", "method": "sparsegpt", "n": 2, "m": 4, "block_size": 12}]}
    sgm = fxs.sparsify_graph(model, spec)
    data = [torch.randn(2, 4, 9, 9), torch.randn(3, 4, 9, 9)]
    for x in data:
        sgm(x)
    sgm.step()
    patches = torch.cat(
        [torch.nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 36) for x in data]
    )
    keep, weight = sparsegpt_prune(model[0].weight, patches.T @ patches, n=2, m=4, block_size=12)
    assert keep.shape == (8, 4, 3, 3) and torch.equal(sgm.masks()["0.weight"], keep)
    torch.testing.assert_close(sgm.get_parameter("0.weight"), weight)
    assert torch.all(sgm.masks()["2.weight"].reshape(8, -1, 4).sum(-1) == 2)
    held = torch.randn(4, 4, 9, 9)
    masked_only = copy.deepcopy(model)  # the same masks without the weight update
    with torch.no_grad():
        for i in (0, 2):
            masked_only[i].weight.mul_(sgm.masks()[f"{i}.weight"])
        dense = model(held)
        assert (sgm(held) - dense).norm() < (masked_only(held) - dense).norm()
    torch.testing.assert_close(sgm.squash()(held), sgm(held))


def test_one_pass_hessians_that_would_not_fit_warn_at_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Together over half the free memory: a warning at sparsify_graph naming the size and "sequential", rather
    than an out-of-memory kill in the middle of calibration. Shared observers count once; sequential rules
    (which hold one level at a time) and plenty of memory do not warn."""
    import warnings

    from fx_sparsify.passes import insert_hessian_observers as passes_hessian

    one_shared = 16 * 16 * 8  # q, k, v read one input: one 16x16 Hessian (float64 sums); o reads another
    monkeypatch.setattr(passes_hessian, "_available_bytes", lambda device: 2 * (one_shared * 2) - 2)
    spec = {"weights": [{"target": "type:Linear", "method": "sparsegpt", "sparsity": 0.5}]}
    with pytest.warns(
        UserWarning, match=r"the 2 Hessians of the one-pass layers take .* on cpu .* \"sequential\": true"
    ) as w:
        fxs.sparsify_graph(SharedInput(), spec)
    assert w[0].filename == __file__  # at the user's call
    monkeypatch.setattr(passes_hessian, "_available_bytes", lambda device: 2 * (one_shared * 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxs.sparsify_graph(SharedInput(), spec)  # exactly half the free memory: fine
        monkeypatch.setattr(passes_hessian, "_available_bytes", lambda device: 1)
        sequential = {"weights": [{**spec["weights"][0], "sequential": True}]}
        fxs.sparsify_graph(SharedInput(), sequential)


def test_free_memory_is_read_from_the_os() -> None:
    from fx_sparsify.passes.insert_hessian_observers import _available_bytes

    free = _available_bytes(torch.device("cpu"))
    assert free is None or free > 0
    assert _available_bytes(torch.device("meta")) is None
