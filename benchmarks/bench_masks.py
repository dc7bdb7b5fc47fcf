"""Mask methods against the tools a user would otherwise call, on the same tensors, in one process.

    python benchmarks/bench_masks.py            # 4096 x 4096, one thread (a minute or so)
    python benchmarks/bench_masks.py --quick    # 512 x 512 smoke run

Prints a markdown table: median seconds of ours and of the reference, the speed-up, whether the masks
are identical (up to the choice among exactly tied values; random methods: equal counts), and our
peak extra memory as a multiple of the tensor's size (measured in a fresh subprocess via ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from typing import Callable

import torch
from torch import nn
from torch.ao.pruning import WeightNormSparsifier
from torch.nn.utils import prune

from fx_sparsify.methods import compute_mask

from _timing import median_time  # noqa: E402  (benchmarks/ is on sys.path)

WNS_2_4 = {"sparsity": 1.0, "block_shape": (1, 4), "zeros_per_block": 2, "p": 2}


def same_up_to_ties(ref: torch.Tensor, ours: torch.Tensor, scores: torch.Tensor) -> bool:
    """Equal counts, and any disagreement only where the score equals the selection boundary."""
    ref, ours = ref.bool(), ours.bool()
    if int(ref.sum()) != int(ours.sum()):
        return False
    diff = ref != ours
    if not bool(diff.any()):
        return True
    boundary = scores[~ours].max()  # the largest pruned score: the only value that can tie
    return bool((scores[diff] == boundary).all())


def same_groups_up_to_ties(ref: torch.Tensor, ours: torch.Tensor, scores: torch.Tensor, m: int) -> bool:
    """Per run of ``m`` along the last dim: the kept scores are the same multiset (ties may swap)."""
    ref_kept = torch.where(ref.bool(), scores, -1.0).reshape(-1, m).sort(dim=1).values
    ours_kept = torch.where(ours.bool(), scores, -1.0).reshape(-1, m).sort(dim=1).values
    return bool(torch.equal(ref_kept, ours_kept))


def ours_for(case: str, x: torch.Tensor) -> Callable[[], object]:
    if case == "l1":
        return lambda: compute_mask("l1_unstructured", x, sparsity=0.5)
    if case == "ln":
        return lambda: compute_mask("ln_structured", x, sparsity=0.5, p=2, dim=0)
    if case == "random":
        gen = torch.Generator().manual_seed(0)
        return lambda: compute_mask("random_unstructured", x, sparsity=0.5, generator=gen)
    if case == "wns":
        return lambda: compute_mask("block", x, **WNS_2_4)
    raise KeyError(case)


def _peak_rss_kib() -> int:
    """This process's peak RSS (VmHWM). ru_maxrss is no good here: Linux carries it over from the
    parent across fork/exec, so a child started by a big benchmark reports the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_child(case: str, size: int) -> None:
    torch.set_num_threads(1)
    ours_for(case, torch.randn(64, 64))()  # load code paths on a tiny tensor first
    x = torch.randn(size, size)
    before = _peak_rss_kib()
    mask = ours_for(case, x)()
    after = _peak_rss_kib()
    del mask
    print(json.dumps({"extra_kib": after - before, "tensor_kib": x.numel() * x.element_size() / 1024}))


def peak_extra(case: str, size: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", case, "--size", str(size)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    data = json.loads(out.strip().splitlines()[-1])
    return data["extra_kib"] / data["tensor_kib"]


def wns_models(weights: list[torch.Tensor]) -> tuple[nn.Module, WeightNormSparsifier]:
    size = weights[0].shape[0]
    model = nn.Sequential(*[nn.Linear(size, size, bias=False) for _ in weights])
    with torch.no_grad():
        for layer, w in zip(model, weights):
            layer.weight.copy_(w)
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(model, [{"tensor_fqn": f"{i}.weight"} for i in range(len(weights))])
    return model, sparsifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="512 x 512 tensors, for a smoke test")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = args.size or (512 if args.quick else 4096)
    if args.memory_child:
        memory_child(args.memory_child, size)
        return
    repeats = args.repeats or (3 if not args.quick else 2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(size, size)
    ones = torch.ones_like(x)
    rows = []

    def row(name: str, case: str, ref_fn: Callable[[], object], ours_fn: Callable[[], object], same: bool) -> None:
        t_ref = median_time(ref_fn, repeats)
        t_ours = median_time(ours_fn, repeats)
        rows.append((name, t_ref, t_ours, same, peak_extra(case, size)))

    ref_l1 = prune.L1Unstructured(amount=0.5)
    row(
        "L1Unstructured(0.5) / l1_unstructured",
        "l1",
        lambda: ref_l1.compute_mask(x, ones),
        ours_for("l1", x),
        same_up_to_ties(ref_l1.compute_mask(x, ones), ours_for("l1", x)(), x.abs()),
    )

    ref_ln = prune.LnStructured(amount=0.5, n=2, dim=0)
    norms = torch.linalg.vector_norm(x, 2, dim=1)[:, None].expand_as(x)
    row(
        "LnStructured(0.5, n=2, dim=0) / ln_structured",
        "ln",
        lambda: ref_ln.compute_mask(x, ones),
        ours_for("ln", x),
        same_up_to_ties(ref_ln.compute_mask(x, ones), ours_for("ln", x)(), norms),
    )

    ref_rand = prune.RandomUnstructured(amount=0.5)
    ours_rand = ours_for("random", x)()
    row(
        "RandomUnstructured(0.5) / random_unstructured (counts)",
        "random",
        lambda: ref_rand.compute_mask(x, ones),
        ours_for("random", x),
        int(ref_rand.compute_mask(x, ones).sum()) == int(ours_rand.sum()),
    )

    weights = [torch.randn(size, size) for _ in range(4)]
    model, sparsifier = wns_models(weights)
    sparsifier.step()
    ref_masks = [layer.parametrizations.weight[0].mask.bool() for layer in model]
    ours_masks = [compute_mask("block", w, **WNS_2_4) for w in weights]
    same = all(same_groups_up_to_ties(r, o, w.abs(), 4) for r, o, w in zip(ref_masks, ours_masks, weights))
    t_ref = median_time(sparsifier.step, repeats)
    t_ours = median_time(lambda: [compute_mask("block", w, **WNS_2_4) for w in weights], repeats)
    rows.append(("WeightNormSparsifier 2:4 step(), 4 weights / block", t_ref, t_ours, same, peak_extra("wns", size)))

    print(f"\n{size}x{size} float32, torch {torch.__version__}, 1 thread, median of {repeats}\n")
    print("| case | reference (s) | ours (s) | speed-up | same masks | our peak extra memory |")
    print("|---|---|---|---|---|---|")
    for name, t_ref, t_ours, same, mem in rows:
        print(
            f"| {name} | {t_ref:.3f} | {t_ours:.3f} | {t_ref / t_ours:.1f}x | {'yes' if same else 'NO'} | {mem:.2f}x |"
        )


if __name__ == "__main__":
    main()
