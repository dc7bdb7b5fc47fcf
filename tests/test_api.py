from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn

import fx_sparsify as fxs
from fx_sparsify import ops

from helpers import assert_unchanged, check_pipeline, count, snapshot
from models import MLP, Functional, KeywordCall, Recommender, SmallCNN, TiedLM, transformer_encoder

L1 = {"method": "l1_unstructured", "sparsity": 0.5}


def test_all_keep_masks_leave_outputs_identical() -> None:
    model = MLP().eval()
    sgm = fxs.sparsify_graph(model, {"weights": [{"target": "type:Linear", **L1}]})
    x = torch.randn(5, 16)
    torch.testing.assert_close(sgm(x), model(x), rtol=0, atol=0)
    assert all(v == 0.0 for v in sgm.sparsity().values())


def test_masks_equal_torch_prune_l1_unstructured() -> None:
    model = MLP()
    sgm = fxs.sparsify_graph(
        model, {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.37}]}
    )
    sgm.step()
    for name, mod in [("fc1", model.fc1), ("fc2", model.fc2), ("head", model.head)]:
        ref = prune.L1Unstructured(0.37).compute_mask(mod.weight.detach(), torch.ones_like(mod.weight))
        assert torch.equal(sgm.masks()[f"{name}.weight"], ref.bool())


def test_masked_forward_equals_eager_with_masked_weights() -> None:
    model = MLP().eval()
    sgm = fxs.sparsify_graph(
        model,
        {"weights": [{"target": "fc1", **L1}, {"target": "head.weight", "method": "l1_unstructured", "sparsity": 10}]},
    )
    sgm.step()
    eager = copy.deepcopy(model)
    with torch.no_grad():
        eager.fc1.weight.mul_(sgm.masks()["fc1.weight"])
        eager.head.weight.mul_(sgm.masks()["head.weight"])
    x = torch.randn(4, 16)
    torch.testing.assert_close(sgm(x), eager(x))
    assert int((~sgm.masks()["head.weight"]).sum()) == 10  # int sparsity is a count


def test_mlp_pipeline() -> None:
    check_pipeline(MLP(), {"weights": [{"target": "type:Linear", **L1}]}, (torch.randn(3, 16),))


def test_cnn_with_batchnorm_depthwise_and_reflect_padding() -> None:
    sgm = check_pipeline(
        SmallCNN(),
        {"weights": [{"target": "type:Conv2d", **L1}, {"target": "fc", "method": "l1_unstructured", "sparsity": 0.3}]},
        (torch.randn(2, 3, 16, 16),),
    )
    assert "blocks.0.dw.weight" in sgm.masks()  # depthwise conv inside a Sequential
    assert count(sgm, ops.conv_padded) == 1


def test_embedding_and_embedding_bag() -> None:
    sgm = check_pipeline(
        Recommender(),
        {"weights": [{"target": "re:users|items|cat", **L1}, {"target": "top.0", **L1}]},
        Recommender.example_inputs(),
    )
    kinds = {n: r.kind for n, r in sgm._fxs.targets.items()}
    assert kinds == {
        "users.weight": "embedding",
        "items.weight": "embedding",
        "cat.weight": "embedding",
        "top.0.weight": "weight",
    }
    # lookups mask the gathered rows: no full-table multiply for the tables
    assert count(sgm, ops.embedding_bag_masked) == 2 and count(sgm, ops.embedding_masked) == 1
    assert count(sgm, ops.apply_mask) == 1


