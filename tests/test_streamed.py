"""prune_streamed: one block at a time from a checkpoint on disk equals the in-memory pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fx_sparsify as fxs
from fx_sparsify.streamed import MARKER


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    """A model with a prefix (inp), repeated blocks and a suffix (head): traced by fx."""

    def __init__(self, d: int = 16, n: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _stack() -> Stack:
    torch.manual_seed(0)
    return Stack()


def _save(model: nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _in_memory(model: nn.Module, spec: dict[str, Any], batches: list[Any], **capture: Any) -> dict[str, torch.Tensor]:
    sgm = fxs.sparsify_graph(model, spec, **capture)
    for b in batches:
        sgm(**b) if isinstance(b, dict) else sgm(b)
    sgm.step()
    return sgm.squash(shrink=bool(spec.get("channels"))).state_dict()


def _equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        if atol:
            torch.testing.assert_close(got[k], want[k], atol=atol, rtol=0, msg=k)
        else:
            assert torch.equal(got[k], want[k]), k


SPEC_L1 = {
    "weights": [
        {"target": "re:blocks\\.\\d+\\.(up|down)", "method": "l1_unstructured", "sparsity": 0.5},
        {"target": "head", "method": "nm", "n": 2, "m": 4},
    ]
}


def test_fx_stack_single_file_magnitude_equals_in_memory(tmp_path: Path) -> None:
    ckpt = _save(_stack(), tmp_path / "model.safetensors")
    batches = [torch.randn(5, 8) for _ in range(3)]
    seen: list[tuple[int, int, str]] = []
    sparsity = fxs.prune_streamed(Stack, ckpt, SPEC_L1, batches, tmp_path / "out", progress=lambda *a: seen.append(a))
    want = _in_memory(_stack(), SPEC_L1, batches)
    _equal(fxs.load_compressed(tmp_path / "out"), want)
    assert sparsity["blocks.1.up.weight"] == 0.5 and sparsity["head.weight"] == 0.5
    # one shard per block, then the tensors outside the blocks; the index names every tensor
    assert [s[:2] for s in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)] and seen[0][2] == "blocks.0"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(want) and not (tmp_path / "out" / MARKER).exists()
    loaded = fxs.load_compressed(tmp_path / "out", Stack())
    x = torch.randn(2, 8)
    model = _stack()
    model.load_state_dict(want)
    assert torch.equal(loaded(x), model(x))


def test_the_objects_made_before_the_run_are_frozen_during_it_and_thawed_after(tmp_path: Path) -> None:
    """The collection after each block walks only the objects the run made (gc.freeze), not the interpreter's
    whole heap; a caller's own freeze is left as it is."""
    import gc

    ckpt = _save(_stack(), tmp_path / "model.safetensors")
    batches = [torch.randn(5, 8) for _ in range(2)]
    counts: list[int] = []
    seen = lambda *a: counts.append(gc.get_freeze_count())  # noqa: E731
    assert gc.get_freeze_count() == 0
    fxs.prune_streamed(Stack, ckpt, SPEC_L1, batches, tmp_path / "out", progress=seen)
    assert len(counts) == 4 and all(n > 1000 for n in counts) and gc.get_freeze_count() == 0
    gc.freeze()
    try:
        fxs.prune_streamed(Stack, ckpt, SPEC_L1, batches, tmp_path / "again", progress=seen)
        assert gc.get_freeze_count() > 1000  # not thawed by the run
    finally:
        gc.unfreeze()


def test_calibration_spills_to_disk_and_equals_in_memory(tmp_path: Path) -> None:
    ckpt = _save(_stack(), tmp_path / "model.safetensors")
    batches = [torch.randn(5, 8) for _ in range(4)]
    spec = {
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
    spill = tmp_path / "out" / ".fx_sparsify-activations-rank0"
    files: list[int] = []
    fxs.prune_streamed(
        Stack,
        ckpt,
        spec,
        batches,
        tmp_path / "out",
        activation_memory=0,
        progress=lambda *a: files.append(len(list(spill.glob("*.pt")))),
    )
    assert files[0] == len(batches) and not spill.exists()  # every batch lived on disk, removed at the end
    _equal(fxs.load_compressed(tmp_path / "out"), _in_memory(_stack(), spec, batches), atol=1e-5)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Callable[[], nn.Module], Path, list[dict[str, Any]]]:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama") / "ckpt"
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, max_shard_size="40KB")
    assert len(list(folder.glob("*.safetensors"))) > 2 and (folder / "model.safetensors.index.json").is_file()
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(1, 100, (2, 9), generator=g)} for _ in range(3)]
    return lambda: transformers.LlamaForCausalLM(cfg), folder, batches


