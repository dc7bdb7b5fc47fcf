"""The command line ``fx-sparsify`` / ``python -m fx_sparsify`` (SPEC §12), in process and as a subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fx_sparsify as fxs
from fx_sparsify.cli import load_checkpoint, main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "examples" / "recipes" / "resnet_like.toml")
MODEL = f"{ROOT / 'examples' / 'resnet_like.py'}:build"
FIVE = ["report.md", "graph.svg", "sparsity.png", "model.safetensors", "model.pt2", "widths.json", "spec.json"]


def _has_viz() -> bool:
    import shutil

    return all(importlib.util.find_spec(m) for m in ("matplotlib", "pydot")) and shutil.which("dot") is not None


def _build():
    spec = importlib.util.spec_from_file_location("resnet_like_for_tests", ROOT / "examples" / "resnet_like.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(str(path))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    code = main(
        [
            "run",
            RECIPE,
            "--model",
            MODEL,
            "--model-kwargs",
            '{"width": 8}',
            "--input",
            "2x3x16x16",
            "--calibrate",
            "3",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    return out


def test_run_writes_the_files(run_dir: Path) -> None:
    expected = FIVE if _has_viz() else ["report.md", "model.safetensors", "model.pt2", "widths.json", "spec.json"]
    for name in expected:
        assert (run_dir / name).stat().st_size > 0, name
    report = (run_dir / "report.md").read_text()
    assert "layer1.conv1.weight" in report and "fc:input" in report and "| target" in report
    assert "stem.0.weight" not in report  # the dense rule wins for the stem


def test_run_spec_json_is_the_resolved_recipe(run_dir: Path) -> None:
    assert fxs.load_spec(run_dir / "spec.json") == fxs.load_spec(RECIPE)
    assert json.loads((run_dir / "spec.json").read_text())["weights"][2]["method"] == "nm"


def test_run_weights_load_into_the_model_and_are_sparse(run_dir: Path) -> None:
    state = _weights(run_dir / "model.safetensors")
    model = _build()(width=8)
    model.load_state_dict(state)  # strict: the original keys and shapes
    conv = state["layer2.conv2.weight"]
    assert float((conv == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    fc = state["fc.weight"].reshape(-1, 4)
    assert bool(((fc != 0).sum(1) <= 2).all())  # 2:4 (the activation fold zeroes columns on top)
    assert float((state["stem.0.weight"] == 0).float().mean()) < 0.05


def test_run_with_inputs_file_and_debug(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    batches = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    torch.save(batches, tmp_path / "batches.pt")
    code = main(
        [
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
            str(tmp_path / "o"),
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "calibrate" in err and "step" in err  # progress on stderr


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["run", "missing.toml", "--model", MODEL, "--input", "1x3x8x8", "--out", "o"],
            "recipe file 'missing.toml' does not exist",
        ),
        (
            ["run", RECIPE, "--model", "no_such_module_xyz:build", "--input", "1x3x8x8", "--out", "o"],
            "cannot import 'no_such_module_xyz'",
        ),
        (
            [
                "run",
                RECIPE,
                "--model",
                f"{ROOT / 'examples' / 'resnet_like.py'}:nope",
                "--input",
                "1x3x8x8",
                "--out",
                "o",
            ],
            "no callable 'nope'",
        ),
        (["run", RECIPE, "--model", MODEL, "--input", "1xAx8", "--out", "o"], "expected a shape such as 1x3x224x224"),
        (["run", RECIPE, "--model", MODEL, "--out", "o"], "run needs example inputs"),
        (
            ["run", RECIPE, "--model", MODEL, "--model-kwargs", "{width: 8}", "--input", "1x3x8x8", "--out", "o"],
            "--model-kwargs: not valid JSON",
        ),
        (["inspect", "nothing.pt"], "'nothing.pt' does not exist"),
    ],
)
def test_user_errors_exit_2_with_a_message(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_spec_errors_exit_2_and_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[weights]]\ntarget = 'nowhere'\nmethod = 'l1_unstructured'\nsparsity = 0.5\n")
    argv = ["run", str(bad), "--model", MODEL, "--input", "1x3x8x8", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "selects nothing" in capsys.readouterr().err
    with pytest.raises(ValueError, match="selects nothing"):
        main([*argv, "--debug"])


def test_shrink_and_storage_reach_squash(tmp_path: Path) -> None:
    recipe = tmp_path / "channels.json"
    recipe.write_text(json.dumps({"channels": [{"target": "layer1.conv1", "sparsity": 0.5}]}))
    code = main(
        [
            "run",
            str(recipe),
            "--model",
            MODEL,
            "--model-kwargs",
            '{"width": 8}',
            "--input",
            "1x3x8x8",
            "--shrink",
            "--storage",
            "dense",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert code == 0
    state = _weights(tmp_path / "o" / "model.safetensors")
    assert state["layer1.conv1.weight"].shape == (4, 8, 3, 3) and state["layer1.conv2.weight"].shape == (8, 4, 3, 3)
    assert "squash: shrink=True, storage=dense" in (tmp_path / "o" / "report.md").read_text()


def test_a_squash_without_the_option_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fxs.SparseGraphModule, "squash", lambda self: None)  # an older squash(): no storage
    code = main(
        [
            "run",
            RECIPE,
            "--model",
            MODEL,
            "--model-kwargs",
            '{"width": 8}',
            "--input",
            "1x3x8x8",
            "--storage",
            "auto",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert (
        code == 2
        and "--storage: this version of fx_sparsify's squash() does not take storage" in capsys.readouterr().err
    )


def test_inspect_a_state_dict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    linear = torch.nn.Linear(4, 4)
    with torch.no_grad():
        linear.weight[:2] = 0
    torch.save(linear.state_dict(), tmp_path / "sd.pt")
    assert main(["inspect", str(tmp_path / "sd.pt")]) == 0
    out = capsys.readouterr().out
    assert "| weight" in out and "50.0%" in out and "2 tensors, 20 floating-point elements" in out


def test_inspect_refuses_pickled_objects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a whole module: not weights_only-loadable
    assert main(["inspect", str(tmp_path / "module.pt")]) == 2
    assert "weights_only=True" in capsys.readouterr().err


def test_methods_lists_methods_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in fxs.available_mask_methods():
        assert f"| {name} " in out
    assert "sparsity (required)" in out


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def test_subprocess_run_and_a_user_error(tmp_path: Path) -> None:
    """The console script (python -m fx_sparsify where the package was installed without scripts) end to end."""
    script = Path(sys.executable).with_name("fx-sparsify")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fx_sparsify"]
    out = tmp_path / "out"
    done = subprocess.run(
        [
            *command,
            "run",
            RECIPE,
            "--model",
            MODEL,
            "--model-kwargs",
            '{"width": 8}',
            "--input",
            "2x3x16x16",
            "--calibrate",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "fc.weight" in done.stdout and "calibrate" in done.stderr
    for name in FIVE if _has_viz() else ["report.md", "model.safetensors", "model.pt2", "widths.json", "spec.json"]:
        assert (out / name).is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "fx_sparsify", "inspect", str(tmp_path / "missing.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_inspect_piped_into_a_reader_that_stops_early_is_not_an_error(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "many.safetensors"
    save_file({f"layer{i}.weight": torch.zeros(2, 2) for i in range(3000)}, str(path))  # a table far past a pipe buffer
    done = subprocess.run(
        f'"{sys.executable}" -m fx_sparsify inspect "{path}" | head -n 1',
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.startswith("| tensor")
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_version_names_torch_and_the_c_kernels(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """For bug reports: one line with both versions and whether the fast paths are in use."""
    import torch

    from fx_sparsify import __version__, _native

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.count("\n") == 1
    assert f"fx-sparsify {__version__} (torch {torch.__version__})" in out
    assert ("C kernels loaded" if _native.LIB is not None else "C kernels not built") in out
    monkeypatch.setattr(_native, "LIB", None)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "C kernels not built (torch / numpy paths" in capsys.readouterr().out
