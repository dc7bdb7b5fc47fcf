"""Data-parallel calibration and split solves: 2 ranks (gloo, CPU), each on its half of the batches, equal one
process over all of them (SPEC §19), in one pass, in sequential levels and in streamed pruning.

Every scenario runs in the same two spawned processes (one start-up); the single-process references run here.
Most models are float64; the float32 scenarios check that the statistics, summed over the batches in float64
and rounded once when a solve reads them, agree although the ranks add their partial sums in another order.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

import fx_sparsify as fxs
from fx_sparsify import distributed

from models import MLP

WORLD = 2
TIMEOUT_S = 240


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """The one-process references run on one thread, as each rank does: a float32 matrix product's rounding
    depends on how many threads split it, so equality to the last bit holds only at equal thread counts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ONE_PASS: dict[str, Any] = {
    "weights": [
        {"target": "fc1", "method": "sparsegpt", "sparsity": 0.5, "hessian_dtype": "float64"},
        {"target": "fc2", "method": "l1_unstructured", "sparsity": 0.5, "scores": "wanda"},
    ],
    "activations": [
        {"target": "head", "aggregate": "sq_sum", "reduce": "mean", "mask": "l1_unstructured", "sparsity": 0.25},
        {"target": "fc2", "aggregate": "abs_max", "reduce": "none", "mask": "l1_unstructured", "sparsity": 0.5},
    ],
}
PROJ = "re:model\\.layers\\.\\d+\\.(mlp|self_attn)\\.\\w+_proj"
SEQUENTIAL: dict[str, Any] = {
    "weights": [
        {"target": PROJ, "method": "sparsegpt", "sparsity": 0.5, "sequential": True, "hessian_dtype": "float64"}
    ]
}
STREAMED: dict[str, Any] = {
    "weights": [
        {
            "target": "re:blocks\\.\\d+\\.(up|down)",
            "method": "sparsegpt",
            "sparsity": 0.5,
            "sequential": True,
            "hessian_dtype": "float64",
        }
    ]
}


def _mlp_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(6, 16, generator=g, dtype=torch.float64) for _ in range(4)]


def _llama(vocab: int = 100, hidden: int = 32, heads: int = 2, kv_heads: int = 1, inter: int = 64) -> Any:
    """A 2-layer float32 LLaMA from a config, the same weights every call."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=inter,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _llama_batches() -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(6)
    return [{"input_ids": torch.randint(1, 100, (2, 7), generator=g), "use_cache": False} for _ in range(4)]


def _stack() -> torch.nn.Module:
    from test_streamed import Stack

    torch.manual_seed(0)
    return Stack().double()


def _stack_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(4)]


def _llama32() -> Any:
    """A float32 LLaMA where float32 sums over the batches, added in another order, flip masks in later levels."""
    return _llama(vocab=1000, hidden=256, heads=8, kv_heads=4, inter=704)


def _llama32_batches() -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(8)
    return [{"input_ids": torch.randint(1, 1000, (1, 32), generator=g), "use_cache": False} for _ in range(4)]


def _float32(batches: list[Any], spec: dict[str, Any], model: Any) -> dict[str, Any]:
    sgm = fxs.sparsify_graph(model, spec, example_kwargs=batches[0] if isinstance(batches[0], dict) else None)
    for b in batches:
        sgm(**b) if isinstance(b, dict) else sgm(b)
    sgm.step()
    return {
        "masks": {k: v.clone() for k, v in sgm.masks().items()},
        "params": {k: v.detach().clone() for k, v in sgm.named_parameters()},
    }


def _float32_runs(rank: int, world: int) -> dict[str, Any]:
    """The float32 scenarios on this rank's share of the batches (every batch with world=1)."""
    one_pass = {
        "weights": [{**ONE_PASS["weights"][0], "hessian_dtype": "float32"}, ONE_PASS["weights"][1]],
        "activations": ONE_PASS["activations"],
    }
    g = torch.Generator().manual_seed(9)
    mlp_batches = [torch.randn(6, 16, generator=g) for _ in range(4)]
    torch.manual_seed(0)
    out = {"one pass": _float32(mlp_batches[rank::world], one_pass, MLP())}
    sequential = {"weights": [{"target": PROJ, "method": "sparsegpt", "sparsity": 0.5, "sequential": True}]}
    out["sequential"] = _float32(_llama32_batches()[rank::world], sequential, _llama32())
    rule = {"target": "re:model\\.layers\\.\\d+\\.mlp\\.up_proj", "sparsity": 0.5, "importance": "obs"}
    for label, extra in (("channels", {}), ("channels sequential", {"sequential": True})):
        spec = {"channels": [{**rule, "reconstruct": True, **extra}]}
        out[label] = _float32(_llama32_batches()[rank::world], spec, _llama32())
    return out