def _llama_in_memory(
    build: Callable[[], nn.Module], folder: Path, spec: dict[str, Any], batches: list[dict[str, Any]]
) -> dict[str, torch.Tensor]:
    model = build().eval()
    model.load_state_dict(fxs.load_compressed(folder), strict=False)  # plain safetensors shards load too
    model.tie_weights()
    first = {**batches[0], "use_cache": False}
    return _in_memory(model, spec, [{**b, "use_cache": False} for b in batches], example_kwargs=first)


PROJ = "re:model\\.layers\\.\\d+\\.(mlp|self_attn)\\.\\w+_proj"


@pytest.mark.parametrize(
    "spec",
    [
        {"weights": [{"target": PROJ, "method": "l1_unstructured", "sparsity": 0.5}]},
        {"weights": [{"target": PROJ, "method": "sparsegpt", "sparsity": 0.5, "sequential": True}]},
        {"channels": [{"target": "re:model\\.layers\\.\\d+\\.mlp\\.up_proj", "sparsity": 0.5}]},
    ],
    ids=["magnitude", "sparsegpt-sequential", "channels"],
)
def test_llama_sharded_export_equals_in_memory(llama: Any, tmp_path: Path, spec: dict[str, Any]) -> None:
    build, folder, batches = llama
    fxs.prune_streamed(build, folder, spec, batches, tmp_path / "out")
    want = _llama_in_memory(build, folder, spec, batches)
    got = fxs.load_compressed(tmp_path / "out")
    sparsegpt = spec.get("weights", [{}])[0].get("method") == "sparsegpt"
    _equal(got, want, atol=1e-4 if sparsegpt else 0.0)
    if "channels" in spec:
        assert got["model.layers.0.mlp.up_proj.weight"].shape == (32, 32)  # shrunk from 64


def test_wanda_streamed_equals_block_by_block(llama: Any, tmp_path: Path) -> None:
    """Streamed Wanda calibrates each block on the pruned blocks before it: one block at a time in memory."""
    build, folder, batches = llama
    rule = {"method": "l1_unstructured", "sparsity": 0.5, "scores": "wanda"}
    fxs.prune_streamed(build, folder, {"weights": [{"target": PROJ, **rule}]}, batches, tmp_path / "out")
    model = build().eval()
    model.load_state_dict(fxs.load_compressed(folder), strict=False)
    model.tie_weights()
    for i in range(3):
        spec = {
            "mode": "inplace",
            "weights": [{"target": f"re:model\\.layers\\.{i}\\.(mlp|self_attn)\\.\\w+_proj", **rule}],
        }
        sgm = fxs.sparsify_graph(model, spec, example_kwargs={**batches[0], "use_cache": False}, inplace=True)
        for b in batches:
            sgm(**b, use_cache=False)
        sgm.step()
    _equal(fxs.load_compressed(tmp_path / "out"), {k: v for k, v in model.state_dict().items()}, atol=0.0)


