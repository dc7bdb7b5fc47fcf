"""Sparse storage and compressed checkpoints (SPEC §11) against dense PyTorch / safetensors, in one process.

    python benchmarks/bench_storage.py            # layers 4096x4096 and 11008x4096, the 4-layer MLP, one thread
    python benchmarks/bench_storage.py --quick    # 1024-wide smoke run (seconds)
    python benchmarks/bench_storage.py --full     # adds 4096x11008 layers, batch 64; gzip -6 (default: gzip -1)
    python benchmarks/bench_storage.py --bitmask  # the bitmask kernel: LLaMA-7B MLP shapes, fp32 / bf16,
                                                  # 1 and all threads
    python benchmarks/bench_storage.py --e2e      # LLaMA-shaped ~1.1 B model, greedy decoding, dense vs auto

Prints markdown tables:
1. per layer shape / sparsity / batch: our CSR layer (``SparseLinear``: int32 indices, ``addmv`` /
   ``addmm``) and BSR 16x16 (on a 16x16 block pattern) against dense ``F.linear``, as time ratios;
2. a 4-layer MLP of 4096x11008 / 11008x4096 layers at 90 % and 50 % unstructured sparsity:
   ``squash(storage="auto", batch_size=B)`` against ``squash()`` at batch B, and what auto picked;
3. checkpoint sizes: ``save_compressed`` (and with zstd when ``zstandard`` is installed) against the
   dense safetensors file and gzip of it;
4. load times, each one load in a fresh process (what a program pays at start): ``load_compressed``
   into an initialised model against ``model.load_state_dict(safetensors.torch.load_file(...))``, and
   to a state dict against ``load_file`` (and compressed-tensors' ``load_compressed`` where it is
   installed). Every tensor is summed once after the load. A dense ``load_file`` maps the file:
   its tensors are the page cache itself, while a decoded tensor needs new memory (its page faults
   alone are most of our to-state-dict time); into a model both sides write the same memory.

Times are medians of interleaved repeats; the ratios are what to read. The machine this was written
on is shared and noisy (2 cores): expect ±20 % between runs.
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import fx_sparsify as fxs
from fx_sparsify import _native
from fx_sparsify.passes.sparse_storage import SparseLinear

from _timing import interleaved  # noqa: E402  (benchmarks/ is on sys.path)

warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")


def pruned(shape: tuple[int, int], sparsity: float, block: int = 1) -> torch.Tensor:
    """A random weight with exactly that fraction of zeros (in ``block``x``block`` blocks when block > 1)."""
    rows, cols = shape[0] // block, shape[1] // block
    w = torch.randn(shape)
    keep = torch.ones(rows * cols, dtype=torch.bool)
    keep[torch.randperm(rows * cols)[: round(sparsity * rows * cols)]] = False
    keep = keep.view(rows, cols).repeat_interleave(block, 0).repeat_interleave(block, 1)
    return w * keep + 0.0


def layer_table(shapes: list[tuple[int, int]], sparsities: list[float], batches: list[int], repeats: int) -> str:
    lines = [
        "| layer (out x in) | zeros | batch | dense ms | CSR / dense | BSR 16x16 / dense |",
        "|---|---|---|---|---|---|",
    ]
    for shape in shapes:
        for s in sparsities:
            w, b = pruned(shape, s), torch.randn(shape[0])
            wb = pruned(shape, s, block=16)
            csr = SparseLinear(w, b, "csr")
            bsr = SparseLinear(wb, b, "bsr", 16)
            for n in batches:
                x = torch.randn(n, shape[1])
                with torch.inference_mode():
                    t = interleaved(
                        {
                            "dense": lambda: F.linear(x, w, b),
                            "csr": lambda: csr(x),
                            "dense_b": lambda: F.linear(x, wb, b),
                            "bsr": lambda: bsr(x),
                        },
                        repeats,
                    )
                lines.append(
                    f"| {shape[0]}x{shape[1]} | {s:.0%} | {n} | {t['dense'] * 1e3:.2f} | "
                    f"{t['csr'] / t['dense']:.2f}x | {t['bsr'] / t['dense_b']:.2f}x |"
                )
    return "\n".join(lines)


class MLP4(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, h), nn.Linear(h, d), nn.Linear(d, h), nn.Linear(h, d)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def mlp_table(
    d: int, h: int, sparsities: list[float], batches: list[int], repeats: int, models: dict[float, Any]
) -> str:
    lines = ["| MLP | zeros | batch | dense ms | auto / dense | auto picked |", "|---|---|---|---|---|---|"]
    for s in sparsities:
        torch.manual_seed(0)
        spec = {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": s}]}
        sgm = fxs.sparsify_graph(MLP4(d, h).eval(), spec)
        sgm.step()
        dense = sgm.squash()
        models[s] = dense
        for n in batches:
            auto = sgm.squash(storage="auto", batch_size=n)
            picked = ", ".join(c.storage for c in auto.storage_choices)
            x = torch.randn(n, d)
            with torch.inference_mode():
                torch.testing.assert_close(auto(x), dense(x), atol=1e-3, rtol=1e-3)
                t = interleaved(
                    {"dense": lambda: dense(x), "auto": lambda auto=auto: auto(x)}, repeats
                )  # auto is deleted below
            lines.append(
                f"| 4x {d}x{h} | {s:.0%} | {n} | {t['dense'] * 1e3:.1f} | {t['auto'] / t['dense']:.2f}x | {picked} |"
            )
            del auto
        del sgm
    return "\n".join(lines)


def checkpoint_tables(models: dict[float, nn.Module], repeats: int, gzip_level: int, tmp: Path) -> str:
    try:
        import zstandard  # noqa: F401

        has_zstd = True
    except ModuleNotFoundError:
        has_zstd = False
    try:
        import compressed_tensors as ct
    except Exception:  # noqa: BLE001 - optional reference tool, any import failure means "not there"
        ct = None
    sizes = [
        "| model | zeros | dense safetensors MB | ours / dense | ours+zstd-3 / dense "
        f"| gzip -{gzip_level} of dense / dense |",
        "|---|---|---|---|---|---|",
    ]
    loads = [
        "| model | zeros | dense into model ms | ours / dense | dense to state dict ms | ours / dense "
        "| compressed-tensors to state dict / dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for s, model in models.items():
        state = model.state_dict()
        dense_path, ours_path, z_path = tmp / "dense.safetensors", tmp / "ours.safetensors", tmp / "z.safetensors"
        save_file(state, str(dense_path))
        fxs.save_compressed(state, ours_path)
        dense_bytes = dense_path.stat().st_size
        ours = ours_path.stat().st_size / dense_bytes
        zs = "-"
        if has_zstd:
            fxs.save_compressed(state, z_path, zstd=3)
            zs = f"{z_path.stat().st_size / dense_bytes:.3f}x"
        gz = f"{len(gzip.compress(dense_path.read_bytes(), compresslevel=gzip_level)) / dense_bytes:.3f}x"
        name = f"{len(state) // 2} layers, {sum(v.numel() for v in state.values()) / 1e6:.0f}M params"
        sizes.append(f"| {name} | {s:.0%} | {dense_bytes / 2**20:.0f} | {ours:.3f}x | {zs} | {gz} |")

        paths = {"dense": dense_path, "ours": ours_path}
        modes = ["dense_model", "ours_model", "dense_sd", "ours_sd"]
        if ct is not None:
            paths["ct"] = tmp / "ct.safetensors"
            ct.save_compressed(dict(state), paths["ct"], compression_format="sparse-bitmask")
            modes.append("ct_sd")
        runs: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(repeats):  # interleaved: machine noise hits all alike
            for mode in modes:
                runs[mode].append(load_in_child(mode, paths[mode.split("_")[0]], dense_path))
        t = {m: statistics.median(v) for m, v in runs.items()}
        ct_ratio = f"{t['ct_sd'] / t['dense_sd']:.2f}x" if "ct_sd" in t else "-"
        loads.append(
            f"| {name} | {s:.0%} | {t['dense_model'] * 1e3:.0f} | {t['ours_model'] / t['dense_model']:.2f}x | "
            f"{t['dense_sd'] * 1e3:.0f} | {t['ours_sd'] / t['dense_sd']:.2f}x | {ct_ratio} |"
        )
    return "\n".join(sizes) + "\n\n" + "\n".join(loads)


def load_in_child(mode: str, path: Path, dense_path: Path) -> float:
    """Seconds of one load in a fresh process: what a user pays when a program starts (see ``_load_child``)."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--load-child",
            mode,
            str(path),
            str(dense_path),
            "--threads",
            str(torch.get_num_threads()),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.split()[-1])