def _one_pass(batches: list[torch.Tensor]) -> dict[str, Any]:
    torch.manual_seed(0)
    sgm = fxs.sparsify_graph(MLP().double(), ONE_PASS)
    for x in batches:
        sgm(x)
    sgm.step()
    return {
        "masks": {k: v.clone() for k, v in sgm.masks().items()},
        "params": {k: v.detach().clone() for k, v in sgm.named_parameters()},
    }


def _sequential(batches: list[dict[str, Any]]) -> dict[str, Any]:
    sgm = fxs.sparsify_graph(_llama().double(), SEQUENTIAL, example_kwargs=batches[0])
    for b in batches:
        sgm(**b)
    sgm.step()
    return {
        "masks": {k: v.clone() for k, v in sgm.masks().items()},
        "params": {k: v.detach().clone() for k, v in sgm.named_parameters()},
    }


def _channels(batches: list[dict[str, Any]], sequential: bool) -> dict[str, Any]:
    rule = {
        "target": "re:model\\.layers\\.\\d+\\.mlp\\.up_proj",
        "sparsity": 0.5,
        "importance": "obs",
        "reconstruct": True,
        "sequential": sequential,
    }
    sgm = fxs.sparsify_graph(_llama().double(), {"channels": [rule]}, example_kwargs=batches[0])
    for b in batches:
        sgm(**b)
    sgm.step()
    return {
        "masks": {k: v.clone() for k, v in sgm.masks().items()},
        "params": {k: v.detach().clone() for k, v in sgm.named_parameters()},
    }


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        import fx_sparsify.passes.reconstruct as reconstruct_pass

        solved: list[str] = []
        original = reconstruct_pass.reconstruct

        def counting(gm: Any, record: Any, options: Any) -> Any:
            solved.append(record.name)
            return original(gm, record, options)

        reconstruct_pass.reconstruct = counting  # type: ignore[assignment]
        result: dict[str, Any] = {"one_pass": _one_pass(_mlp_batches()[rank::WORLD])}
        result["sequential"] = _sequential(_llama_batches()[rank::WORLD])
        result["solved"] = list(solved)
        result["channels"] = _channels(_llama_batches()[rank::WORLD], sequential=False)
        result["channels sequential"] = _channels(_llama_batches()[rank::WORLD], sequential=True)
        result["float32"] = _float32_runs(rank, WORLD)
        result["shares"] = [[int(x[0, 0] * 1e6) for x in distributed.local_share(_mlp_batches())]]
        fxs.prune_streamed(lambda: _stack(), out + "/stack.safetensors", STREAMED, _stack_batches(), out + "/streamed")
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # the results are saved: leave without the interpreter's teardown, where gloo's threads, still held by objects
    # freed then, sometimes abort the process ("terminate called without an active exception", SIGABRT, about one
    # full-suite run in three here; pytorch/pytorch#179291)
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("ranks")
    save_file({k: v.contiguous() for k, v in _stack().state_dict().items()}, str(out / "stack.safetensors"))
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the 2-rank run did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)], out


