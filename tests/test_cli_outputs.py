"""What ``fx-sparsify run`` writes for use downstream: ``model.pt2``, ``widths.json``, the factory's
arguments / a Hugging Face config for a shrunk model, the summary; a failed rerun leaves the previous
run whole; ``inspect`` of each file; and the small things a first user hit."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fx_sparsify import _cli_run
from fx_sparsify.cli import load_checkpoint, main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "examples" / "recipes" / "resnet_like.toml")
MODEL = f"{ROOT / 'examples' / 'resnet_like.py'}:build"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
FX = [sys.executable, "-m", "fx_sparsify"]

MLP_FACTORY = """
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def build(hidden: int = 32, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(hidden)
"""


def _run(
    *extra: str,
    out: Path,
    recipe: str = RECIPE,
    model: str = MODEL,
    kwargs: str | None = '{"width": 8}',
    shape: str = "2x3x16x16",
) -> subprocess.CompletedProcess[str]:
    argv = [
        *FX,
        "run",
        recipe,
        "--model",
        model,
        "--input",
        shape,
        "--calibrate",
        "2",
        "--latency-runs",
        "2",
        "--out",
        str(out),
        *extra,
    ]
    if kwargs:
        argv[argv.index("--input") : argv.index("--input")] = ["--model-kwargs", kwargs]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=ENV)


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As a user would: a channels recipe, ``--shrink``, from the console (subprocess)."""
    tmp = tmp_path_factory.mktemp("shrunk")
    recipe = tmp / "channels.json"
    recipe.write_text(
        json.dumps(
            {
                "channels": [{"target": "layer1.conv1", "sparsity": 0.5}],
                "weights": [{"target": "layer3.conv2", "method": "l1_unstructured", "sparsity": 0.5}],
            }
        )
    )
    done = _run("--shrink", "--threads", "1", out=tmp / "out", recipe=str(recipe))
    assert done.returncode == 0, done.stderr
    (tmp / "stdout.txt").write_text(done.stdout)
    return tmp / "out"


def test_model_pt2_loads_without_fx_sparsify_and_equals_the_result(shrunk: Path, tmp_path: Path) -> None:
    x = torch.randn(3, 3, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        program = torch.export.load({str(shrunk / "model.pt2")!r})
        torch.save(program.module()(torch.load({str(tmp_path / "x.pt")!r})), {str(tmp_path / "y.pt")!r})
        assert not any(m.startswith("fx_sparsify") for m in sys.modules), "fx_sparsify was imported"
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=ENV, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    # the same weights, as the shrunk module: the factory rebuilt at the widths widths.json gives
    widths = json.loads((shrunk / "widths.json").read_text())
    state = load_checkpoint(str(shrunk / "model.safetensors"))
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from resnet_like import build
    finally:
        sys.path.remove(str(ROOT / "examples"))
    model = build(width=8)
    for path, sizes in widths["modules"].items():  # resize the eager model the way widths.json says
        module = model.get_submodule(path)
        for key in ("weight", "bias", "running_mean", "running_var"):
            if getattr(module, key, None) is not None:
                setattr(
                    module,
                    key,
                    type(getattr(module, key))(state[f"{path}.{key}"].clone(), requires_grad=False)
                    if isinstance(getattr(module, key), torch.nn.Parameter)
                    else state[f"{path}.{key}"].clone(),
                )
        for attr, value in sizes.items():
            if attr not in ("type", "before"):
                setattr(module, attr, value)
    model.load_state_dict(state)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), model.eval()(x), atol=1e-5, rtol=1e-5)


