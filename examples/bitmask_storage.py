"""Bitmask storage: a 50 % sparse model that runs faster on the CPU, reproducibly (docs/bitmask.md).

    python examples/bitmask_storage.py [--width 1024] [--sparsity 0.5] [--out DIR]

Prunes an MLP, squashes it with ``storage="bitmask"`` (kept values + a 1-bit mask, a fused C kernel),
lets ``storage="auto"`` weigh dense / CSR / BSR / bitmask per layer and saves those choices, squashes
again from the saved choices (no timing), and loads a compressed checkpoint straight into bitmask
layers. Prints the time of each against the dense squash (one thread).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fx_sparsify as fxs


def build(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, 4 * width), nn.ReLU(), nn.Linear(4 * width, width)).eval()


def per_call(fn: Any, x: torch.Tensor, repeats: int = 20) -> float:
    """Median seconds per call (after a warm-up)."""
    fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=None, help="folder for choices.json and the checkpoint")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build(args.width)
    spec = {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": args.sparsity}]}
    sgm = fxs.sparsify_graph(model, spec)
    sgm.step()
    dense = sgm.squash()
    small = sgm.squash(storage="bitmask")  # every masked Linear: kept values + 1-bit mask
    auto = sgm.squash(storage="auto", batch_size=1)  # per layer: whatever measured fastest here
    out = args.out or Path(tempfile.mkdtemp())
    fxs.save_storage_choices(auto.storage_choices, out / "choices.json")
    again = sgm.squash(storage=fxs.load_storage_choices(out / "choices.json"))  # the same layouts, no timing
    fxs.save_compressed(dense, out / "model.safetensors")
    with torch.device("meta"):
        empty = build(args.width)  # no memory: load_compressed fills it from the file
    loaded = fxs.load_compressed(out / "model.safetensors", empty, storage="bitmask")

    x = torch.randn(1, args.width)
    with torch.inference_mode():
        want = dense(x)
        for module in (small, auto, again, loaded):
            torch.testing.assert_close(module(x), want, atol=1e-5, rtol=1e-5)
        t = {
            name: per_call(m, x)
            for name, m in [("dense", dense), ("bitmask", small), ("auto", auto), ("from file", loaded)]
        }
    print(f"{args.width}x{4 * args.width} MLP at {args.sparsity:.0%}, batch 1, 1 thread:")
    for name, seconds in t.items():
        print(f"  {name:10s} {seconds * 1e3:7.3f} ms  {seconds / t['dense']:.2f}x dense")
    print("auto picked:", ", ".join(f"{c.layer}: {c.storage} ({c.why})" for c in auto.storage_choices))
    return {
        "choices": [c.storage for c in auto.storage_choices],
        "again": [c.storage for c in again.storage_choices],
        "loaded": [type(m).__name__ for m in loaded],
        "ratios": {k: v / t["dense"] for k, v in t.items()},
    }


if __name__ == "__main__":
    main()
