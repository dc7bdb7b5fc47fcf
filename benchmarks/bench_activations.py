"""Observer overhead per observed layer per forward: fx_sparsify vs ActivationSparsifier's hooks.

A deep MLP of small Linears (so the layers themselves cost little) is run plain, with the reference's
aggregate hooks on every layer, and through ``sparsify_graph`` with an activation rule on every
layer. Prints medians of repeats and the extra µs per observed layer per forward.

    python benchmarks/bench_activations.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn
from torch.ao.pruning._experimental.activation_sparsifier.activation_sparsifier import ActivationSparsifier

import fx_sparsify as fxs
import fx_sparsify.observer  # noqa: F401


def timed(fn, repeats: int, inner: int) -> float:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    layers, width, batch = (16, 64, 8) if args.quick else (64, 64, 8)
    repeats, inner = (3, 20) if args.quick else (7, 100)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).eval()
    x = torch.randn(batch, width)

    ref_model = copy.deepcopy(model)
    sparsifier = ActivationSparsifier(ref_model)
    for layer in ref_model:
        sparsifier.register_layer(
            layer,
            aggregate_fn=lambda a, b: a + b,
            reduce_fn=lambda t: t.mean(0),
            mask_fn=lambda t, threshold: (t.abs() >= threshold).float(),
            threshold=0.1,
        )
    sgm = fxs.sparsify_graph(
        model,
        {
            "activations": [
                {"target": "type:Linear", "aggregate": "sum", "reduce": "mean", "mask": "threshold", "threshold": 0.1}
            ]
        },
    )
    observers = [m for m in sgm.modules() if isinstance(m, fxs.observer.ActivationObserver)]
    with torch.no_grad():
        plain = timed(lambda: model(x), repeats, inner)
        ref = timed(lambda: ref_model(x), repeats, inner)
        ours = timed(lambda: sgm(x), repeats, inner)
        for obs in observers:
            obs.enabled = False
        mask_only = timed(lambda: sgm(x), repeats, inner)
    per = lambda t: (t - plain) / layers * 1e6  # noqa: E731
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{layers} Linear({width}, {width}) layers, batch {batch}"
    )
    print("| forward (no_grad) | median | vs plain | extra per observed layer |")
    print("|---|---:|---:|---:|")
    print(f"| plain | {plain * 1e6:.0f} µs | 1.00x | – |")
    print(f"| ActivationSparsifier hooks | {ref * 1e6:.0f} µs | {ref / plain:.2f}x | {per(ref):.1f} µs |")
    print(f"| fx_sparsify observer + mask node | {ours * 1e6:.0f} µs | {ours / plain:.2f}x | {per(ours):.1f} µs |")
    print(
        f"| fx_sparsify mask node only (observers off) | {mask_only * 1e6:.0f} µs | {mask_only / plain:.2f}x | "
        f"{per(mask_only):.1f} µs |"
    )
    print(f"\nobserver alone: {(ours - mask_only) / layers * 1e6:.1f} µs per observed layer per forward (target <= 15)")


if __name__ == "__main__":
    main()