def test_widths_json_matches_the_module(shrunk: Path) -> None:
    widths = json.loads((shrunk / "widths.json").read_text())
    state = load_checkpoint(str(shrunk / "model.safetensors"))
    assert widths["tensors"]["layer1.conv1.weight"] == [4, 8, 3, 3]
    assert widths["before"]["layer1.conv1.weight"] == [8, 8, 3, 3]
    for key, shape in widths["tensors"].items():
        assert list(state[key].shape) == shape, key
    unchanged = [k for k in state if k not in widths["tensors"]]
    assert "layer2.conv1.weight" in unchanged
    conv1, conv2, bn1 = (widths["modules"][m] for m in ("layer1.conv1", "layer1.conv2", "layer1.bn1"))
    assert conv1 == {"type": "Conv2d", "in_channels": 8, "out_channels": 4, "groups": 1, "before": {"out_channels": 8}}
    assert conv2["in_channels"] == 4 and conv2["out_channels"] == 8 and bn1["num_features"] == 4
    for path, sizes in widths["modules"].items():
        weight = state[f"{path}.weight"]
        if sizes["type"] == "Conv2d":
            assert (sizes["out_channels"], sizes["in_channels"]) == (weight.shape[0], weight.shape[1] * sizes["groups"])
        elif sizes["type"] == "BatchNorm2d":
            assert sizes["num_features"] == weight.shape[0]


def test_summary_on_stdout_and_in_the_report(shrunk: Path) -> None:
    stdout = (shrunk.parent / "stdout.txt").read_text()
    report = (shrunk / "report.md").read_text()
    for text in (stdout, report):
        assert "| parameters" in text and "`model.safetensors`" in text and "`model.pt2`" in text
        assert "latency (median of 2, 1 thread(s))" in text
    assert "threads: 1, the same for dense and result" in stdout
    assert "torch.set_num_threads(1) for both" in report
    assert "`widths.json`" in report


def test_inspect_an_exported_program(shrunk: Path) -> None:
    done = subprocess.run(
        [*FX, "inspect", str(shrunk / "model.pt2")], capture_output=True, text=True, timeout=120, env=ENV
    )
    assert done.returncode == 0, done.stderr
    assert "| layer1.conv1.weight " in done.stdout and "4x8x3x3" in done.stdout
    rows = [line.split("|")[1].strip() for line in done.stdout.splitlines()[2:] if line.startswith("|")]
    assert rows.index("stem.0.weight") < rows.index("layer1.conv1.weight") < rows.index("fc.weight")  # model order


def test_factory_arguments_that_rebuild_the_shrunk_model(tmp_path: Path) -> None:
    factory = tmp_path / "mlp.py"
    factory.write_text(MLP_FACTORY)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"channels": [{"target": "fc1", "sparsity": 0.5}]}))
    done = _run(
        "--shrink", out=tmp_path / "out", recipe=str(recipe), model=f"{factory}:build", kwargs=None, shape="4x16"
    )
    assert done.returncode == 0, done.stderr
    kwargs = json.loads((tmp_path / "out" / "model_kwargs.json").read_text())
    assert kwargs == {"hidden": 16}
    spec = __import__("importlib.util").util.spec_from_file_location("mlp_factory", factory)
    module = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rebuilt = module.build(**kwargs)
    rebuilt.load_state_dict(
        load_checkpoint(str(tmp_path / "out" / "model_kwargs.json").replace("model_kwargs.json", "model.safetensors"))
    )  # strict: every key and shape
    assert "model_kwargs.json" in (tmp_path / "out" / "report.md").read_text()


