"""Gradual pruning of an MLP on procedurally drawn digits: dense training, a cubic schedule to 80 %
sparsity while training (``step()`` every few iterations), then fine-tuning at the final masks.

    python examples/gradual_pruning.py            # the default run (well under a minute on a laptop CPU)
    python examples/gradual_pruning.py --full     # the long run: more data, longer training (a few minutes)
    python examples/gradual_pruning.py --quick    # a tiny setting (a few seconds; the test suite runs this)
    python examples/gradual_pruning.py --mode inplace   # ASP-style: zeroed weights, no multiply in the graph

The data are seven-segment digits drawn on a 8 x 8 canvas with a random shift, stroke dropout and
pixel noise, generated here (no download). The schedule is ``torch.ao.pruning``'s ``CubicSL`` curve:
``s_t = s_f · (1 - (1 - t / n)³)`` for ``t = 0 … n`` ``step()`` calls.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import fx_sparsify as fxs

SIZE = 8
# segments of a seven-segment display: (row0, col0, row1, col1) of each stroke on a 7 x 5 glyph
_SEGMENTS = {
    "a": (0, 0, 0, 4),
    "b": (0, 4, 3, 4),
    "c": (3, 4, 6, 4),
    "d": (6, 0, 6, 4),
    "e": (3, 0, 6, 0),
    "f": (0, 0, 3, 0),
    "g": (3, 0, 3, 4),
}
_DIGITS = ["abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg"]


def _glyphs() -> torch.Tensor:
    """(10, 7, 5) binary glyphs of the digits 0-9."""
    out = torch.zeros(10, 7, 5)
    for d, segs in enumerate(_DIGITS):
        for s in segs:
            r0, c0, r1, c1 = _SEGMENTS[s]
            out[d, r0 : r1 + 1, c0 : c1 + 1] = 1.0
    return out


def make_digits(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy digit images (flattened, ``SIZE * SIZE``) and their labels."""
    glyphs = _glyphs()
    labels = torch.randint(0, 10, (n,), generator=generator)
    strokes = glyphs[labels] * (torch.rand(n, 7, 5, generator=generator) > 0.15)  # stroke dropout
    images = torch.zeros(n, SIZE, SIZE)
    rows = torch.randint(0, SIZE - 7 + 1, (n,), generator=generator)
    cols = torch.randint(0, SIZE - 5 + 1, (n,), generator=generator)
    for i in range(n):  # random placement on the canvas
        images[i, rows[i] : rows[i] + 7, cols[i] : cols[i] + 5] = strokes[i]
    images += 0.25 * torch.randn(n, SIZE, SIZE, generator=generator)
    return images.reshape(n, -1), labels


class MLP(nn.Module):
    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.fc1 = nn.Linear(SIZE * SIZE, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def batches(x: torch.Tensor, y: torch.Tensor, size: int, generator: torch.Generator):
    """Endless shuffled mini-batches."""
    while True:
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x) - size + 1, size):
            idx = order[i : i + size]
            yield x[idx], y[idx]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a tiny setting that runs in a few seconds")
    size.add_argument("--full", action="store_true", help="the long run: more data and training (a few minutes)")
    parser.add_argument("--mode", choices=("graph", "inplace"), default="graph")
    parser.add_argument("--sparsity", type=float, default=0.8)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    setting = "quick" if args.quick else "full" if args.full else "default"
    n_train, n_test, hidden = {"quick": (3000, 1000, 128), "default": (6000, 2000, 256), "full": (40000, 4000, 256)}[
        setting
    ]
    dense_iters, prune_steps, every, finetune_iters = {
        "quick": (250, 10, 15, 100),
        "default": (600, 12, 25, 300),
        "full": (3000, 30, 60, 2000),
    }[setting]
    print(
        f"{setting} run: {n_train} training digits, MLP hidden={hidden}, {dense_iters} dense iterations, "
        f"{prune_steps + 1} step() calls every {every} iterations, {finetune_iters} fine-tuning iterations",
        flush=True,
    )
    x_train, y_train = make_digits(n_train, gen)
    x_test, y_test = make_digits(n_test, gen)
    data = batches(x_train, y_train, 64, gen)

    model = MLP(hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)

    def train(net: nn.Module, iters: int, on_iter=None) -> None:
        for i in range(iters):
            if on_iter is not None:
                on_iter(i)
            xb, yb = next(data)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(xb), yb).backward()
            opt.step()

    # 1. dense training
    train(model, dense_iters)
    results = {"dense": accuracy(model, x_test, y_test)}
    print(f"accuracy before pruning (dense):      {results['dense']:.1%}")

    # 2. gradual pruning: step() every `every` iterations, the cubic schedule reaches the final sparsity
    #    at the (prune_steps + 1)-th step() (t = 0 … prune_steps)
    spec = {
        "seed": 0,
        "mode": args.mode,
        "weights": [
            {
                "target": "type:Linear",
                "method": "l1_unstructured",
                "sparsity": args.sparsity,
                "schedule": {
                    "kind": "cubic",
                    "init_sparsity": 0.0,
                    "init_step": 0,
                    "delta_step": 1,
                    "total_steps": prune_steps,
                },
            },
            {"target": "head", "method": "dense"},  # keep the classifier dense
        ],
    }
    sgm = fxs.sparsify_graph(model, spec)
    sgm.train()
    # the optimizer keeps its momentum: the sparse module shares nothing with `model`, so rebuild it
    opt = torch.optim.AdamW(sgm.parameters(), lr=1e-3, weight_decay=1e-4)
    if args.mode == "inplace":
        sgm.keep_sparse(opt)  # re-zero the pruned weights after every optimizer step

    def maybe_step(i: int) -> None:
        if i % every == 0:
            sgm.step()
            done = {k: v for k, v in sgm.sparsity().items() if k != "head.weight"}
            print(
                f"  step {i // every + 1}/{prune_steps + 1}: sparsity {sum(done.values()) / len(done):.1%}", flush=True
            )

    train(sgm, (prune_steps + 1) * every, maybe_step)
    pruned = {k: v for k, v in sgm.sparsity().items() if k != "head.weight"}
    results["pruned"] = accuracy(sgm, x_test, y_test)
    results["sparsity"] = sum(pruned.values()) / len(pruned)
    print(f"accuracy after pruning ({results['sparsity']:.0%} sparse): {results['pruned']:.1%}")

    # 3. fine-tuning at the final masks (no more step())
    train(sgm, finetune_iters)
    results["finetuned"] = accuracy(sgm, x_test, y_test)
    print(f"accuracy after fine-tuning:           {results['finetuned']:.1%}")

    # 4. squash: a plain module with the zeros folded into the weights, same predictions
    squashed = sgm.squash()
    model.load_state_dict(squashed.state_dict())
    results["squashed"] = accuracy(model, x_test, y_test)
    assert results["squashed"] == results["finetuned"]
    print(sgm.report())
    print(f"final sparsity: {results['sparsity']:.1%} (fc1, fc2); squashed model accuracy {results['squashed']:.1%}")
    return results


if __name__ == "__main__":
    main()
