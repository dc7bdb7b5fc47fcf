"""step() on a ResNet-18 with 1 and with 2 intra-op threads, interleaved (the thread-count sensitivity).

    python benchmarks/bench_step_threads.py [--repeats 7] [--size 64]

On a machine whose cores are busy with other jobs, every intra-op parallel op waits for a worker
thread to be scheduled; a step made of many element-wise ops then took several times longer with
torch's default two threads than with one. The mask work of a step runs on one thread for tensors
under ``fx_sparsify._threads.SERIAL_BELOW`` entries, so the two settings should time about the same.
Prints the thread counts, the machine's load average and, per setting, the median and range.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import fx_sparsify as fxs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from shrink_resnet import resnet18  # noqa: E402  (the torchvision-free ResNet-18 of the examples)

SPEC = {
    "weights": [
        {"target": "type:Conv2d", "method": "l1_unstructured", "sparsity": 0.5},
        {"target": "conv1", "method": "dense"},
        {"target": "fc", "method": "2:4"},
    ],
    "activations": [
        {"target": "fc", "aggregate": "abs_sum", "reduce": "mean", "mask": "l1_unstructured", "sparsity": 0.25}
    ],
}


def main(argv: list[str] | None = None) -> dict[int, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    args = parser.parse_args(argv)
    before = torch.get_num_threads()
    torch.manual_seed(0)
    x = torch.randn(2, 3, args.size, args.size)
    sgm = fxs.sparsify_graph(resnet18().eval(), SPEC, example_inputs=(x,))
    times: dict[int, list[float]] = {1: [], 2: []}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    try:
        for i in range(args.repeats + 1):  # the first round warms up
            for threads in times:
                torch.set_num_threads(threads)
                with torch.no_grad():
                    sgm(x)
                start = time.perf_counter()
                sgm.step()
                if i:
                    times[threads].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    cores = os.cpu_count()
    print(
        f"step() on ResNet-18 (20 targets), {args.repeats} interleaved runs per setting; {cores} cores, "
        f"load average {load:.1f} at the start"
    )
    for threads, t in times.items():
        print(
            f"  torch.set_num_threads({threads}): median {statistics.median(t):.3f} s (range {min(t):.3f}-{max(t):.3f})"
        )
    ratio = statistics.median(times[2]) / statistics.median(times[1])
    print(f"  2 threads / 1 thread: {ratio:.2f}x")
    return times


if __name__ == "__main__":
    main()
