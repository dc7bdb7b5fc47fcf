"""Peak extra memory of a whole pruning pipeline, ours against torch's pruning tools (SPEC §15).

    python benchmarks/bench_memory.py             # 8 x Linear(4096, 4096), float32 (512 MiB): the goals' size
    python benchmarks/bench_memory.py --quick     # 8 x Linear(2048, 2048), float32 (128 MiB)
    python benchmarks/bench_memory.py --llama     # also a ~1.1 B-parameter LLaMA in bf16 (slow; needs [models])

Each pipeline runs in a fresh subprocess on the same model (seeded), after a warm-up on a tiny model
(so imports and first-call allocations do not count). The peak is the process's VmHWM; it is reset
(``/proc/self/clear_refs``) once the model is built, so "extra" is the peak resident memory above the
process with its model, printed as a multiple of the model's size. The pipeline is
sparsify → step (50 % L1 unstructured on every Linear) → one eval forward (batch 8, no_grad) → squash,
keeping the sparse module and the squashed one alive to the end, as a user would:

- ``ours default``: ``sparsify_graph(model, spec)`` (the user's model is copied and left unchanged);
- ``ours inplace=True``: no copy, mask nodes in the graph;
- ``ours inplace + mode inplace``: no copy, weights zeroed in place, no multiply in the graph;
- ``torch.nn.utils.prune``: ``l1_unstructured`` on each layer → forward → ``prune.remove``;
- ``torch.ao.pruning``: ``WeightNormSparsifier`` (50 %, its default 1x4 blocks) prepare → step →
  forward → ``squash_mask``.

``--llama``: ``LlamaForCausalLM`` from a config (hidden 2048, 22 layers, intermediate 5632, vocab
32000, bf16, random init), ``inplace=True`` export capture → Wanda calibration on 4 sequences of 128
tokens → 50 % step → squash → ``save_compressed``, with each stage's time and the peak RSS.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import torch
from torch import nn

from _memory import reset_peak, status  # noqa: E402  (benchmarks/ is on sys.path)

GOALS = {"ours default": 2.3, "ours inplace=True": 1.35, "ours inplace + mode inplace": 0.35}
PIPELINES = (
    "ours default",
    "ours inplace=True",
    "ours inplace + mode inplace",
    "torch.nn.utils.prune",
    "torch.ao.pruning",
)
SPEC: dict[str, Any] = {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": 0.5}]}


def stack(layers: int, dim: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(dim, dim) for _ in range(layers)]).eval()


def _ours(model: nn.Module, x: torch.Tensor, inplace: bool, mode: str) -> list[Any]:
    import fx_sparsify as fxs

    sgm = fxs.sparsify_graph(model, {**SPEC, "mode": mode}, inplace=inplace)
    sgm.step()
    sgm.eval()
    with torch.no_grad():
        sgm(x)
    return [sgm, sgm.squash()]


def _prune(model: nn.Module, x: torch.Tensor) -> list[Any]:
    from torch.nn.utils import prune

    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for m in layers:
        prune.l1_unstructured(m, "weight", amount=0.5)
    with torch.no_grad():
        model(x)
    for m in layers:
        prune.remove(m, "weight")
    return [model]


def _ao(model: nn.Module, x: torch.Tensor) -> list[Any]:
    from torch.ao.pruning import WeightNormSparsifier

    sparsifier = WeightNormSparsifier(sparsity_level=0.5)
    sparsifier.prepare(
        model, [{"tensor_fqn": f"{n}.weight"} for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    )
    sparsifier.step()
    with torch.no_grad():
        model(x)
    sparsifier.squash_mask()
    return [model, sparsifier]


RUNS: dict[str, Callable[[nn.Module, torch.Tensor], list[Any]]] = {
    "ours default": lambda m, x: _ours(m, x, False, "graph"),
    "ours inplace=True": lambda m, x: _ours(m, x, True, "graph"),
    "ours inplace + mode inplace": lambda m, x: _ours(m, x, True, "inplace"),
    "torch.nn.utils.prune": _prune,
    "torch.ao.pruning": _ao,
}


def child(name: str, layers: int, dim: int) -> dict[str, float]:
    """Run one pipeline in this (fresh) process; its peak extra memory and time."""
    RUNS[name](stack(2, 64), torch.randn(2, 64))  # warm-up: imports, first-call allocations
    gc.collect()
    model = stack(layers, dim)
    size = sum(p.nbytes for p in model.parameters())
    x = torch.randn(8, dim)
    gc.collect()
    base = status("VmRSS")
    reset_peak()
    start = time.perf_counter()
    keep = RUNS[name](model, x)
    seconds = time.perf_counter() - start
    peak = status("VmHWM")
    del keep
    return {"extra": (peak - base) / size, "seconds": seconds, "model_mib": size / 2**20}


def llama(seq: int = 128, batches: int = 4, hidden: int = 2048, layers: int = 22, intermediate: int = 5632) -> None:
    """The ~1.1 B LLaMA pipeline of the issue, one process, stage times and peak RSS."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:  # pragma: no cover
        raise ImportError("--llama needs transformers: pip install fx-sparsify[models]") from exc
    import fx_sparsify as fxs

    times: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - start
        print(
            f"  {name:<12} {times[name]:8.1f} s   RSS {status('VmRSS') / 2**30:6.2f} GiB   "
            f"peak {status('VmHWM') / 2**30:6.2f} GiB",
            flush=True,
        )
        return out

    cfg = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly (no fp32 copy of 1.1 B parameters)
    try:
        model = stage("build", lambda: LlamaForCausalLM(cfg).eval())
    finally:
        torch.set_default_dtype(default)
    size = sum(p.nbytes for p in model.parameters())
    print(f"  model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, {size / 2**30:.2f} GiB bf16")
    gc.collect()
    base = status("VmRSS")  # the process with its model; the peak from here on
    reset_peak()
    ids = torch.randint(0, cfg.vocab_size, (1, seq))
    spec = {
        "weights": [
            {
                "target": "re:model\\.layers\\.\\d+\\..*proj",
                "method": "l1_unstructured",
                "sparsity": 0.5,
                "scores": "wanda",
            }
        ],
        "mode": "inplace",
    }
    sgm = stage(
        "capture",
        lambda: fxs.sparsify_graph(
            model, spec, example_kwargs={"input_ids": ids, "use_cache": False}, capture="export", inplace=True
        ),
    )

    def calibrate() -> None:
        with torch.no_grad():
            for i in range(batches):
                sgm(
                    input_ids=torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(i)),
                    use_cache=False,
                )

    stage("calibrate", calibrate)
    stage("step", sgm.step)
    out = stage("squash", sgm.squash)
    with tempfile.TemporaryDirectory() as tmp:
        stage("save", lambda: fxs.save_compressed(out, os.path.join(tmp, "model.safetensors")))
    peak = status("VmHWM")
    print(
        f"  peak RSS {peak / 2**30:.2f} GiB; peak extra above the process with its model "
        f"{(peak - base) / size:.2f}x the model; total {sum(times.values()):.0f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="8 x Linear(2048, 2048): fixed-size chunk temporaries weigh more against a smaller model",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per pipeline (median)")
    parser.add_argument("--only", nargs="*", choices=PIPELINES, help="run only these pipelines")
    parser.add_argument("--llama", action="store_true", help="also the ~1.1 B LLaMA pipeline (slow, needs [models])")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.layers, args.dim = 8, 2048
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.dim)))
        return
    rows = []
    for name in args.only or PIPELINES:
        results = []
        for _ in range(args.repeats):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", name, "--layers", str(args.layers), "--dim", str(args.dim)],
                capture_output=True,
                text=True,
                check=True,
            )
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        results.sort(key=lambda r: r["extra"])
        r = results[len(results) // 2]
        goal = GOALS.get(name)
        rows.append((name, r["extra"], goal, r["seconds"]))
        verdict = "" if goal is None else f"goal <= {goal:.2f}x {'met' if r['extra'] <= goal else 'MISSED'}"
        print(f"{name:<30} {r['extra']:5.2f}x  {verdict:<22} {r['seconds']:6.2f} s", flush=True)
    print(
        f"\nmodel: {args.layers} x Linear({args.dim}, {args.dim}) float32 = {r['model_mib']:.0f} MiB; "
        "extra = peak RSS above the process with its model, as a multiple of the model"
    )
    print("\n| pipeline | peak extra memory | goal |\n|---|---|---|")
    for name, extra, goal, _ in rows:
        print(f"| {name} | {extra:.2f} × | {'≤ %.2f ×' % goal if goal else ''} |")
    if args.llama:
        print("\nLLaMA ~1.1 B, bf16 (export capture, inplace=True, mode inplace, Wanda scores):")
        llama()


if __name__ == "__main__":
    main()