def _same(got: dict[str, Any], want: dict[str, Any], atol: float = 1e-10) -> None:
    assert got["masks"].keys() == want["masks"].keys()
    for name, mask in want["masks"].items():
        assert torch.equal(got["masks"][name], mask), name
    for name, p in want["params"].items():
        torch.testing.assert_close(got["params"][name], p, atol=atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_one_pass_sparsegpt_wanda_activations_equal_one_process(ranks: Any) -> None:
    results, _ = ranks
    want = _one_pass(_mlp_batches())
    assert 0 < want["masks"]["head:input"].float().mean() < 1
    for r in results:
        _same(r["one_pass"], want)


def test_sequential_levels_equal_one_process_and_split_the_solves(ranks: Any) -> None:
    results, _ = ranks
    want = _sequential(_llama_batches())
    for r in results:
        _same(r["sequential"], want)
    targets = {n for n in want["masks"] if n.endswith("_proj.weight")}
    per_rank = [set(r["solved"]) & targets for r in results]
    assert per_rank[0] | per_rank[1] == targets and not per_rank[0] & per_rank[1]  # each solved once, on one rank
    assert all(per_rank)


@pytest.mark.parametrize("sequential", [False, True], ids=["one-pass", "sequential"])
def test_channel_importance_and_reconstruction_equal_one_process(ranks: Any, sequential: bool) -> None:
    results, _ = ranks
    want = _channels(_llama_batches(), sequential)
    assert 0 < want["masks"]["model.layers.0.mlp.up_proj.weight"].float().mean() < 1
    for r in results:
        # the channel statistics are float32 whatever the model: the ranks' sums, added in another order, round apart
        _same(r["channels sequential" if sequential else "channels"], want, atol=1e-5)


@pytest.mark.parametrize("scenario", ["one pass", "sequential", "channels", "channels sequential"])
def test_float32_statistics_equal_one_process(ranks: Any, scenario: str) -> None:
    """float32 models and Hessians: masks equal and weights within 1e-5 of one process. The sums over the batches
    are kept in float64 and rounded to float32 once, so the ranks' other order of addition does not show;
    with float32 sums, sequential SparseGPT's later levels flipped masks (weights 1e-2 apart)."""
    results, _ = ranks
    want = _float32_runs(0, 1)[scenario]
    assert any(0 < m.float().mean() < 1 for m in want["masks"].values())
    for r in results:
        _same(r["float32"][scenario], want, atol=1e-5)


def test_ranks_take_alternate_batches(ranks: Any) -> None:
    results, _ = ranks
    every = [int(x[0, 0] * 1e6) for x in _mlp_batches()]
    assert results[0]["shares"][0] == every[0::2] and results[1]["shares"][0] == every[1::2]


def test_streamed_on_two_ranks_equals_one_process(ranks: Any, tmp_path: Path) -> None:
    _, out = ranks
    fxs.prune_streamed(lambda: _stack(), out / "stack.safetensors", STREAMED, _stack_batches(), tmp_path / "one")
    want = fxs.load_compressed(tmp_path / "one")
    got = fxs.load_compressed(out / "streamed")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-10, rtol=0, msg=k)
        assert torch.equal(got[k] != 0, want[k] != 0), k


def test_assign_balances_costs() -> None:
    assert distributed.assign([9.0, 1.0, 4.0, 4.0], world=2) == [0, 1, 1, 1]
    owners = distributed.assign([float(c) for c in range(1, 9)], world=3)
    loads = [sum(c for c, o in zip(range(1, 9), owners) if o == r) for r in range(3)]
    assert max(loads) <= 4 / 3 * sum(loads) / 3 and sorted(set(owners)) == [0, 1, 2]  # LPT's bound


def test_single_process_helpers_are_identities() -> None:
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_writer()
    assert list(distributed.local_share("abc")) == ["a", "b", "c"]
    calls: list[int] = []
    got = distributed.solve_split([1, 2], [1.0, 2.0], lambda k: (calls.append(k) or torch.tensor([k]),), lambda k: ())
    assert calls == [1, 2] and [int(v[0]) for v in got.values()] == [1, 2]