def test_embedding_bag_padding_idx_and_per_sample_weights_match_eager() -> None:
    bag = nn.EmbeddingBag(20, 4, mode="sum", padding_idx=3)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag = bag

        def forward(self, ids: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return self.bag(ids, offsets, per_sample_weights=w)

    model = M()
    ids = torch.tensor([3, 1, 2, 3, 5, 7, 3])
    offsets = torch.tensor([0, 3, 5])
    w = torch.rand(7)
    sgm = fxs.sparsify_graph(model, {"weights": [{"target": "bag", **L1}]})
    sgm.step()
    eager = copy.deepcopy(model)
    with torch.no_grad():
        eager.bag.weight.mul_(sgm.masks()["bag.weight"])
    torch.testing.assert_close(sgm(ids, offsets, w), eager(ids, offsets, w))
    check_pipeline(model, {"weights": [{"target": "bag", **L1}]}, (ids, offsets, w))


def test_tied_weights_get_one_mask_feeding_every_use() -> None:
    sgm = check_pipeline(TiedLM(), {"weights": [{"target": "head", **L1}]}, (torch.randint(0, 50, (2, 5)),))
    assert list(sgm.masks()) == ["emb.weight"]  # the canonical name of the shared table
    (node,) = [n for n in sgm.graph.nodes if n.target is ops.apply_mask]
    assert len(node.users) == 2
    assert len([n for n, _ in sgm.named_buffers() if n.endswith("_mask")]) == 1


def test_functional_parameters_are_targets() -> None:
    sgm = check_pipeline(
        Functional(), {"weights": [{"target": "w", **L1}, {"target": "v", **L1}]}, (torch.randn(3, 10),)
    )
    assert count(sgm, ops.apply_mask) == 2  # w is used twice, masked once


def test_transformer_encoder_through_export() -> None:
    model = transformer_encoder()
    x = torch.randn(2, 5, 16)
    spec = {"weights": [{"target": "re:layers\\.\\d+\\.linear1", **L1}, {"target": "*.in_proj_weight", **L1}]}
    sgm = check_pipeline(model, spec, (x,), example_inputs=(x,))
    assert sgm._fxs.capture == "export"
    assert set(sgm.masks()) == {
        f"layers.{i}.{p}" for i in range(2) for p in ("linear1.weight", "self_attn.in_proj_weight")
    }
    assert "capture=export" in sgm.report()


def test_export_capture_with_dynamic_shapes_takes_other_batch_sizes() -> None:
    model = transformer_encoder().eval()
    x = torch.randn(2, 5, 16)
    batch = torch.export.Dim("batch", min=1, max=64)
    spec = {"weights": [{"target": "layers.0.linear1", **L1}]}
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(x,), capture="export", dynamic_shapes=({0: batch},))
    sgm.step()
    squashed = sgm.squash()
    with torch.no_grad():
        for size in (1, 7):
            y = torch.randn(size, 5, 16)
            torch.testing.assert_close(squashed(y), sgm(y))
    ep = fxs.export(squashed, (x,), dynamic_shapes=({0: batch},))
    assert ep.module()(torch.randn(3, 5, 16)).shape == (3, 5, 16)


def test_multihead_attention_leaf_in_fx_capture() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.attn(x, x, x, need_weights=False)[0])

    sgm = check_pipeline(
        Block(),
        {"weights": [{"target": "attn.in_proj_weight", **L1}, {"target": "attn.out_proj", **L1}]},
        (torch.randn(2, 3, 8),),
        capture="fx",
    )
    assert count(sgm, ops.module_call) == 1  # one functional_call carries both masked weights


def test_state_dict_round_trip_restores_masks_exactly() -> None:
    model = MLP()
    spec = {"weights": [{"target": "type:Linear", **L1}]}
    sgm = fxs.sparsify_graph(model, spec)
    sgm.step()
    buf = io.BytesIO()
    torch.save(sgm.state_dict(), buf)
    fresh = fxs.sparsify_graph(model, spec)
    assert fresh.sparsity()["fc1.weight"] == 0.0
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for name, mask in sgm.masks().items():
        assert torch.equal(fresh.masks()[name], mask)
    assert fresh._fxs.steps == 1


def test_repeated_step_changes_nothing_and_pruned_stays_pruned() -> None:
    sgm = fxs.sparsify_graph(MLP(), {"weights": [{"target": "fc1", **L1}]})
    sgm.step()
    first = sgm.masks()["fc1.weight"].clone()
    sgm.step()
    assert torch.equal(sgm.masks()["fc1.weight"], first)


def test_user_model_untouched_and_inplace_shares() -> None:
    model = MLP()
    before = snapshot(model)
    sgm = fxs.sparsify_graph(model, {"weights": [{"target": "fc1", **L1}]})
    sgm.step()
    with torch.no_grad():
        sgm.fc1.weight.add_(1.0)
    sgm.squash()
    assert_unchanged(model, before)
    shared = fxs.sparsify_graph(model, {"weights": [{"target": "fc1", **L1}]}, inplace=True)
    assert shared.get_parameter("fc1.weight") is model.fc1.weight