def test_missing_shard_is_named_and_out_untouched(llama: Any, tmp_path: Path) -> None:
    build, folder, batches = llama
    broken = tmp_path / "broken"
    broken.mkdir()
    shards = sorted(folder.glob("*.safetensors"))
    for f in [*shards[:1], *shards[2:], folder / "model.safetensors.index.json"]:
        (broken / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match=shards[1].name):
        fxs.prune_streamed(
            build,
            broken,
            {"weights": [{"target": PROJ, "method": "l1_unstructured", "sparsity": 0.5}]},
            batches,
            tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


def test_failed_run_leaves_no_index_and_rerun_starts_clean(tmp_path: Path) -> None:
    ckpt = _save(_stack(), tmp_path / "model.safetensors")
    out = tmp_path / "out"
    batches = [torch.randn(5, 8)]

    def interrupt(done: int, total: int, name: str) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fxs.prune_streamed(Stack, ckpt, SPEC_L1, batches, out, progress=interrupt)
    assert sorted(p.name for p in out.iterdir()) == []  # the shards it wrote are removed, no index
    # a killed run leaves its shards and the marker listing them: the next run removes them, keeps the rest
    (out / "model-00001-of-00004.safetensors").write_bytes(b"stale")
    (out / "model-00009-of-00009.safetensors").write_bytes(b"stale")
    (out / MARKER).write_text(
        json.dumps({"files": ["model-00001-of-00004.safetensors", "model-00009-of-00009.safetensors"]})
    )
    (out / "notes.txt").write_text("mine")
    fxs.prune_streamed(Stack, ckpt, SPEC_L1, batches, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "model-00001-of-00004.safetensors",
        "model-00002-of-00004.safetensors",
        "model-00003-of-00004.safetensors",
        "model-00004-of-00004.safetensors",
        "model.safetensors.index.json",
        "notes.txt",
    ]
    _equal(fxs.load_compressed(out), _in_memory(_stack(), SPEC_L1, batches))
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json"):
        fxs.load_compressed(tmp_path)  # a folder without an index is not a finished output


def test_rules_that_cannot_stream_are_refused(tmp_path: Path) -> None:
    ckpt = _save(_stack(), tmp_path / "model.safetensors")
    batches = [torch.randn(5, 8)]
    spread = {"global": [{"targets": ["blocks.0.up", "blocks.1.up"], "method": "l1_unstructured", "sparsity": 0.5}]}
    with pytest.raises(ValueError, match="ranks tensors of 2 blocks"):
        fxs.prune_streamed(Stack, ckpt, spread, batches, tmp_path / "out")
    head = {"weights": [{"target": "head", "method": "sparsegpt", "sparsity": 0.5}]}
    with pytest.raises(ValueError, match="outside the repeated blocks"):
        fxs.prune_streamed(Stack, ckpt, head, batches, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    with pytest.raises(ValueError, match="selects nothing"):
        fxs.prune_streamed(Stack, ckpt, {"weights": [{"target": "nope", "method": "dense"}]}, batches, tmp_path / "o")
    with pytest.raises(ValueError, match="where the checkpoint is"):
        fxs.prune_streamed(Stack, ckpt, SPEC_L1, batches, tmp_path)


def test_example_scale_streamed_runs(tmp_path: Path) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "scale_streamed.py"
    spec = importlib.util.spec_from_file_location("scale_streamed", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = example.main(str(tmp_path))
    assert (tmp_path / "pruned" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "pruned").glob("model-*.safetensors"))) == 5  # 4 blocks + the rest
    assert float((model.blocks[3].down.weight == 0).float().mean()) == 0.5


def test_cli_checkpoint_stream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fx_sparsify import _cli_stream
    from fx_sparsify.cli import main

    example = Path(__file__).resolve().parents[1] / "examples" / "scale_streamed.py"
    recipe = tmp_path / "recipe.json"
    recipe.write_text(
        json.dumps(
            {"weights": [{"target": "re:blocks\\.\\d+\\.(up|down)", "method": "l1_unstructured", "sparsity": 0.5}]}
        )
    )
    torch.manual_seed(123)
    import importlib.util

    spec = importlib.util.spec_from_file_location("scale_streamed_cli", example)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    weights = module.Model().state_dict()
    save_file(weights, str(tmp_path / "ckpt.safetensors"))
    common = [
        str(recipe),
        "--model",
        f"{example}:Model",
        "--input",
        "8x16",
        "--checkpoint",
        str(tmp_path / "ckpt.safetensors"),
        "--quiet",
    ]
    set_threshold: list[bool] = []
    monkeypatch.setattr(_cli_stream, "mmap_large_allocations", lambda: set_threshold.append(True) or True)
    assert main(["run", *common, "--stream", "--out", str(tmp_path / "streamed")]) == 0
    assert set_threshold == [True]  # the CLI's own process fixes glibc's mmap threshold; prune_streamed does not
    got = fxs.load_compressed(tmp_path / "streamed")
    assert (tmp_path / "streamed" / "report.md").is_file() and (tmp_path / "streamed" / "spec.json").is_file()
    # the checkpoint's weights, pruned (not the factory's initialisation)
    kept = got["blocks.2.up.weight"] != 0
    assert float(kept.float().mean()) == 0.5
    assert torch.equal(got["blocks.2.up.weight"][kept], weights["blocks.2.up.weight"][kept])
    assert torch.equal(got["head.weight"], weights["head.weight"])
    # without --stream the checkpoint is loaded into the model before the usual in-memory run: the same weights
    assert main(["run", *common, "--out", str(tmp_path / "memory"), "--latency-runs", "0"]) == 0
    memory = fxs.load_compressed(tmp_path / "memory" / "model.safetensors")
    for k, v in got.items():
        assert torch.equal(memory[k], v), k
    assert main(["run", *common[:-3], "--stream", "--out", str(tmp_path / "x")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
