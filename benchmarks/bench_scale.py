"""Scale: two ranks against one, and streamed pruning against the in-memory pipeline (docs/scale.md).

    python benchmarks/bench_scale.py                 # everything (~15-25 min on a shared 2-core machine)
    python benchmarks/bench_scale.py --ranks         # 2 gloo ranks vs 1 process: equality, solve time
    python benchmarks/bench_scale.py --streamed      # LLaMA-shaped model from a config, sharded safetensors
    python benchmarks/bench_scale.py --quick         # smaller models, one repeat (a smoke run)
    python benchmarks/bench_scale.py --model         # the memory model of docs/scale.md against measured peaks
    python benchmarks/bench_scale.py --plan C K CS   # its LLaMA-70B predictions (C, CS in MiB and K from --model)
    python benchmarks/bench_scale.py --small-sequential  # sequential SparseGPT in memory vs streamed, 3 runs each

``--ranks``: each of 2 processes (gloo, one thread each) calibrates on its half of the batches, one process
(one thread) on all of them; masks must be equal and weights within 1e-5 (float32): one-pass SparseGPT +
Wanda + activation rules on an MLP, sequential SparseGPT on a small LLaMA. The solve phase (``step()``
alone, between barriers; wall and CPU seconds) of six Linear(2048, 2048) layers reading one input (one level of solves):
2 ranks against 1, repeats interleaved, medians.

``--streamed``: ``LlamaForCausalLM`` from a config (hidden 1024, 16 layers, intermediate 2816, vocab 32000,
float32: 271 M parameters, 1.01 GiB), random weights saved as sharded safetensors (``save_pretrained``).
Each pipeline runs in a fresh process after a warm-up; its peak is VmHWM above the RSS after the imports
(the interpreter's baseline), as a multiple of the model's bytes:
- in memory: ``from_pretrained`` → ``sparsify_graph`` (export capture, the default copy) → calibration
  → ``step`` → ``squash`` → ``save_compressed``;
- streamed: ``prune_streamed`` into a folder.
50 % magnitude on every projection (outputs compared exactly), and 50 % sequential SparseGPT (outputs
equal within 1e-4 on a smaller LLaMA, hidden 256, 4 layers, where the in-memory sequential run is quick).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from _memory import reset_peak, status

PROJ = "re:model\\.layers\\.\\d+\\.(mlp|self_attn)\\.\\w+_proj"
MAGNITUDE = {"weights": [{"target": PROJ, "method": "l1_unstructured", "sparsity": 0.5}]}
SPARSEGPT = {"weights": [{"target": PROJ, "method": "sparsegpt", "sparsity": 0.5, "sequential": True}]}
ONE_PASS: dict[str, Any] = {
    "weights": [
        {"target": "fc1", "method": "sparsegpt", "sparsity": 0.5},
        {"target": "fc2", "method": "l1_unstructured", "sparsity": 0.5, "scores": "wanda"},
    ],
    "activations": [
        {"target": "head", "aggregate": "sq_sum", "reduce": "mean", "mask": "l1_unstructured", "sparsity": 0.25}
    ],
}
CONFIGS = {
    "large": {
        "hidden_size": 1024,
        "num_hidden_layers": 16,
        "intermediate_size": 2816,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": 32000,
    },
    "small": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "intermediate_size": 704,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 1000,
    },
    "medium": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "intermediate_size": 1408,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "vocab_size": 8000,
    },
}


# --- models --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(d, 2 * d), nn.Linear(2 * d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Fan(nn.Module):
    """``n`` Linear layers reading one input: one level of ``n`` SparseGPT solves."""

    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(layer(x) for layer in self.layers)  # type: ignore[return-value]


def llama_config(name: str) -> Any:
    import transformers

    return transformers.LlamaConfig(**CONFIGS[name], bos_token_id=0, eos_token_id=0, max_position_embeddings=512)


def llama_batches(cfg: Any, n: int, seq: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, cfg.vocab_size, (1, seq), generator=g)} for _ in range(n)]


# --- two ranks -----------------------------------------------------------------------------------------
def _results(sgm: Any) -> dict[str, Any]:
    return {
        "masks": {k: v.clone() for k, v in sgm.masks().items()},
        "params": {k: v.detach().clone() for k, v in sgm.named_parameters()},
    }


def _equality_runs(rank: int, world: int) -> dict[str, Any]:
    import fx_sparsify as fxs

    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, 64, generator=g) for _ in range(8)]
    torch.manual_seed(0)
    sgm = fxs.sparsify_graph(MLP(), ONE_PASS)
    for x in xs[rank::world]:
        sgm(x)
    sgm.step()
    out = {"one pass (SparseGPT, Wanda, activations)": _results(sgm)}
    import transformers

    cfg = llama_config("small")
    cfg.num_hidden_layers = 2
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    batches = [{**b, "use_cache": False} for b in llama_batches(cfg, 4, 32)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for label, extra in (("float32", {}), ("float64 Hessians", {"hessian_dtype": "float64"})):
        model.load_state_dict(state)
        spec = {"weights": [{**SPARSEGPT["weights"][0], **extra}]}
        sgm = fxs.sparsify_graph(model, spec, example_kwargs=batches[0])
        for b in batches[rank::world]:
            sgm(**b)
        sgm.step()
        out[f"sequential SparseGPT (LLaMA), {label}"] = _results(sgm)
    return out


def _solve_time(rank: int, world: int, n: int, d: int) -> tuple[float, float]:
    import torch.distributed as dist

    import fx_sparsify as fxs

    torch.manual_seed(0)
    spec = {"weights": [{"target": "re:layers\\.\\d+", "method": "sparsegpt", "sparsity": 0.5, "sequential": True}]}
    sgm = fxs.sparsify_graph(Fan(n, d), spec)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(64, d, generator=g) for _ in range(4)]
    for x in xs[rank::world]:
        sgm(x)
    if world > 1:
        dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    sgm.step(verbose=False)
    cpu = time.process_time() - cpu  # this rank's own CPU seconds: its share of the work, whatever the load
    if world > 1:
        dist.barrier()
    return time.perf_counter() - start, cpu


def rank_child(rank: int, world: int, port: int, out: str, n: int, d: int, equality: bool) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    if world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=600),
        )
    try:
        wall, cpu = _solve_time(rank, world, n, d)
        result: dict[str, Any] = {"solve_s": wall, "cpu_s": cpu}
        if equality:
            result["runs"] = _equality_runs(rank, world)
        torch.save(result, Path(out) / f"w{world}r{rank}.pt")
    finally:
        if world > 1:
            dist.destroy_process_group()


def _spawn(world: int, out: str, n: int, d: int, equality: bool) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    mp.start_processes(rank_child, args=(world, port, out, n, d, equality), nprocs=world, start_method="spawn")
    return [torch.load(Path(out) / f"w{world}r{r}.pt") for r in range(world)]


def ranks(quick: bool) -> None:
    n, d, repeats = (6, 512, 1) if quick else (6, 2048, 3)
    print(
        f"== 2 gloo ranks vs 1 process (one thread each; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        one = _spawn(1, tmp, n, d, equality=True)[0]
        two = _spawn(2, tmp, n, d, equality=True)
        for name, want in one["runs"].items():
            same = all(torch.equal(r["runs"][name]["masks"][k], m) for r in two for k, m in want["masks"].items())
            worst = max(
                float((r["runs"][name]["params"][k] - p).abs().max()) for r in two for k, p in want["params"].items()
            )
            print(f"  {name:<42} masks equal: {same}   max |weight difference|: {worst:.2e}   (goal: equal, <= 1e-5)")
        times: dict[int, list[float]] = {1: [one["solve_s"]], 2: [max(r["solve_s"] for r in two)]}
        cpu: dict[int, list[float]] = {1: [one["cpu_s"]], 2: [max(r["cpu_s"] for r in two)]}
        for _ in range(repeats - 1):
            got = _spawn(1, tmp, n, d, equality=False)[0]
            times[1].append(got["solve_s"])
            cpu[1].append(got["cpu_s"])
            pair = _spawn(2, tmp, n, d, equality=False)
            times[2].append(max(r["solve_s"] for r in pair))
            cpu[2].append(max(r["cpu_s"] for r in pair))
    one_s, two_s = statistics.median(times[1]), statistics.median(times[2])
    print(
        f"  solve phase, {n} x SparseGPT Linear({d}, {d}), step() between barriers, wall: 1 rank {one_s:.2f} s "
        f"[{min(times[1]):.2f}-{max(times[1]):.2f}], 2 ranks {two_s:.2f} s [{min(times[2]):.2f}-{max(times[2]):.2f}]: "
        f"{two_s / one_s:.2f}x (goal <= 0.6x); load average {os.getloadavg()[0]:.1f}"
    )
    one_c, two_c = statistics.median(cpu[1]), statistics.median(cpu[2])
    print(
        f"  CPU seconds of the busier rank: 1 rank {one_c:.2f} s, 2 ranks {two_c:.2f} s: {two_c / one_c:.2f}x "
        "(the work each rank does; wall time reaches it only with a free core per rank)"
    )


# --- streamed ------------------------------------------------------------------------------------------
def _warm_up() -> None:
    """Imports and first-call allocations, on a tiny LLaMA through both pipelines, before the baseline."""
    import transformers

    import fx_sparsify as fxs

    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        transformers.LlamaForCausalLM(cfg).save_pretrained(Path(tmp) / "c")
        batches = [{"input_ids": torch.randint(1, 64, (1, 8))}]
        fxs.prune_streamed(
            lambda: transformers.LlamaForCausalLM(cfg), Path(tmp) / "c", MAGNITUDE, batches, Path(tmp) / "o"
        )
        _in_memory(Path(tmp) / "c", MAGNITUDE, batches, Path(tmp) / "m")


def _in_memory(ckpt: Path, spec: dict[str, Any], batches: list[dict[str, Any]], out: Path) -> None:
    import transformers

    import fx_sparsify as fxs

    model = transformers.LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    calls = [{**b, "use_cache": False} for b in batches]
    sgm = fxs.sparsify_graph(model, spec, example_kwargs=calls[0])
    if any(r.get("method") == "sparsegpt" or r.get("scores") == "wanda" for r in spec["weights"]):
        with torch.no_grad():
            for b in calls:
                sgm(**b)
    sgm.step()
    small = sgm.squash()
    out.mkdir(parents=True, exist_ok=True)
    fxs.save_compressed(small, out / "model.safetensors")


def pipeline_child(kind: str, config: str, spec_name: str, ckpt: str, out: str, batches: int, seq: int) -> None:
    torch.set_num_threads(1)
    import transformers

    import fx_sparsify as fxs
    from fx_sparsify._streamed_io import mmap_large_allocations

    _warm_up()
    cfg = llama_config(config)
    spec = MAGNITUDE if spec_name == "magnitude" else SPARSEGPT
    data = llama_batches(cfg, batches, seq)
    gc.collect()
    base = status("VmRSS")
    reset_peak()
    start = time.perf_counter()
    if kind == "streamed":  # as fx-sparsify run --stream runs it: glibc's mmap threshold fixed at 1 MiB
        mmap_large_allocations()
        fxs.prune_streamed(lambda: transformers.LlamaForCausalLM(cfg), Path(ckpt), spec, data, Path(out))
    else:
        _in_memory(Path(ckpt), spec, data, Path(out))
    seconds = time.perf_counter() - start
    print(json.dumps({"peak": status("VmHWM") - base, "seconds": seconds}))


def _run_child(*args: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _compare(a: Path, b: Path) -> float:
    import fx_sparsify as fxs

    got, want = fxs.load_compressed(a), fxs.load_compressed(b / "model.safetensors")
    assert got.keys() == want.keys(), set(got) ^ set(want)
    return max(float((got[k].float() - want[k].float()).abs().max()) for k in want)


def streamed(quick: bool) -> None:
    import transformers

    config = "small" if quick else "large"
    batches, seq = (2, 64) if quick else (4, 128)
    cfg = llama_config(config)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
        size = sum(p.nbytes for p in model.parameters())
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(ckpt, max_shard_size="200MB")
        del model
        print(
            f"== LLaMA-shaped {config} config: {params / 1e6:.0f} M parameters, {size / 2**30:.2f} GiB float32, "
            f"{len(list(ckpt.glob('*.safetensors')))} shards; {batches} x {seq} tokens; one thread; "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        )
        for spec_name in ("magnitude", "sparsegpt"):
            rows = {}
            for kind in ("in memory", "streamed"):
                out = Path(tmp) / f"{kind.replace(' ', '_')}-{spec_name}"
                rows[kind] = (
                    _run_child(kind.replace(" ", "_"), config, spec_name, str(ckpt), str(out), str(batches), str(seq))
                    if not (spec_name == "sparsegpt" and kind == "in memory" and config == "large")
                    else None
                )
            for kind, row in rows.items():
                if row is not None:
                    print(
                        f"  {spec_name:<10} {kind:<10} peak {row['peak'] / size:5.2f}x the model "
                        f"({row['peak'] / 2**20:7.0f} MiB)   {row['seconds']:7.1f} s"
                    )
            if rows["in memory"] is not None:
                diff = _compare(Path(tmp) / f"streamed-{spec_name}", Path(tmp) / f"in_memory-{spec_name}")
                ratio = rows["streamed"]["seconds"] / rows["in memory"]["seconds"]
                print(
                    f"  {spec_name:<10} streamed / in memory time {ratio:.2f}x (goal <= 1.3x); max |difference| "
                    f"{diff:.2e} (goal: {'0' if spec_name == 'magnitude' else '<= 1e-4'})"
                )
        if config == "large":
            small_sequential(tmp)


def small_sequential(tmp: str, repeats: int = 3) -> None:
    """Sequential SparseGPT on the small config, in memory vs streamed: runs interleaved, medians and ranges."""
    import transformers

    print(
        f"== sequential SparseGPT, small config (in memory is quick there); {repeats} interleaved runs each, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    small = Path(tmp) / "small"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(llama_config("small")).save_pretrained(small)
    times: dict[str, list[float]] = {"in_memory": [], "streamed": []}
    peaks: dict[str, list[float]] = {"in_memory": [], "streamed": []}
    for r in range(repeats):
        for k in times:
            out = Path(tmp) / f"s-{k}-{r}"
            row = _run_child(k, "small", "sparsegpt", str(small), str(out), "4", "128")
            times[k].append(row["seconds"])
            peaks[k].append(row["peak"])
    diff = _compare(Path(tmp) / "s-streamed-0", Path(tmp) / "s-in_memory-0")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(
            f"  {k:<10} {med[k]:6.2f} s [{min(v):.2f}-{max(v):.2f}], peak {statistics.median(peaks[k]) / 2**20:.0f} MiB"
        )
    print(
        f"  streamed / in memory {med['streamed'] / med['in_memory']:.2f}x (goal <= 1.3x); "
        f"max |difference| {diff:.2e} (goal <= 1e-4); load average now {os.getloadavg()[0]:.1f}"
    )


# --- the memory and time model (docs/scale.md) -----------------------------------------------------------
def block_bytes(h: int, inter: int, heads: int, kv: int, b: int) -> int:
    """A LLaMA block's projection weights in bytes (q, o: h x h; k, v: h x kv * head_dim; gate, up, down)."""
    return b * (2 * h * h + 2 * h * (h // heads) * kv + 3 * h * inter)


def predict(
    h: int,
    inter: int,
    heads: int,
    kv: int,
    vocab: int,
    b: int,
    batches: int,
    seq: int,
    method: str,
    ranks: int = 1,
    c: float = 0.0,
    k: float = 0.0,
    cs: float = 0.0,
) -> dict[str, float]:
    """Peak bytes of prune_streamed on one rank: max(first inputs, one block) + c.

    block = k * W (its weights, bool masks, the capture and the save's temporaries: k fitted) + the largest
    level's SparseGPT statistic and solve (d_in^2 x 8: the float64 sum while the replay adds batches; then the
    float32 statistic and the solve's one float32 copy, which it inverts in place, and 2 fp32 copies of the
    weight) + calibration activations (batches / ranks x seq x h, which sequential rules replay) + one
    batch's activations inside the block + cs (SparseGPT's fixed costs: its observers and replays, LAPACK's
    workspaces; fitted). first inputs = the embedding table + the activations.
    """
    w = block_bytes(h, inter, heads, kv, b)
    mine = -(-batches // ranks)
    acts = mine * seq * h * b  # sequential rules replay the same held inputs (no recorded copy when streamed)
    inside = seq * (3 * inter + 4 * h) * 4 + heads * seq * seq * 4
    hessian = 2 * inter * inter * 4 + 2 * h * inter * 4 if method == "sparsegpt" else 0
    block = k * w + hessian + acts + inside + (cs if method == "sparsegpt" else 0.0)
    first = vocab * h * b + acts
    return {"peak": c + max(block, first), "block": w, "hessian": hessian, "activations": acts, "inside": inside}


FIT = ("small", "medium")  # the magnitude runs that fit (c, k); every other run checks the model
FIT_SPARSEGPT = "small"  # the SparseGPT run that fits cs


def model_check() -> None:
    """Measured streamed peaks against the model: (c, k) fitted on two magnitude runs, cs on the smallest
    SparseGPT run, the rest predicted."""
    import transformers

    runs = [("small", "magnitude"), ("medium", "magnitude"), ("large", "magnitude"), ("small", "sparsegpt")]
    runs.append(("medium", "sparsegpt"))
    if "--with-large-sparsegpt" in sys.argv:  # ~5 min more on a loaded 2-core machine
        runs.append(("large", "sparsegpt"))
    measured: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("small", "medium", "large"):
            torch.manual_seed(0)
            transformers.LlamaForCausalLM(llama_config(name)).save_pretrained(Path(tmp) / name, max_shard_size="200MB")
        for name, method in runs:
            row = _run_child(
                "streamed", name, method, str(Path(tmp) / name), str(Path(tmp) / f"o-{name}-{method}"), "4", "128"
            )
            measured[(name, method)] = row["peak"]
            print(
                f"  measured {name:<7} {method:<10} {row['peak'] / 2**20:7.1f} MiB ({row['seconds']:.0f} s)", flush=True
            )

    def args(name: str) -> tuple[int, int, int, int, int]:
        c = CONFIGS[name]
        return (
            c["hidden_size"],
            c["intermediate_size"],
            c["num_attention_heads"],
            c["num_key_value_heads"],
            c["vocab_size"],
        )

    base = [predict(*args(n), 4, 4, 128, "magnitude") for n in FIT]
    extra = [measured[(n, "magnitude")] - b["activations"] - b["inside"] for n, b in zip(FIT, base)]
    k = (extra[1] - extra[0]) / (base[1]["block"] - base[0]["block"])
    c = extra[0] - k * base[0]["block"]
    fit = FIT_SPARSEGPT
    cs = measured[(fit, "sparsegpt")] - predict(*args(fit), 4, 4, 128, "sparsegpt", c=c, k=k)["peak"]
    print(
        f"  fitted on {FIT} magnitude: c = {c / 2**20:.1f} MiB, k = {k:.2f} x the block's weights; "
        f"on {fit} sparsegpt: cs = {cs / 2**20:.1f} MiB"
    )
    for name, method in runs:
        guess = predict(*args(name), 4, 4, 128, method, c=c, k=k, cs=cs)["peak"]
        got = measured[(name, method)]
        fitted = (method == "magnitude" and name in FIT) or (method == "sparsegpt" and name == fit)
        print(
            f"  {name:<7} {method:<10} predicted {guess / 2**20:7.1f} MiB, measured {got / 2**20:7.1f} MiB: "
            f"{guess / got:.2f}x" + ("  (fit)" if fitted else "")
        )


def plan(c: float, k: float, cs: float) -> None:
    """LLaMA-70B (hidden 8192, 80 blocks, intermediate 28672, 64 heads, 8 kv heads, vocab 128256, bf16)."""
    for label, ranks, batches in (("1 CPU process", 1, 128), ("4 GPUs", 4, 128), ("8 GPUs", 8, 128)):
        p = predict(8192, 28672, 64, 8, 128256, 2, batches, 2048, "sparsegpt", ranks=ranks, c=c, k=k, cs=cs)
        print(
            f"  {label:<14} peak per rank {p['peak'] / 2**30:6.1f} GiB (block {p['block'] / 2**30:.2f} GiB, "
            f"Hessian + solve {p['hessian'] / 2**30:.2f} GiB, activations {p['activations'] / 2**30:.2f} GiB)"
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, config, spec_name, ckpt, out, batches, seq = sys.argv[2:9]
        pipeline_child(kind, config, spec_name, ckpt, out, int(batches), int(seq))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", action="store_true")
    parser.add_argument("--streamed", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", action="store_true", help="the memory model against measured peaks")
    parser.add_argument("--with-large-sparsegpt", action="store_true", help="--model: SparseGPT on the large config")
    parser.add_argument("--plan", nargs=3, type=float, metavar=("C_MIB", "K", "CS_MIB"), help="LLaMA-70B predictions")
    parser.add_argument("--small-sequential", action="store_true", help="only the small sequential comparison")
    args = parser.parse_args()
    if args.small_sequential:
        with tempfile.TemporaryDirectory() as tmp:
            small_sequential(tmp)
        return
    if args.model:
        model_check()
        return
    if args.plan:
        plan(args.plan[0] * 2**20, args.plan[1], args.plan[2] * 2**20)
        return
    both = not (args.ranks or args.streamed)
    if args.ranks or both:
        ranks(args.quick)
    if args.streamed or both:
        streamed(args.quick)


if __name__ == "__main__":
    main()
