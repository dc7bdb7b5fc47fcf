"""The registry: listing, unknown names, double registration, user methods through compute_mask."""

from __future__ import annotations

import pytest
import torch

from fx_sparsify.methods import available_mask_methods, compute_mask, get_mask_method, register_mask_method

BUILTINS = {
    "l1_unstructured",
    "ln_structured",
    "random_unstructured",
    "random_structured",
    "topk",
    "nm",
    "block_topk",
    "block",
    "bernoulli",
    "threshold",
    "dense",
}


def test_available_lists_builtins_with_one_line_descriptions() -> None:
    methods = available_mask_methods()
    assert BUILTINS <= set(methods)
    for name, description in methods.items():
        assert description and "\n" not in description, name
    assert methods["block_topk"] == "alias of 'nm'"


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(KeyError, match="l1_unstructured") as info:
        compute_mask("l1_unstructure", torch.randn(3), sparsity=0.5)
    assert "Did you mean 'l1_unstructured'" in str(info.value)


def test_unknown_and_missing_options() -> None:
    with pytest.raises(TypeError, match="did you mean 'sparsity'"):
        compute_mask("l1_unstructured", torch.randn(3), sparsty=0.5)
    with pytest.raises(TypeError, match="needs option"):
        compute_mask("l1_unstructured", torch.randn(3))


def test_user_method_via_compute_mask(clean_registry: None) -> None:
    @register_mask_method("keep_positive", aliases=("pos",))
    def keep_positive(tensor: torch.Tensor, *, margin: float = 0.0) -> torch.Tensor:
        """Keep entries above a margin."""
        return tensor > margin

    t = torch.tensor([-1.0, 0.5, 2.0])
    torch.testing.assert_close(compute_mask("keep_positive", t), torch.tensor([False, True, True]))
    torch.testing.assert_close(compute_mask("pos(U)", t, margin=1.0), torch.tensor([False, False, True]))
    assert available_mask_methods()["keep_positive"] == "Keep entries above a margin."
    assert get_mask_method("pos").options == ("margin",)


def test_user_random_method_receives_generator(clean_registry: None) -> None:
    seen = []

    @register_mask_method("coin")
    def coin(tensor: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        seen.append(generator)
        return torch.rand(tensor.shape, generator=generator) < 0.5

    gen = torch.Generator().manual_seed(0)
    compute_mask("coin", torch.randn(4), generator=gen)
    assert seen == [gen]


def test_double_registration_needs_override(clean_registry: None) -> None:
    with pytest.raises(ValueError, match="override=True"):
        register_mask_method("dense")(lambda tensor: torch.zeros_like(tensor, dtype=torch.bool))
    with pytest.raises(ValueError, match="already registered"):
        register_mask_method("other", aliases=("block_topk",))(lambda tensor: tensor > 0)
    register_mask_method("dense", override=True)(lambda tensor: torch.zeros_like(tensor, dtype=torch.bool))
    assert not bool(compute_mask("dense", torch.randn(3)).any())


def test_bad_method_definitions(clean_registry: None) -> None:
    with pytest.raises(TypeError, match="first positional argument"):
        register_mask_method("bad")(lambda *, sparsity: None)

    @register_mask_method("wrong_shape")
    def wrong_shape(tensor: torch.Tensor) -> torch.Tensor:
        return torch.ones(2, dtype=torch.bool)

    with pytest.raises(ValueError, match="same shape"):
        compute_mask("wrong_shape", torch.randn(3))


def test_compute_mask_rejects_non_tensors() -> None:
    with pytest.raises(TypeError, match="torch.Tensor"):
        compute_mask("dense", [1.0, 2.0])  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["graph", "inplace"])
def test_a_method_that_edits_its_input_cannot_corrupt_the_weight(clean_registry: None, mode: str) -> None:
    from torch import nn

    import fx_sparsify as fxs

    def vandal(t: torch.Tensor) -> torch.Tensor:
        keep = t.abs() > t.abs().median()
        t.zero_()  # a careless user method: edits what it was given
        return keep

    register_mask_method("vandal")(vandal)
    model = nn.Sequential(nn.Linear(8, 8))
    sgm = fxs.sparsify_graph(model, {"mode": mode, "weights": [{"target": "0", "method": "vandal"}]})
    before = sgm.get_parameter("0.weight").detach().clone()
    sgm.step()
    keep = sgm.masks()["0.weight"]
    assert 0 < int(keep.sum()) < keep.numel()
    # the weight lost only what the mask prunes (in place mode) or nothing at all (graph mode)
    expected = before * keep if mode == "inplace" else before
    torch.testing.assert_close(sgm.get_parameter("0.weight").detach(), expected)


@pytest.mark.parametrize("mode", ["graph", "inplace"])
def test_a_scores_callable_that_edits_its_input_cannot_corrupt_the_weight(mode: str) -> None:
    from torch import nn

    import fx_sparsify as fxs

    def scores(w: torch.Tensor) -> torch.Tensor:
        return w.abs_()  # a careless scores callable: edits the tensor it was given and returns it

    model = nn.Sequential(nn.Linear(8, 8))
    sgm = fxs.sparsify_graph(
        model,
        {"mode": mode, "weights": [{"target": "0", "method": "l1_unstructured", "sparsity": 0.5, "scores": scores}]},
    )
    before = sgm.get_parameter("0.weight").detach().clone()
    sgm.step()
    keep = sgm.masks()["0.weight"]
    assert int(keep.sum()) == keep.numel() // 2
    assert torch.equal(keep, before.abs() > before.abs().median())
    expected = before * keep if mode == "inplace" else before
    torch.testing.assert_close(sgm.get_parameter("0.weight").detach(), expected)