def test_graph_module_input_is_not_mutated() -> None:
    gm = torch.fx.symbolic_trace(MLP())
    code = gm.code
    sgm = fxs.sparsify_graph(gm, {"weights": [{"target": "fc1", **L1}]})
    assert gm.code == code and count(sgm, ops.apply_mask) == 1


def test_graph_module_inplace_failure_leaves_it_runnable_and_success_shares_parameters() -> None:
    gm = torch.fx.symbolic_trace(MLP())
    code, keys = gm.code, list(gm.state_dict())
    spec = {
        "weights": [{"target": "fc1", **L1}],
        "activations": [{"target": "fc2", "mask": "threshold", "threshold": 0.1}],
    }
    with pytest.raises(ValueError, match="rewritten module failed on example_inputs"):
        fxs.sparsify_graph(gm, spec, inplace=True, example_inputs=(torch.randn(2, 7),))
    assert gm.code == code and list(gm.state_dict()) == keys
    gm.recompile()
    gm(torch.randn(2, 16))
    sgm = fxs.sparsify_graph(gm, spec, inplace=True)
    assert gm.code == code and list(gm.state_dict()) == keys and sgm.fc1.weight is gm.fc1.weight


def test_failed_call_leaves_model_unchanged() -> None:
    model = MLP()
    before = snapshot(model)
    with pytest.raises(ValueError, match="rewritten module failed on example_inputs"):
        fxs.sparsify_graph(model, {"weights": [{"target": "fc1", **L1}]}, example_inputs=(torch.randn(2, 3),))
    assert_unchanged(model, before)


def test_eval_cache_recomputes_when_weight_or_mask_changes() -> None:
    model = MLP().eval()
    sgm = fxs.sparsify_graph(model, {"weights": [{"target": "fc1", **L1}]})
    x = torch.randn(2, 16)
    with torch.no_grad():
        a = sgm(x)
        sgm.step()  # mask changed
        b = sgm(x)
        sgm.fc1.weight.mul_(2.0)  # weight changed in place
        c = sgm(x)
    assert not torch.allclose(a, b) and not torch.allclose(b, c)
    eager = copy.deepcopy(model)
    with torch.no_grad():
        eager.fc1.weight.copy_(sgm.fc1.weight * sgm.masks()["fc1.weight"])
        torch.testing.assert_close(c, eager(x))


def test_eval_cache_looks_like_the_parameter_and_never_takes_gradients() -> None:
    sgm = fxs.sparsify_graph(MLP(), {"weights": [{"target": "fc1", **L1}]}).eval()
    sgm.step()
    x = torch.randn(2, 16)
    from fx_sparsify.ops import apply_mask

    with torch.no_grad():
        out = sgm(x)
        cached = apply_mask(sgm.fc1.weight, sgm.fc1_weight_mask)
        assert apply_mask(sgm.fc1.weight, sgm.fc1_weight_mask) is cached
    # requires_grad like the weight, so kernels pick the same path as for the plain parameter
    assert cached.requires_grad and cached.is_leaf and not out.requires_grad
    with torch.inference_mode():
        sgm(x)
    sgm(x).sum().backward()  # autograd on: the multiply is recomputed, the cache is not used
    assert cached.grad is None and sgm.fc1.weight.grad is not None


def _caches(sgm: fxs.SparseGraphModule) -> bool:
    from fx_sparsify.ops import apply_mask

    with torch.no_grad():
        return apply_mask(sgm.fc1.weight, sgm.fc1_weight_mask) is apply_mask(sgm.fc1.weight, sgm.fc1_weight_mask)


