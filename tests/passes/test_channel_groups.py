"""The channel-group analysis and ``channels`` rules (SPEC §10): groups, masks, spec round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_sparsify as fxs
from fx_sparsify.passes.channels import map_reshape
from fx_sparsify.spec import ChannelRule, SparsitySpec

from _channel_models import MLP, Block, FusedGateUp, ResidualCNN, randomise_norms

X_CNN = torch.randn(2, 3, 8, 8)


def _groups(sgm: fxs.SparseGraphModule) -> list:
    plan = sgm._fxs.channels
    assert plan is not None
    return plan.groups


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_cnn_groups_couple_residuals_norms_depthwise_and_consumers(capture: str) -> None:
    model = randomise_norms(ResidualCNN().eval())
    sgm = fxs.sparsify_graph(
        model, {"channels": [{"target": "c1", "sparsity": 0.5}]}, example_inputs=(X_CNN,), capture=capture
    )
    (group,) = _groups(sgm)
    dims = {(m.tensor, m.dim) for m in group.members}
    # c1's channels flow through b1, the residual add with c2/b2, the depthwise conv and into pw's columns
    for expected in [
        ("c1.weight", 0),
        ("c1.bias", 0),
        ("b1.weight", 0),
        ("b1.running_mean", 0),
        ("c2.weight", 0),
        ("c2.weight", 1),
        ("b2.bias", 0),
        ("dw.weight", 0),
        ("dw.bias", 0),
        ("pw.weight", 1),
    ]:
        assert expected in dims
    assert ("pw.weight", 0) not in dims and group.removable and group.units == 16
    assert sorted(group.roots)[:2] == ["c1.weight", "c2.weight"]


def test_flatten_maps_a_channel_to_its_spatial_block_of_columns() -> None:
    sgm = fxs.sparsify_graph(
        ResidualCNN().eval(), {"channels": [{"target": "pw", "sparsity": 0.5}]}, example_inputs=(X_CNN,)
    )
    (group,) = _groups(sgm)
    fc = next(m for m in group.members if m.tensor == "fc.weight")
    assert (fc.dim, fc.offset, fc.width) == (1, 0, 4)  # 2x2 pooled map per channel
    assert {"se1.weight", "se2.weight", "se2.bias"} <= set(group.member_names())  # the SE gate multiplies pw's channels


def test_step_writes_one_keep_vector_into_every_member() -> None:
    sgm = fxs.sparsify_graph(
        randomise_norms(ResidualCNN().eval()),
        {"channels": [{"target": "c1", "sparsity": 0.25}]},
        example_inputs=(X_CNN,),
    )
    sgm.step()
    masks = sgm.masks()
    rows = masks["c1.weight"].flatten(1).any(1)
    assert int(rows.sum()) == 12
    torch.testing.assert_close(masks["b1.bias"], rows)
    torch.testing.assert_close(masks["c2.weight"].flatten(2).any(2).any(0), rows)  # c2's input columns
    torch.testing.assert_close(masks["c2.weight"].flatten(1).any(1), rows)  # c2's rows: the residual partner
    torch.testing.assert_close(masks["pw.weight"].flatten(2).any(2).any(0), rows)
    before = {k: v.clone() for k, v in masks.items()}
    sgm.step()  # ranking the masked values: the same channels stay pruned
    for name, mask in sgm.masks().items():
        torch.testing.assert_close(mask, before[name])


def test_group_ranking_uses_the_joint_norm_of_all_members() -> None:
    model = MLP()
    with torch.no_grad():
        model.fc1.weight.fill_(1.0)
        model.fc2.weight.zero_()
        model.fc2.weight[:, :8] = 10.0  # only fc2's columns tell channels 0..7 of fc1 apart
    sgm = fxs.sparsify_graph(
        model, {"channels": [{"target": "fc1", "sparsity": 56}]}, example_inputs=(torch.randn(2, 20),)
    )
    sgm.step()
    assert sgm.masks()["fc1.bias"].nonzero().flatten().tolist() == list(range(8))


def test_round_to_and_min_channels() -> None:
    x = torch.randn(2, 20)
    sgm = fxs.sparsify_graph(MLP(), {"channels": [{"target": "fc1", "sparsity": 0.3}]}, example_inputs=(x,))
    sgm.step()  # 64 channels > 32: kept rounded to a multiple of 8 (64 - 19 = 45 -> 48)
    assert int(sgm.masks()["fc1.bias"].sum()) == 48
    sgm = fxs.sparsify_graph(MLP(), {"channels": [{"target": "fc1", "sparsity": 19}]}, example_inputs=(x,))
    sgm.step()  # an int count is exact
    assert int(sgm.masks()["fc1.bias"].sum()) == 45
    sgm = fxs.sparsify_graph(
        MLP(),
        {"channels": [{"target": "fc1", "sparsity": 0.99, "min_channels": 5, "round_to": 1}]},
        example_inputs=(x,),
    )
    sgm.step()
    assert int(sgm.masks()["fc1.bias"].sum()) == 5


def test_global_ranks_across_the_rules_groups() -> None:
    model = MLP()
    with torch.no_grad():
        model.fc1.weight.mul_(100.0)
    sgm = fxs.sparsify_graph(
        model,
        {"channels": [{"target": "re:fc[12]", "sparsity": 0.4, "global": True, "round_to": 1}]},
        example_inputs=(torch.randn(2, 20),),
    )
    sgm.step()
    kept1, kept2 = int(sgm.masks()["fc1.bias"].sum()), int(sgm.masks()["fc2.bias"].sum())
    assert kept1 + kept2 == 112 - round(0.4 * 112)
    # scores are compared relative to their layer's mean: a layer 100x larger does not take the whole budget
    assert 0 < kept1 < 64 and 0 < kept2 < 48


def test_global_allocation_honours_round_to_min_channels_and_the_total() -> None:
    """Two equal layers: a global 50 % rule prunes both (it used to empty one of them), each keeping a
    multiple of round_to; the total is exact; min_channels bounds what a layer keeps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(2, 8)
    spec = {"channels": [{"target": "re:[02]$", "sparsity": 0.5, "global": True}]}
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(x,))
    sgm.step()
    kept = [int(sgm.masks()[f"{i}.bias"].sum()) for i in (0, 2)]
    assert sum(kept) == 64 and all(k % 8 == 0 and k > 0 for k in kept), kept
    with torch.no_grad():
        model[0].weight[:60].mul_(1e-3)  # layer 0 has 4 strong channels only
    spec["channels"][0].update(round_to=1, min_channels=10)
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(x,))
    sgm.step()
    kept = [int(sgm.masks()[f"{i}.bias"].sum()) for i in (0, 2)]
    assert sum(kept) == 64 and kept[0] >= 10, kept