def test_shrink_without_a_channels_rule_is_a_plain_squash_with_a_note(tmp_path: Path) -> None:
    """As the user hit it: ``--shrink`` with a weights-only recipe ended in 'error: channels (KeyError)'."""
    done = _run("--shrink", out=tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "--shrink: the recipe has no 'channels' rule" in done.stderr and "KeyError" not in done.stderr
    state = load_checkpoint(str(tmp_path / "out" / "model.safetensors"))
    assert state["layer1.conv1.weight"].shape == (8, 8, 3, 3)
    assert json.loads((tmp_path / "out" / "widths.json").read_text())["tensors"] == {}


def test_a_wrong_input_shape_is_one_clean_error(tmp_path: Path) -> None:
    done = _run(out=tmp_path / "out", shape="2x5x16x16")
    assert done.returncode == 2
    assert "the model fails on the example inputs (2x5x16x16)" in done.stderr
    assert "Traceback" not in done.stderr and "torch.fx" not in done.stderr and "GraphModule" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_failed_rerun_leaves_the_previous_run_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    argv = [
        "run",
        RECIPE,
        "--model",
        MODEL,
        "--model-kwargs",
        '{"width": 8}',
        "--input",
        "2x3x16x16",
        "--latency-runs",
        "0",
        "--calibrate",
        "1",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = tmp_path / "other.json"  # a different recipe: its spec.json would differ
    other.write_text(json.dumps({"weights": [{"target": "fc", "method": "l1_unstructured", "sparsity": 0.9}]}))

    def fail(*args: object) -> str:
        raise ValueError("disk full (simulated)")

    monkeypatch.setattr(_cli_run, "save_weights", fail)  # spec.json is written before the weights
    argv[1] = str(other)
    assert main(argv) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    monkeypatch.undo()
    assert main(argv) == 0  # a good rerun replaces every file
    assert json.loads((out / "spec.json").read_text())["weights"][0]["sparsity"] == 0.9


def test_a_rerun_removes_files_it_no_longer_writes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_kwargs.json").write_text("{}")  # from an earlier shrunk run
    (out / "notes.txt").write_text("mine")  # not a file run writes: kept
    argv = [
        "run",
        RECIPE,
        "--model",
        MODEL,
        "--model-kwargs",
        '{"width": 8}',
        "--input",
        "2x3x16x16",
        "--latency-runs",
        "0",
        "--calibrate",
        "1",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    assert not (out / "model_kwargs.json").exists() and (out / "notes.txt").read_text() == "mine"


def test_model_safetensors_has_the_usual_file_mode(tmp_path: Path) -> None:
    out = tmp_path / "out"
    previous = os.umask(0o022)
    try:
        assert (
            main(
                [
                    "run",
                    RECIPE,
                    "--model",
                    MODEL,
                    "--model-kwargs",
                    '{"width": 8}',
                    "--input",
                    "2x3x16x16",
                    "--latency-runs",
                    "0",
                    "--calibrate",
                    "1",
                    "--out",
                    str(out),
                    "--quiet",
                ]
            )
            == 0
        )
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "report.md", "model.pt2"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_inspect_sorts_safetensors_names_naturally_and_skips_counters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import save_file

    tensors = {f"layer{i}.weight": torch.zeros(2, 2) for i in (1, 2, 10)}
    tensors["bn.num_batches_tracked"] = torch.tensor(0)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    assert main(["inspect", str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    names = [line.split("|")[1].strip() for line in out.splitlines()[2:] if line.startswith("|")]
    assert names == ["bn.num_batches_tracked", "layer1.weight", "layer2.weight", "layer10.weight"]
    counter = next(line for line in out.splitlines() if "num_batches_tracked" in line)
    assert "100.0%" not in counter and "| -" in counter
    assert "12 floating-point elements, 12 zeros" in out and "1 integer tensors, not counted" in out


def test_methods_prints_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "p=2, dim=0" in out and "density=0.5" in out and "block_shape=(1, 4)" in out


def test_threads_flag_is_used_and_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = torch.get_num_threads()
    try:
        assert (
            main(
                [
                    "run",
                    RECIPE,
                    "--model",
                    MODEL,
                    "--model-kwargs",
                    '{"width": 8}',
                    "--input",
                    "2x3x16x16",
                    "--latency-runs",
                    "1",
                    "--threads",
                    "1",
                    "--out",
                    str(tmp_path / "o"),
                    "--quiet",
                ]
            )
            == 0
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "threads: 1" in (tmp_path / "o" / "report.md").read_text()
    assert (
        main(["run", RECIPE, "--model", MODEL, "--input", "1x3x8x8", "--threads", "0", "--out", str(tmp_path / "p")])
        == 2
    )
    assert "--threads 0: expected a count >= 1" in capsys.readouterr().err


def test_storage_choices_are_recorded_and_reused(tmp_path: Path) -> None:
    """--storage auto picked CSR for a layer in one run and dense in the next: the run records its choices in
    storage.json and the report, and --storage storage.json gives a rerun the same layouts."""
    recipe = tmp_path / "fc.json"
    recipe.write_text(json.dumps({"weights": [{"target": "fc", "method": "l1_unstructured", "sparsity": 0.9}]}))
    first = _run("--storage", "auto", out=tmp_path / "a", recipe=str(recipe))
    assert first.returncode == 0, first.stderr
    saved = json.loads((tmp_path / "a" / "storage.json").read_text())
    layers = {row["layer"]: row for row in saved["layers"]}
    assert "fc" in layers and layers["fc"]["storage"] in ("dense", "csr", "bsr 16x16", "bitmask")
    report = (tmp_path / "a" / "report.md").read_text()
    assert "## Storage per layer" in report and "| fc " in report
    (tmp_path / "a" / "storage.json").write_text(
        json.dumps(
            {**saved, "layers": [{**row, "storage": "csr"} if row["layer"] == "fc" else row for row in saved["layers"]]}
        )
    )  # a choice to keep
    again = _run("--storage", str(tmp_path / "a" / "storage.json"), out=tmp_path / "b", recipe=str(recipe))
    assert again.returncode == 0, again.stderr
    reused = {
        row["layer"]: row["storage"] for row in json.loads((tmp_path / "b" / "storage.json").read_text())["layers"]
    }
    assert reused["fc"] == "csr"
    assert f"storage=the choices of {tmp_path / 'a' / 'storage.json'}" in (tmp_path / "b" / "report.md").read_text()
    missing = _run("--storage", str(tmp_path / "nope.json"), out=tmp_path / "c", recipe=str(recipe))
    assert missing.returncode == 2 and "no such file" in missing.stderr


LLAMA_FACTORY = """
import torch
import transformers


def build(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=64, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()
"""


@pytest.mark.models
def test_a_hugging_face_model_gets_its_resized_config(tmp_path: Path) -> None:
    """--shrink on a Hugging Face model: config.json holds the new widths, and the model it builds loads the weights."""
    transformers = pytest.importorskip("transformers")
    factory = tmp_path / "llama.py"
    factory.write_text(LLAMA_FACTORY)
    recipe = tmp_path / "r.json"
    recipe.write_text(
        json.dumps({"channels": [{"target": "re:model\\.layers\\.\\d+\\.mlp\\.up_proj", "sparsity": 0.5}]})
    )
    torch.save([{"input_ids": torch.randint(0, 100, (2, 7)), "use_cache": False}], tmp_path / "batches.pt")
    argv = [
        *FX,
        "run",
        str(recipe),
        "--model",
        f"{factory}:build",
        "--inputs",
        str(tmp_path / "batches.pt"),
        "--calibrate",
        "1",
        "--latency-runs",
        "1",
        "--shrink",
        "--out",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["intermediate_size"] == 32 and config["hidden_size"] == 32
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    model.load_state_dict(load_checkpoint(str(tmp_path / "out" / "model.safetensors")))  # strict
    widths = json.loads((tmp_path / "out" / "widths.json").read_text())
    assert widths["tensors"]["model.layers.0.mlp.up_proj.weight"] == [32, 32]


def test_factory_kwargs_search_finds_only_exact_rebuilds() -> None:
    from torch import nn

    from fx_sparsify._run_outputs import factory_kwargs_for

    def build(width: int = 16, depth: int = 2, seed: int = 0) -> nn.Module:
        return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)], nn.Linear(width, 3))

    assert factory_kwargs_for(build, {}, build(width=8)) == {"width": 8}
    assert factory_kwargs_for(build, {"depth": 2}, build(width=4)) == {"depth": 2, "width": 4}
    uneven = build()
    uneven[0] = nn.Linear(16, 8)  # per-layer widths no argument expresses
    assert factory_kwargs_for(build, {}, uneven) is None
    assert factory_kwargs_for(build, {}, build(width=8), seconds=0.0) is None  # out of time: no answer, no hang


def test_a_calibration_batch_of_the_wrong_shape_is_one_clean_error(tmp_path: Path) -> None:
    """torch.fx printed the generated code's traceback before the error of a batch the model could not take."""
    torch.save([torch.randn(2, 3, 16, 16), torch.randn(2, 5, 16, 16)], tmp_path / "batches.pt")
    argv = [
        *FX,
        "run",
        RECIPE,
        "--model",
        MODEL,
        "--model-kwargs",
        '{"width": 8}',
        "--inputs",
        str(tmp_path / "batches.pt"),
        "--calibrate",
        "2",
        "--out",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 2
    assert "calibration batch 1: the model fails on it" in done.stderr
    assert "Traceback" not in done.stderr and "eval_with_key" not in done.stderr and not (tmp_path / "out").exists()
    debug = subprocess.run([*argv, "--debug"], capture_output=True, text=True, timeout=300, env=ENV)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
