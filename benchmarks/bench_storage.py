"""Sparse storage and compressed checkpoints (SPEC §11) against dense PyTorch / safetensors, in one process.

    python benchmarks/bench_storage.py            # layers 4096x4096 and 11008x4096, the 4-layer MLP, one thread
    python benchmarks/bench_storage.py --quick    # 1024-wide smoke run (seconds)
    python benchmarks/bench_storage.py --full     # adds 4096x11008 layers, batch 64; gzip -6 (default: gzip -1)

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
    lines = ["| layer (out x in) | zeros | batch | dense ms | CSR / dense | BSR 16x16 / dense |",
             "|---|---|---|---|---|---|"]
    for shape in shapes:
        for s in sparsities:
            w, b = pruned(shape, s), torch.randn(shape[0])
            wb = pruned(shape, s, block=16)
            csr = SparseLinear(w, b, "csr")
            bsr = SparseLinear(wb, b, "bsr", 16)
            for n in batches:
                x = torch.randn(n, shape[1])
                with torch.inference_mode():
                    t = interleaved({"dense": lambda: F.linear(x, w, b), "csr": lambda: csr(x),
                                     "dense_b": lambda: F.linear(x, wb, b), "bsr": lambda: bsr(x)}, repeats)
                lines.append(f"| {shape[0]}x{shape[1]} | {s:.0%} | {n} | {t['dense'] * 1e3:.2f} | "
                             f"{t['csr'] / t['dense']:.2f}x | {t['bsr'] / t['dense_b']:.2f}x |")
    return "\n".join(lines)


class MLP4(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, h), nn.Linear(h, d), nn.Linear(d, h), nn.Linear(h, d)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def mlp_table(d: int, h: int, sparsities: list[float], batches: list[int], repeats: int,
              models: dict[float, Any]) -> str:
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
                t = interleaved({"dense": lambda: dense(x), "auto": lambda auto=auto: auto(x)}, repeats)  # auto is deleted below
            lines.append(f"| 4x {d}x{h} | {s:.0%} | {n} | {t['dense'] * 1e3:.1f} | {t['auto'] / t['dense']:.2f}x "
                         f"| {picked} |")
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
    sizes = ["| model | zeros | dense safetensors MB | ours / dense | ours+zstd-3 / dense "
             f"| gzip -{gzip_level} of dense / dense |",
             "|---|---|---|---|---|---|"]
    loads = ["| model | zeros | dense into model ms | ours / dense | dense to state dict ms | ours / dense "
             "| compressed-tensors to state dict / dense |", "|---|---|---|---|---|---|---|"]
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
        loads.append(f"| {name} | {s:.0%} | {t['dense_model'] * 1e3:.0f} | {t['ours_model'] / t['dense_model']:.2f}x | "
                     f"{t['dense_sd'] * 1e3:.0f} | {t['ours_sd'] / t['dense_sd']:.2f}x | {ct_ratio} |")
    return "\n".join(sizes) + "\n\n" + "\n".join(loads)


def load_in_child(mode: str, path: Path, dense_path: Path) -> float:
    """Seconds of one load in a fresh process: what a user pays when a program starts (see ``_load_child``)."""
    out = subprocess.run([sys.executable, __file__, "--load-child", mode, str(path), str(dense_path),
                          "--threads", str(torch.get_num_threads())], capture_output=True, text=True, check=True)
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

    loads = {"dense_model": dense_into_model, "ours_model": lambda: fxs.load_compressed(path, holder).state_dict(),
             "dense_sd": lambda: load_file(path), "ours_sd": lambda: fxs.load_compressed(path)}
    if mode == "ct_sd":
        import compressed_tensors as ct

        loads["ct_sd"] = lambda: dict(ct.load_compressed(path, ct.BitmaskConfig()))
    start = time.perf_counter()
    for v in loads[mode]().values():
        v.sum()
    print(time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024-wide layers and MLP (smoke run)")
    parser.add_argument("--full", action="store_true", help="all shapes, batch 64 and gzip of the whole MLP")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--checkpoints-only", action="store_true",
                        help="only the checkpoint tables, on random weights of the MLP's shapes")
    parser.add_argument("--load-child", nargs=3, metavar=("MODE", "PATH", "DENSE_PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.load_child:
        _load_child(*args.load_child)
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
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); medians of {repeats} interleaved repeats; "
          "shared machine: expect +-20 % noise\n")
    print("## Sparse layers against dense F.linear\n")
    print(layer_table(shapes, [0.5, 0.7, 0.9], batches, repeats) + "\n")
    print("## 4-layer MLP: squash(storage='auto') against squash()\n")
    models: dict[float, Any] = {}
    print(mlp_table(d, h, [0.9, 0.5], batches, repeats, models) + "\n")
    print("## Checkpoints: sizes and load times\n")
    with tempfile.TemporaryDirectory() as tmp:
        print(checkpoint_tables(models, max(3, repeats // 2), 6 if args.full or args.quick else 1, Path(tmp)))


if __name__ == "__main__":
    main()