def test_cache_only_in_eval_mode_and_eval_refreshes_after_data_edits() -> None:
    sgm = fxs.sparsify_graph(MLP(), {"weights": [{"target": "fc1", **L1}]})
    sgm.step()
    x = torch.randn(2, 16)

    def eager() -> torch.Tensor:
        h = F.relu(F.linear(x, sgm.fc1.weight * sgm.fc1_weight_mask, sgm.fc1.bias))
        return sgm.head(F.relu(sgm.fc2(h)))

    assert not _caches(sgm)  # training mode: a manual `p.data -= lr * grad` loop must see new weights
    with torch.no_grad():
        sgm(x)
        sgm.fc1.weight.data.mul_(3.0)  # .data edits bypass the version counter
        torch.testing.assert_close(sgm(x), eager())
    sgm.eval()
    assert _caches(sgm)
    with torch.no_grad():
        sgm(x)
        sgm.fc1.weight.data.mul_(0.5)
        sgm.eval()  # documented: eval() drops the cache
        torch.testing.assert_close(sgm(x), eager())
    for copied in (copy.deepcopy(sgm), pickle.loads(pickle.dumps(sgm)), sgm.to(torch.float64).to(torch.float32)):
        assert _caches(copied)
    assert not _caches(copy.deepcopy(sgm.train()))


def test_gradients_flow_to_kept_weights_only() -> None:
    sgm = fxs.sparsify_graph(MLP(), {"weights": [{"target": "fc1", **L1}]})
    sgm.step()
    sgm(torch.randn(4, 16)).sum().backward()
    grad = sgm.fc1.weight.grad
    mask = sgm.masks()["fc1.weight"]
    assert torch.all(grad[~mask] == 0) and grad[mask].abs().sum() > 0


def test_deepcopy_and_pickle_keep_the_sparse_module() -> None:
    sgm = fxs.sparsify_graph(MLP(), {"weights": [{"target": "fc1", **L1}]})
    sgm.step()
    x = torch.randn(2, 16)
    for other in (copy.deepcopy(sgm), pickle.loads(pickle.dumps(sgm))):
        assert isinstance(other, fxs.SparseGraphModule)
        torch.testing.assert_close(other(x), sgm(x))
        assert torch.equal(other.masks()["fc1.weight"], sgm.masks()["fc1.weight"])
        torch.testing.assert_close(other.squash()(x), sgm(x))


def test_function_forms() -> None:
    sgm = fxs.sparsify_graph(MLP(), {"weights": [{"target": "fc1", **L1}]})
    fxs.step(sgm)
    assert fxs.sparsity(sgm)["fc1.weight"] == 0.5
    assert set(fxs.masks(sgm)) == {"fc1.weight"}
    assert "fc1.weight" in fxs.report(sgm)
    assert isinstance(fxs.squash(sgm), torch.fx.GraphModule)