def _load_child(mode: str, path: str, dense_path: str) -> None:
    """One load, timed: into a model whose tensors are allocated and written (an initialised model),
    or to a state dict; either way every tensor is summed once after (a lazily mapped file is only
    read when its pages are touched)."""
    with safe_open(dense_path, "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    holder = nn.Module()
    for key, shape in shapes.items():
        *owners, leaf = key.split(".")
        mod = holder
        for part in owners:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, nn.Parameter(torch.empty(shape).fill_(1.0), requires_grad=False))

    def dense_into_model() -> dict[str, torch.Tensor]:
        holder.load_state_dict(load_file(path))
        return holder.state_dict()

    loads = {
        "dense_model": dense_into_model,
        "ours_model": lambda: fxs.load_compressed(path, holder).state_dict(),
        "dense_sd": lambda: load_file(path),
        "ours_sd": lambda: fxs.load_compressed(path),
    }
    if mode == "ct_sd":
        import compressed_tensors as ct

        loads["ct_sd"] = lambda: dict(ct.load_compressed(path, ct.BitmaskConfig()))
    start = time.perf_counter()
    for v in loads[mode]().values():
        v.sum()
    print(time.perf_counter() - start)


# --- bitmask storage (SPEC §18) ----------------------------------------------------------------------------
def two_four(shape: tuple[int, int]) -> torch.Tensor:
    """A random weight pruned 2:4 along its rows (the two largest of every 4 kept)."""
    w = torch.randn(shape)
    groups = w.abs().view(shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return w * keep.view(shape) + 0.0


#: the clock of the bitmask tables: wall time, or (``--clock cpu``, one thread only) this thread's CPU time,
#: which a descheduled thread does not accrue (on a loaded machine the wall clock mostly measures the queue)
CLOCK = {"wall": time.perf_counter, "cpu": time.thread_time}
clock = time.perf_counter


def ratios(fns: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    """Per round (interleaved, after a warm-up), each function's time / the first's: the median and range."""
    for fn in fns.values():
        fn()
    names = list(fns)
    rounds: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        t = {}
        for n in names:
            start = clock()
            fns[n]()
            t[n] = clock() - start
        for n in names:
            rounds[n].append(t[n] / t[names[0]] if n != names[0] else t[n])
    return rounds


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def bitmask_table(
    shapes: list[tuple[int, int]],
    sparsities: list[Any],
    batches: list[int],
    dtypes: list[torch.dtype],
    threads: list[int],
    repeats: int,
) -> str:
    """Dense F.linear, torch CSR (our SparseLinear: int32 indices, addmv / addmm) and the bitmask layer,
    as time ratios to dense (median of interleaved rounds, range in brackets), and the byte-ratio limit.
    The bitmask layer's buffers are on transparent huge pages (as the layer makes them); the last column
    compares it with dense F.linear on a weight given huge pages too (THP_MEM_ALLOC_ENABLE=1 gives that
    to every large torch tensor)."""
    from fx_sparsify._bitmask import BitmaskLinear

    lines = [
        "| threads | dtype | layer (out x in) | zeros | batch | dense ms | torch CSR / dense | bitmask / dense "
        "| byte limit | bitmask / dense on huge pages |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for dtype in dtypes:
            for shape in shapes:
                for s in sparsities:
                    torch.manual_seed(0)
                    w = (two_four(shape) if s == "2:4" else pruned(shape, s)).to(dtype)
                    zeros = 0.5 if s == "2:4" else s
                    ours = BitmaskLinear(w, None)
                    wh = _native.empty_on_huge_pages(w.numel(), w.dtype).view(w.shape).copy_(w)
                    csr = SparseLinear(w, None, "csr") if dtype == torch.float32 else None
                    limit = ((1 - zeros) * w.element_size() + 1 / 8) / w.element_size()
                    for n in batches:
                        x = torch.randn(n, shape[1]).to(dtype)
                        fns = {
                            "dense": lambda: F.linear(x, w),
                            "ours": lambda: ours(x),
                            "huge": lambda: F.linear(x, wh),
                        }
                        if csr is not None:
                            fns["csr"] = lambda: csr(x)
                        with torch.inference_mode():
                            r = ratios(fns, repeats)
                        vs_huge = [a / b for a, b in zip(r["ours"], r["huge"])]
                        label = "2:4" if s == "2:4" else f"{s:.0%}"
                        lines.append(
                            f"| {n_threads} | {str(dtype)[6:]} | {shape[0]}x{shape[1]} | {label} | {n} | "
                            f"{statistics.median(r['dense']) * 1e3:.2f} | "
                            f"{_cell(r['csr']) if 'csr' in r else '-'} | {_cell(r['ours'])} | {limit:.2f}x | "
                            f"{_cell(vs_huge)} |"
                        )
    return "\n".join(lines)


def end_to_end(
    layers: int, hidden: int, inter: int, new_tokens: int, repeats: int, dtype: torch.dtype = torch.float32
) -> str:
    """A LLaMA-shaped Hugging Face model from a config (random weights), every decoder Linear pruned 50 %
    (magnitude, per tensor), greedy decoding tokens/s on the current threads: dense against each Linear in
    the storage squash(storage="auto") takes for it at batch 1 (timed per distinct shape by the same
    measurement auto uses; the layers of one shape share the decision)."""
    import transformers

    from fx_sparsify._bitmask import BitmaskLinear
    from fx_sparsify.passes.sparse_storage import MARGIN, measure

    cfg = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval().to(dtype)
    params = sum(p.numel() for p in model.parameters())
    linears = [(name, m) for name, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for _, m in linears:
            w = m.weight
            cut = w.abs().flatten().kthvalue(w.numel() // 2).values
            w.mul_(w.abs() > cut).add_(0.0)
    decided: dict[tuple[int, int], str] = {}
    for _name, m in linears:
        shape = tuple(m.weight.shape)
        if shape not in decided:
            candidate = BitmaskLinear(m.weight, m.bias)
            t_dense, t_sparse = measure(m.weight.detach(), m.bias, candidate, 1)
            decided[shape] = f"bitmask ({t_sparse / t_dense:.2f}x)" if t_sparse / t_dense <= MARGIN else "dense"
    sparse_model = transformers.LlamaForCausalLM(cfg).eval().to(dtype)
    sparse_model.load_state_dict(model.state_dict())
    for name, m in list(sparse_model.model.layers.named_modules()):
        if isinstance(m, nn.Linear) and decided[tuple(m.weight.shape)] != "dense":
            parent, _, child = name.rpartition(".")
            sparse_model.model.layers.get_submodule(parent).add_module(child, BitmaskLinear(m.weight, m.bias))
    ids = torch.randint(0, cfg.vocab_size, (1, 8))

    def generate(mdl: nn.Module) -> torch.Tensor:
        return mdl.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    with torch.inference_mode():
        same = torch.equal(generate(model), generate(sparse_model))
        r = ratios({"dense": lambda: generate(model), "sparse": lambda: generate(sparse_model)}, repeats)
    dense_tps = new_tokens / statistics.median(r["dense"])
    speed = [1 / v for v in r["sparse"]]
    return (
        f"LLaMA-shaped model: {layers} layers, hidden {hidden}, intermediate {inter}, {params / 1e9:.2f} B params "
        f"({str(dtype)[6:]}), decoder Linears pruned 50 %; {torch.get_num_threads()} thread(s); greedy decoding of "
        f"{new_tokens} tokens after 8, {repeats} interleaved rounds\n\n"
        f"| model | tokens/s | vs dense |\n|---|---|---|\n| dense | {dense_tps:.2f} | 1.00x |\n"
        f"| auto ({', '.join(f'{k[0]}x{k[1]}: {v}' for k, v in decided.items())}) | "
        f"{dense_tps * statistics.median(speed):.2f} | {statistics.median(speed):.2f}x "
        f"({min(speed):.2f}-{max(speed):.2f}) |\n\nsame greedy tokens as dense: {same}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024-wide layers and MLP (smoke run)")
    parser.add_argument("--full", action="store_true", help="all shapes, batch 64 and gzip of the whole MLP")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--checkpoints-only",
        action="store_true",
        help="only the checkpoint tables, on random weights of the MLP's shapes",
    )
    parser.add_argument(
        "--bitmask", action="store_true", help="only the bitmask kernel table (LLaMA-7B MLP shapes; --quick: 1024x2752)"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCK),
        default="wall",
        help="bitmask tables and e2e: wall time, or the thread's CPU time (one thread only)",
    )
    parser.add_argument("--e2e", action="store_true", help="only the end-to-end LLaMA-shaped decoding figure")
    parser.add_argument("--e2e-size", default="22,2048,5632", help="layers,hidden,intermediate (default ~1.1 B)")
    parser.add_argument("--e2e-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--load-child", nargs=3, metavar=("MODE", "PATH", "DENSE_PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.load_child:
        _load_child(*args.load_child)
        return
    if args.bitmask or args.e2e:
        _bitmask_main(args)
        return
    torch.manual_seed(0)
    if args.quick:
        shapes, d, h, batches, repeats = [(1024, 1024)], 1024, 2752, [1, 8], 3
    else:
        shapes, d, h, batches, repeats = [(4096, 4096), (11008, 4096)], 4096, 11008, [1, 8], args.repeats
    if args.full:
        shapes.append((4096, 11008))
        batches = [1, 8, 64]
    if args.checkpoints_only:
        models = {}
        for s in (0.9, 0.5):
            mlp = MLP4(d, h)
            with torch.no_grad():
                for layer in mlp.layers:
                    layer.weight.copy_(pruned(tuple(layer.weight.shape), s))
            models[s] = mlp
        with tempfile.TemporaryDirectory() as tmp:
            print(checkpoint_tables(models, max(3, repeats // 2), 6 if args.full or args.quick else 1, Path(tmp)))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); medians of {repeats} interleaved repeats; "
        "shared machine: expect +-20 % noise\n"
    )
    print("## Sparse layers against dense F.linear\n")
    print(layer_table(shapes, [0.5, 0.7, 0.9], batches, repeats) + "\n")
    print("## 4-layer MLP: squash(storage='auto') against squash()\n")
    models: dict[float, Any] = {}
    print(mlp_table(d, h, [0.9, 0.5], batches, repeats, models) + "\n")
    print("## Checkpoints: sizes and load times\n")
    with tempfile.TemporaryDirectory() as tmp:
        print(checkpoint_tables(models, max(3, repeats // 2), 6 if args.full or args.quick else 1, Path(tmp)))


def _bitmask_main(args: argparse.Namespace) -> None:
    global clock
    clock = CLOCK[args.clock]
    cores = os.cpu_count() or 1
    print(
        f"torch {torch.__version__}; CPU: {_cpu_name()}, {cores} cores; bitmask kernel path: "
        f"{_native.bitmask_isa()}; load average {os.getloadavg()[0]:.1f} at start; clock: {args.clock}\n"
    )
    if args.bitmask:
        if args.quick:
            shapes, sparsities, batches, repeats = [(2752, 1024), (1024, 2752)], [0.5, 0.9], [1, 8], 5
        else:
            shapes, sparsities, batches, repeats = (
                [(11008, 4096), (4096, 11008)],
                [0.5, 0.7, 0.9, "2:4"],
                [1, 8, 32],
                args.repeats,
            )
        threads = sorted({args.threads, cores}) if args.clock == "wall" else [1]
        print(f"## Bitmask layers against dense F.linear (threads {threads})\n")
        print(bitmask_table(shapes, sparsities, batches, [torch.float32, torch.bfloat16], threads, repeats) + "\n")
    if args.e2e:
        torch.set_num_threads(args.threads)
        layers, hidden, inter = (2, 512, 1376) if args.quick else (int(v) for v in args.e2e_size.split(","))
        print("## End to end\n")
        print(
            end_to_end(
                layers,
                hidden,
                inter,
                8 if args.quick else 16,
                3 if args.quick else max(3, args.repeats // 2),
                getattr(torch, args.e2e_dtype),
            )
        )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