def test_schedule_moves_the_channel_sparsity() -> None:
    spec = {
        "channels": [
            {
                "target": "fc1",
                "sparsity": 0.5,
                "round_to": 1,
                "schedule": {"kind": "linear", "start": 0.0, "end": 0.5, "steps": 2},
            }
        ]
    }
    sgm = fxs.sparsify_graph(MLP(), spec, example_inputs=(torch.randn(2, 20),))
    kept = []
    for _ in range(3):
        sgm.step()
        kept.append(int(sgm.masks()["fc1.bias"].sum()))
    assert kept == [64, 48, 32]


@pytest.mark.parametrize("kv", [4, 2])
def test_heads_group_q_k_v_and_o_columns(kv: int) -> None:
    x = torch.randn(2, 5, 32)
    sgm = fxs.sparsify_graph(Block(kv=kv).eval(), {"channels": [{"target": "attn", "heads": 0.5}]}, example_inputs=(x,))
    (group,) = _groups(sgm)
    assert set(group.member_names()) == {f"attn.{p}.{t}" for p in "qkvo" for t in ("weight", "bias")} - {"attn.o.bias"}
    assert group.units == kv and group.heads_per_unit == 4 // kv
    o = next(m for m in group.members if m.tensor == "attn.o.weight")
    assert (o.dim, o.width) == (1, 8 * (4 // kv))


def test_gqa_head_count_must_take_whole_kv_groups() -> None:
    sgm = fxs.sparsify_graph(
        Block(kv=2).eval(), {"channels": [{"target": "attn", "heads": 1}]}, example_inputs=(torch.randn(2, 5, 32),)
    )
    with pytest.raises(ValueError, match="multiple of 2 heads"):
        sgm.step()


def test_non_removable_group_names_its_node_and_reason() -> None:
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="chunk"):
        fxs.sparsify_graph(FusedGateUp(), {"channels": [{"target": "gate_up", "sparsity": 0.5}]}, example_inputs=(x,))
    # with a removable group beside it, the rule goes on and the plan says why
    sgm = fxs.sparsify_graph(
        MLP(), {"channels": [{"target": "type:Linear", "sparsity": 0.5}]}, example_inputs=(torch.randn(2, 20),)
    )
    plan = sgm.shrink_plan()
    head = next(g for g in _groups(sgm) if g.roots == ["fc3.weight"])
    assert not head.removable and "output" in head.reason and "fc3" in head.node
    assert "model's output" in plan and "fc3" in plan
    sgm.step()
    masks = sgm.masks()
    assert int(masks["fc1.bias"].sum()) == 32 and "fc3.bias" not in masks
    assert bool(masks["fc3.weight"].any(1).all())  # fc3 keeps its rows: only its columns follow fc2


def test_layer_norm_over_the_channels_is_non_removable() -> None:
    sgm = fxs.sparsify_graph(
        Block().eval(),
        {"channels": [{"target": "re:attn\\.o|up", "sparsity": 0.5}]},
        example_inputs=(torch.randn(2, 5, 32),),
    )
    o = next(g for g in _groups(sgm) if g.roots[0] == "attn.o.weight")
    assert not o.removable and "LayerNorm" in o.reason or "model input" in o.reason


def test_feature_channels_cut_by_a_head_view_suggest_heads() -> None:
    with pytest.raises(ValueError, match="heads"):
        fxs.sparsify_graph(
            Block().eval(),
            {"channels": [{"target": "attn.q", "sparsity": 0.5}]},
            example_inputs=(torch.randn(2, 5, 32),),
        )


def test_fx_capture_needs_example_inputs() -> None:
    with pytest.raises(ValueError, match="example_inputs"):
        fxs.sparsify_graph(MLP(), {"channels": [{"target": "fc1", "sparsity": 0.5}]})


def test_a_tensor_in_a_weight_rule_and_a_channel_group_is_refused() -> None:
    spec = {
        "channels": [{"target": "fc1", "sparsity": 0.5}],
        "weights": [{"target": "fc2", "method": "l1_unstructured", "sparsity": 0.5}],
    }
    with pytest.raises(ValueError, match="one mask"):
        fxs.sparsify_graph(MLP(), spec, example_inputs=(torch.randn(2, 20),))


def test_channel_rule_round_trip_and_errors() -> None:
    spec = SparsitySpec.from_dict(
        {
            "channels": [
                {"target": "type:Conv2d", "sparsity": 0.5, "p": 1, "round_to": 4},
                {"target": "re:.*attn", "heads": 2, "min_channels": 2},
            ]
        }
    )
    assert spec.channels[0] == ChannelRule("type:Conv2d", sparsity=0.5, p=1, round_to=4)
    assert SparsitySpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict()["channels"][1] == {"target": "re:.*attn", "heads": 2, "min_channels": 2}
    assert fxs.ChannelRule is ChannelRule
    for bad, err in [
        ({"target": "a"}, KeyError),
        ({"target": "a", "sparsity": 0.5, "heads": 1}, KeyError),
        ({"target": "a", "sparsity": 1.5}, ValueError),
        ({"target": "a", "sparsity": "x"}, TypeError),
        ({"target": "a", "sparsity": 0.5, "round_to": 0}, ValueError),
        ({"target": "a", "sparsity": 0.5, "min_chanels": 2}, KeyError),
        ({"target": "a", "heads": 0.5, "global": True}, ValueError),
    ]:
        with pytest.raises(err, match="channels"):
            SparsitySpec.from_dict({"channels": [bad]})


@pytest.mark.parametrize(
    "src,dst,d,expect",
    [
        ((2, 16, 2, 2), (2, 64), 1, (1, 0, 4)),  # flatten: channel -> 4 columns
        ((2, 5, 32), (2, 5, 4, 8), 2, None),  # split into heads: units of 1 cut across
        ((2, 4, 3, 5, 8), (2, 12, 5, 8), 1, (1, 0, 3)),  # GQA repeat: kv head -> 3 query heads
        ((2, 1, 7), (2, 7), 2, (1, 0, 1)),  # squeeze
    ],
)
def test_map_reshape(src: tuple[int, ...], dst: tuple[int, ...], d: int, expect: tuple[int, int, int] | None) -> None:
    if expect is None:
        with pytest.raises(ValueError) as info:
            map_reshape(src, dst, d, 0, 1, src[d])
        assert info.value.split == 8  # type: ignore[attr-defined]
        assert map_reshape(src, dst, d, 0, 8, 4) == (2, 0, 1)
    else:
        assert map_reshape(src, dst, d, 0, 1, src[d]) == expect


class _ChannelShuffle(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 1)
        self.after = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.conv(x).view(b, 2, 4, h, w).transpose(1, 2).reshape(b, 8, h, w)  # ShuffleNet's channel shuffle
        return self.after(y)


class _EinsumAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(16, 16)
        self.k = torch.nn.Linear(16, 16)
        self.o = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.einsum("btd,bsd->bts", self.q(x), self.k(x)).softmax(-1)
        return self.o(torch.einsum("bts,bsd->btd", a, x))


class _EmbeddingLSTM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.lstm = torch.nn.LSTM(8, 8, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(self.proj(self.emb(x)))[0]


@pytest.mark.parametrize(
    "model,target,x,why",
    [
        (_ChannelShuffle(), "conv", torch.randn(1, 3, 4, 4), "reshape splits the channel dim"),
        (_EinsumAttention(), "q", torch.randn(2, 3, 16), "einsum"),
        (_EmbeddingLSTM(), "proj", torch.randint(0, 10, (2, 5)), "LSTM"),
    ],
    ids=["channel-shuffle", "einsum-attention", "lstm"],
)
def test_unsupported_structures_are_refused_naming_the_node(
    model: torch.nn.Module, target: str, x: torch.Tensor, why: str
) -> None:
    with pytest.raises(ValueError, match=f"none of its channel groups can be removed.*{why}"):
        fxs.sparsify_graph(model, {"channels": [{"target": target, "sparsity": 0.5}]}, example_inputs=(x,))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("target", ["attn", "block"])
def test_heads_on_multihead_attention_plan_its_packed_projection(target: str, capture: str) -> None:
    """torchvision's ViT and nn.Transformer use nn.MultiheadAttention (packed in_proj_weight): a heads rule
    on it (or on a block holding it) plans one group of its heads, the q, k and v rows of each head and the
    out_proj columns (shrinking it: tests/passes/test_shrink_attention.py)."""

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)
            self.fc = torch.nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.attn(x, x, x, need_weights=False)[0])

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Block()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(x)

    target = "block.attn" if target == "attn" else "block"
    sgm = fxs.sparsify_graph(
        Net(),
        {"channels": [{"target": target, "heads": 0.5}]},
        example_inputs=(torch.randn(2, 5, 16),),
        capture=capture,
    )
    (group,) = _groups(sgm)
    assert (group.units, group.unit, group.removable) == (4, "attention head", True)
    members = [(m.tensor, m.dim, m.offset, m.width) for m in group.members]
    assert members == [
        ("block.attn.in_proj_weight", 0, 0, 4),
        ("block.attn.in_proj_weight", 0, 16, 4),
        ("block.attn.in_proj_weight", 0, 32, 4),
        ("block.attn.in_proj_bias", 0, 0, 4),
        ("block.attn.in_proj_bias", 0, 16, 4),
        ("block.attn.in_proj_bias", 0, 32, 4),
        ("block.attn.out_proj.weight", 1, 0, 4),
    ]