def test_report_columns_and_values() -> None:
    sgm = fxs.sparsify_graph(MLP(), {"weights": [{"target": "fc1", **L1}]})
    sgm.step()
    text = sgm.report()
    for column in ("target", "kind", "method", "shape", "target sparsity", "achieved", "kept", "at squash"):
        assert column in text
    row = next(line for line in text.splitlines() if "fc1.weight" in line)
    assert "32x16" in row and "50.0%" in row and "256" in row and "folded" in row
    assert "capture=fx" in text and "steps=1" in text


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_report_kind_of_embedding_tables(capture: str) -> None:
    ids = torch.randint(0, 50, (2, 5))
    sgm = fxs.sparsify_graph(
        TiedLM(),
        {"weights": [{"target": "emb", **L1}, {"target": "proj", **L1}]},
        capture=capture,
        example_inputs=(ids,),
    )
    kinds = {line.split()[1]: line for line in sgm.report().splitlines() if ".weight" in line}
    assert "embedding" in kinds["emb.weight"] and "embedding" not in kinds["proj.weight"]


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        ("not a model", TypeError, "torch.nn.Module"),
    ],
)
def test_bad_model(bad: object, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        fxs.sparsify_graph(bad, {"weights": [{"target": "fc1", **L1}]})  # type: ignore[arg-type]


def test_bad_example_inputs_and_capture() -> None:
    with pytest.raises(TypeError, match="wrap it"):
        fxs.sparsify_graph(MLP(), {"weights": [{"target": "fc1", **L1}]}, example_inputs=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="capture='nope'"):
        fxs.sparsify_graph(MLP(), {"weights": [{"target": "fc1", **L1}]}, capture="nope")
    with pytest.raises(ValueError, match="needs example inputs"):
        fxs.sparsify_graph(MLP(), {"weights": [{"target": "fc1", **L1}]}, capture="export")


def test_export_refuses_unsquashed_graph_module() -> None:
    sgm = fxs.sparsify_graph(MLP(), {"weights": [{"target": "fc1", **L1}]})
    plain = torch.fx.GraphModule(sgm, sgm.graph)
    with pytest.raises(ValueError, match="squash"):
        fxs.export(plain, (torch.randn(2, 16),))
    ep = fxs.export(sgm, (torch.randn(2, 16),))  # a SparseGraphModule is squashed first
    assert "fx_sparsify" not in str(ep.graph)


def test_export_capture_keeps_the_model_mode_so_eval_forwards_are_cached() -> None:
    x = torch.randn(2, 5, 16)
    spec = {"weights": [{"target": "layers.0.linear1", **L1}]}
    for training in (False, True):
        model = transformer_encoder().train(training)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sgm = fxs.sparsify_graph(model, spec, example_inputs=(x,), capture="export")
        # a training-mode capture keeps its dropout: the user is told so (issue 11 item 5)
        assert any("captured TransformerEncoder in training mode" in str(w.message) for w in caught) is training
        assert sgm.training is training
        from fx_sparsify.ops import apply_mask

        w, m = (
            sgm.get_parameter("layers.0.linear1.weight"),
            sgm.get_buffer(sgm._fxs.targets["layers.0.linear1.weight"].buffer),
        )
        with torch.no_grad():
            assert (apply_mask(w, m) is apply_mask(w, m)) is not training


@pytest.mark.parametrize(
    "layer", [nn.Embedding(20, 8, max_norm=1.0), nn.EmbeddingBag(20, 8, max_norm=1.0, mode="mean")]
)
def test_embedding_max_norm_renormalises_the_masked_rows_like_the_squashed_module(layer: nn.Module) -> None:
    model = nn.Sequential(layer)
    with torch.no_grad():
        layer.weight.mul_(3.0)  # rows well above max_norm, so renormalisation matters
    sgm = fxs.sparsify_graph(model, {"weights": [{"target": "0", **L1}]})
    sgm.step()
    ids = torch.randint(0, 20, (4, 5))
    masked = sgm(ids)
    torch.testing.assert_close(sgm.squash()(ids), masked)
    with torch.no_grad():
        torch.testing.assert_close(sgm.eval()(ids), masked)


def test_embedding_called_by_keyword_is_masked() -> None:
    model = KeywordCall(nn.Embedding(20, 8))
    sgm = fxs.sparsify_graph(model, {"weights": [{"target": "layer", **L1}]})
    sgm.step()
    ids = torch.randint(0, 20, (4, 5))
    expected = torch.nn.functional.embedding(ids, model.layer.weight * sgm.masks()["layer.weight"])
    torch.testing.assert_close(sgm(ids), expected)
    torch.testing.assert_close(sgm.squash()(ids), expected)


def test_type_selector_says_which_subclass_modules_it_leaves_dense() -> None:
    """'type:Linear' matches the class exactly; nn.MultiheadAttention's out_proj (a NonDynamicallyQuantizableLinear)
    stays dense, and the user is told so, with the selector that would include it."""
    import warnings

    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    x = (torch.randn(2, 5, 32),)
    spec = {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5}]}
    with pytest.warns(
        UserWarning,
        match=r"'type:Linear' matches that class exactly, so 1 module\(s\) of its "
        r"subclasses stay dense: 'self_attn.out_proj' \(NonDynamicallyQuantizableLinear\)"
        r"\. Add 'type:NonDynamicallyQuantizableLinear'",
    ) as caught:
        sgm = fxs.sparsify_graph(layer, spec, example_inputs=x)
    assert [w.filename for w in caught if "matches that class exactly" in str(w.message)] == [__file__]
    assert sorted(sgm.masks()) == ["linear1.weight", "linear2.weight"]
    both = {
        "weights": [
            {**spec["weights"][0], "target": t} for t in ("type:Linear", "type:NonDynamicallyQuantizableLinear")
        ]
    }
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sgm = fxs.sparsify_graph(layer, both, example_inputs=x)
    assert "self_attn.out_proj.weight" in sgm.masks()
    assert not any("matches that class exactly" in str(w.message) for w in seen)  # a later rule took them
    excluded = {"weights": [spec["weights"][0], {"target": "self_attn.out_proj", "method": "dense"}]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxs.sparsify_graph(layer, excluded, example_inputs=x)  # left dense on purpose: nothing to say
