"""Accuracy at sparsity: one-shot pruning of a small byte-level GPT (SPEC §16, §17; slow, a few minutes).

    python benchmarks/bench_quality.py [--steps 300] [--d-model 256] [--cache /tmp/fxs_quality_gpt.pt]
                                       [--section unstructured|structured|all] [--settings all|mlp|heads]

Structured section (``--section structured``): 50 % and 75 % of every block's MLP neurons, 1 and 2 of its
4 heads removed one-shot by our ``channels`` rules with each ``importance`` with and without
``reconstruct`` (and obs + reconstruct ``sequential``), against FLAP and FLAP + a least-squares refit of
the consumer written out here (:func:`flap_reference`); loss added over dense, its ratio to FLAP + lstsq,
the parameters left, ``step()`` CPU seconds and peak resident growth, and shrunk vs masked max difference.

A 4-layer byte-level GPT is trained (fixed seed) on the Python standard library's ``.py`` files, every
20th file held out; then every Linear but the head is pruned one-shot at 50 % unstructured and 2:4
with magnitude, Wanda and SparseGPT (ours, one pass and ``"sequential": true``), a transcription of
the SparseGPT authors' ``fasterprune`` on the same Hessians, and llm-compressor's SparseGPT kernel
(one pass, and block by block as its sequential pipeline) when ``llmcompressor`` is importable.
Printed: held-out perplexity, loss added over dense (and its ratio to llm-compressor's, else to the
reference's), and the CPU seconds of the pruning step (process time: the machine may be shared; for
``"sequential"`` it includes the calibration passes it re-runs). The trained model is cached (``--cache``).
"""

from __future__ import annotations

import argparse
import copy
import glob
import importlib.util
import math
import os
import sysconfig
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import fx_sparsify as fxs

SEQ = 128


# ---- data ---------------------------------------------------------------------------------------


def stdlib_bytes() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) byte streams of the standard library's .py files; every 20th file held out."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(
        f
        for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
        if "site-packages" not in f and "dist-packages" not in f
    )
    train, held = bytearray(), bytearray()
    for i, path in enumerate(files):
        with open(path, "rb") as f:
            (held if i % 20 == 19 else train).extend(f.read() + b"\n")
    return torch.frombuffer(train, dtype=torch.uint8).long(), torch.frombuffer(held, dtype=torch.uint8).long()


def windows(stream: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    return torch.stack([stream[s : s + SEQ + 1] for s in starts.tolist()])


# ---- model --------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        x = x + self.o(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ByteGPT(nn.Module):
    def __init__(self, d: int = 256, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.zeros(SEQ, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def train(args: argparse.Namespace, data: torch.Tensor) -> ByteGPT:
    torch.manual_seed(0)
    model = ByteGPT(args.d_model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = windows(data, torch.randint(len(data) - SEQ - 1, (args.batch,), generator=gen))
        loss = F.cross_entropy(model(batch[:, :-1]).reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    return model.eval()


@torch.no_grad()
def held_out_loss(model: nn.Module, held: torch.Tensor, n: int) -> float:
    starts = torch.arange(n) * ((len(held) - SEQ - 1) // n)
    total = 0.0
    for chunk in starts.split(64):
        batch = windows(held, chunk)
        logits = model(batch[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1), reduction="sum").item()
    return total / (n * SEQ)


# ---- pruning ------------------------------------------------------------------------------------


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "head"]


def rule(pattern: dict) -> dict:
    return {"weights": [{"target": "type:Linear", **pattern}, {"target": "head", "method": "dense"}]}


def prune_with_spec(
    model: nn.Module, spec: dict, calib: list[torch.Tensor], example: torch.Tensor
) -> tuple[nn.Module, float]:
    """One-shot with our pipeline: calibrate, step, squash into a copy of the model; (model, step seconds)."""
    work = copy.deepcopy(model)
    sgm = fxs.sparsify_graph(work, spec, example_inputs=(example,), inplace=True)
    with torch.no_grad():
        for batch in calib:
            sgm(batch)
        start = time.process_time()
        sgm.step()
        seconds = time.process_time() - start
    sgm.squash_into(work)
    return work, seconds


def hessians(model: nn.Module, calib: list[torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """X·Xᵀ of the input of each layer in ``names`` over the calibration batches (forward hooks)."""
    out: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:

        def hook(module: nn.Module, inp: tuple[torch.Tensor, ...], _: torch.Tensor, name: str = name) -> None:
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            out[name] = out.get(name, 0) + x.T @ x

        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        for batch in calib:
            model(batch)
    for h in hooks:
        h.remove()
    return out


def reference_fasterprune(
    w: torch.Tensor,
    h: torch.Tensor,
    sparsity: float,
    prunen: int,
    prunem: int,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """IST-DASLab/sparsegpt ``SparseGPT.fasterprune``, transcribed (returns the pruned weight, in ``w``'s dtype).

    ``prunen`` 0: unstructured at ``sparsity``; else ``prunen`` of every ``prunem`` pruned. Computed in float32,
    or float64 for a float64 weight (tests/methods/test_sparsegpt.py checks ours against it there to 1e-9).
    """
    W = w.clone().to(torch.promote_types(w.dtype, torch.float32))
    H = h.clone()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w_ = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w_.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w_ - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W.to(w.dtype)


def prune_per_layer(
    model: ByteGPT,
    calib: list[torch.Tensor],
    kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sequential: bool = False,
) -> tuple[nn.Module, float]:
    """A kernel ``kernel(weight, H) -> pruned weight`` on every layer: all from the dense model's Hessians
    (one pass), or block after block as llm-compressor's sequential pipeline does (the Linears of a
    transformer block from one calibration pass over the outputs of the blocks pruned before it)."""
    work = copy.deepcopy(model)
    groups = [[n for n in linear_names(work) if n.startswith(f"blocks.{i}.")] for i in range(len(work.blocks))]
    groups = groups if sequential else [linear_names(work)]
    seconds = 0.0
    for group in groups:
        hs = hessians(work, calib, group)
        start = time.process_time()
        with torch.no_grad():
            for name, h in hs.items():
                layer = work.get_submodule(name)
                layer.weight.copy_(kernel(layer.weight.detach(), h))
        seconds += time.process_time() - start
    return work, seconds


def llmcompressor_kernel(
    sparsity: float, n: int, m: int
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """llm-compressor's SparseGPT weight kernel, when ``llmcompressor`` is importable."""
    try:
        from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight  # type: ignore
    except ImportError:
        try:
            from llmcompressor.modifiers.obcq.sgpt_sparsify import sparsify_weight  # type: ignore
        except ImportError:
            return None

    def kernel(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
        layer.weight.data = w.clone()
        hessian = h * (2.0 / max(float(h.diagonal().mean()), 1e-12))  # any positive scale: damp is relative
        out = sparsify_weight(
            module=layer,
            hessians_dict={layer: hessian},
            sparsity=sparsity,
            prune_n=n,
            prune_m=m,
            block_size=128,
            dampening_frac=0.01,
            preserve_sparsity_mask=False,
        )
        return (out[1] if isinstance(out, tuple) else layer.weight).detach()

    return kernel


def step_times(
    model: ByteGPT,
    calib: list[torch.Tensor],
    example: torch.Tensor,
    pattern: dict,
    kernels: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
    repeats: int,
) -> dict[str, float]:
    """Median CPU seconds, one thread, of pruning every layer once: our ``step()`` (after a fresh
    calibration, not timed) against each kernel on the same Hessians; repeats interleaved."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    hs = hessians(model, calib, linear_names(model))
    weights = {name: model.get_submodule(name).weight.detach() for name in hs}
    times: dict[str, list[float]] = {"ours sparsegpt (one pass)": [], **{name: [] for name in kernels}}
    try:
        for _ in range(repeats):
            sgm = fxs.sparsify_graph(model, rule({"method": "sparsegpt", **pattern}), example_inputs=(example,))
            with torch.no_grad():
                for batch in calib:
                    sgm(batch)
                start = time.process_time()
                sgm.step()
                times["ours sparsegpt (one pass)"].append(time.process_time() - start)
                for name, kernel in kernels.items():
                    start = time.process_time()
                    for layer, h in hs.items():
                        kernel(weights[layer], h)
                    times[name].append(time.process_time() - start)
    finally:
        torch.set_num_threads(threads)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


# ---- structured: channels and heads (SPEC §17) ---------------------------------------------------


SETTINGS = (
    ("50 % MLP neurons", "mlp", 0.5),
    ("75 % MLP neurons", "mlp", 0.75),
    ("1 of 4 heads", "heads", 1),
    ("2 of 4 heads", "heads", 2),
)


def channel_spec(kind: str, amount: float | int, **options: object) -> dict:
    if kind == "mlp":
        return {"channels": [{"target": r"re:blocks\.\d+\.fc1", "sparsity": amount, **options}]}
    return {"channels": [{"target": r"re:blocks\.\d+", "heads": amount, **options}]}


def layer_inputs(model: nn.Module, calib: list[torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Every calibration row of each named layer's input, float64 (``rows × in``)."""
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda m, inp, out, name=name: rows[name].append(inp[0].reshape(-1, inp[0].shape[-1]).double())
        )
        for name in names
    ]
    with torch.no_grad():
        for batch in calib:
            model(batch)
    for h in hooks:
        h.remove()
    return {name: torch.cat(r) for name, r in rows.items()}


def flap_reference(
    model: ByteGPT, calib: list[torch.Tensor], kind: str, amount: float | int, refit: bool
) -> tuple[nn.Module, float]:
    """FLAP (An et al. 2024), one shot, uniform per layer, written out here independently of the package:
    the fluctuation ``var(x_j) · ‖W[:, j]‖²`` of the consumer's (fc2's, o's) input columns, summed per head,
    ranks the units; the lowest go (their producer rows and consumer columns zeroed) and the consumer's bias
    takes their mean contribution. ``refit``: instead, the consumer's kept columns and bias are solved by
    plain least squares (``torch.linalg.lstsq``) on the calibration rows so its output changes least."""
    work = copy.deepcopy(model)
    consumer = "fc2" if kind == "mlp" else "o"
    xs = layer_inputs(work, calib, [f"blocks.{i}.{consumer}" for i in range(len(work.blocks))])
    start = time.process_time()
    with torch.no_grad():
        for i, block in enumerate(work.blocks):
            layer = getattr(block, consumer)
            x, w, b = xs[f"blocks.{i}.{consumer}"], layer.weight.double(), layer.bias.double()
            width = 1 if kind == "mlp" else x.shape[1] // block.heads
            fluct = (x.var(0) * w.square().sum(0)).reshape(-1, width).sum(1)
            units = fluct.numel()
            n_prune = round(amount * units) if isinstance(amount, float) else int(amount)
            pruned = torch.argsort(fluct, stable=True)[:n_prune]
            cols = (pruned.unsqueeze(1) * width + torch.arange(width)).reshape(-1)
            keep = torch.ones(x.shape[1], dtype=torch.bool)
            keep[cols] = False
            producers = [block.fc1] if kind == "mlp" else [block.q, block.k, block.v]
            for p in producers:
                p.weight[cols] = 0
                p.bias[cols] = 0
            if refit:
                a = torch.cat([x[:, keep], torch.ones(len(x), 1, dtype=x.dtype)], 1)
                sol = torch.linalg.lstsq(a, x @ w.T + b).solution
                new_w = torch.zeros_like(w)
                new_w[:, keep] = sol[:-1].T
                layer.weight.copy_(new_w)
                layer.bias.copy_(sol[-1])
            else:
                layer.bias.copy_(b + w[:, ~keep] @ x[:, ~keep].mean(0))
                layer.weight[:, ~keep] = 0
    return work, time.process_time() - start


def _memory_helpers() -> ModuleType:
    """benchmarks/_memory.py, also when this file is loaded by path (tests) rather than run as a script."""
    spec = importlib.util.spec_from_file_location("_bench_memory", Path(__file__).with_name("_memory.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prune_channels(
    model: nn.Module, spec: dict, calib: list[torch.Tensor], example: torch.Tensor, check: torch.Tensor
) -> tuple[nn.Module, float, int, float]:
    """Our pipeline: calibrate, step (timed, CPU s; peak RSS growth), shrink; (shrunk, s, bytes, shrunk vs masked)."""
    memory = _memory_helpers()
    reset_peak, status = memory.reset_peak, memory.status
    sgm = fxs.sparsify_graph(copy.deepcopy(model), spec, example_inputs=(example,))
    with torch.no_grad():
        for batch in calib:
            sgm(batch)
        reset_peak()
        base = status("VmRSS")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # process time of several threads spinning on small products says little
        start = time.process_time()
        try:
            sgm.step()
        finally:
            seconds = time.process_time() - start
            torch.set_num_threads(threads)
        peak = status("VmHWM") - base
        small = sgm.squash(shrink=True)
        diff = float((sgm(check) - small(check)).abs().max())
    return small, seconds, peak, diff


def sparsegpt_step_seconds(model: nn.Module, calib: list[torch.Tensor], example: torch.Tensor, layers: str) -> float:
    """CPU seconds of a sparsegpt step (50 %) on the same consumer layers, after the same calibration."""
    spec = {"weights": [{"target": layers, "method": "sparsegpt", "sparsity": 0.5}]}
    sgm = fxs.sparsify_graph(copy.deepcopy(model), spec, example_inputs=(example,))
    with torch.no_grad():
        for batch in calib:
            sgm(batch)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        start = time.process_time()
        try:
            sgm.step()
        finally:
            seconds = time.process_time() - start
            torch.set_num_threads(threads)
    return seconds


def structured(
    model: ByteGPT,
    held: torch.Tensor,
    calib: list[torch.Tensor],
    example: torch.Tensor,
    dense: float,
    args: argparse.Namespace,
) -> None:
    """Loss added by each importance with and without reconstruction against FLAP and FLAP + least squares."""
    check = calib[0][:4]
    print(
        "| removed | method | loss added | / FLAP + lstsq | parameters | step CPU s | step peak MiB "
        "| shrunk vs masked |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, kind, amount in SETTINGS:
        if args.settings not in ("all", kind):
            continue
        runs: list[tuple[str, Callable[[], tuple[nn.Module, float, int, float]]]] = [
            (
                "FLAP + least-squares refit (reference)",
                lambda: (*flap_reference(model, calib, kind, amount, True), 0, math.nan),
            ),
            ("FLAP (reference)", lambda: (*flap_reference(model, calib, kind, amount, False), 0, math.nan)),
        ]
        for importance in ("magnitude", "activation", "obs"):
            for rec in (False, True):
                options = {"importance": importance, **({"reconstruct": True} if rec else {})}
                runs.append(
                    (
                        f"{importance}{' + reconstruct' if rec else ''}",
                        lambda options=options: prune_channels(
                            model, channel_spec(kind, amount, **options), calib, example, check
                        ),
                    )
                )
        runs.append(
            (
                "obs + reconstruct, sequential",
                lambda: prune_channels(
                    model,
                    channel_spec(kind, amount, importance="obs", reconstruct=True, sequential=True),
                    calib,
                    example,
                    check,
                ),
            )
        )
        reference = math.nan
        for name, fn in runs:
            pruned, seconds, peak, diff = fn()
            added = held_out_loss(pruned, held, args.eval) - dense
            reference = added if math.isnan(reference) else reference
            params = sum(p.numel() for p in pruned.parameters() if p.dim() > 0)
            if name.endswith("(reference)"):
                params = sum(int((p != 0).sum()) if p.dim() > 0 else 1 for p in pruned.parameters())
            print(
                f"| {label} | {name} | {added:+.4f} | {added / reference:.2f}x | {params} | {seconds:.2f} | "
                f"{peak / 2**20:.0f} | {diff:.1e} |",
                flush=True,
            )
    structured_timing(model, calib, example, args.repeats, args.settings)


def structured_timing(
    model: ByteGPT, calib: list[torch.Tensor], example: torch.Tensor, repeats: int, settings: str = "all"
) -> None:
    """CPU seconds of ``step()``, one thread (several threads spin on the sweep's small products and their CPU
    time says more about the machine's load than the work), median of ``repeats`` interleaved: obs +
    reconstruct against a sparsegpt step at 50 % on the same consumer layers, after the same calibration."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    check = calib[0][:4]
    consumers = {
        "mlp": (0.5, r"re:blocks\.\d+\.fc2"),
        "mlp 75 %": (0.75, r"re:blocks\.\d+\.fc2"),
        "heads": (1, r"re:blocks\.\d+\.o$"),
    }
    try:
        for kind, (amount, layers) in consumers.items():
            if settings not in ("all", kind.split()[0]):
                continue
            ours, gpt = [], []
            for _ in range(repeats):
                spec = channel_spec(kind.split()[0], amount, importance="obs", reconstruct=True)
                ours.append(prune_channels(model, spec, calib, example, check)[1])
                gpt.append(sparsegpt_step_seconds(model, calib, example, layers))
            a, b = sorted(ours)[len(ours) // 2], sorted(gpt)[len(gpt) // 2]
            print(
                f"{kind}: step() CPU s, one thread, median of {repeats}: obs + reconstruct {a:.3f} "
                f"(range {min(ours):.3f}-{max(ours):.3f}), sparsegpt 50 % on the consumers {b:.3f} "
                f"(range {min(gpt):.3f}-{max(gpt):.3f}): {a / b:.2f}x",
                flush=True,
            )
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--calib", type=int, default=128, help="calibration windows of 128 bytes")
    parser.add_argument("--eval", type=int, default=512, help="held-out windows of 128 bytes")
    parser.add_argument("--cache", default="/tmp/fxs_quality_gpt.pt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-only", action="store_true", help="train and cache the model, then stop")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (median)")
    parser.add_argument(
        "--section",
        choices=("unstructured", "structured", "all"),
        default="all",
        help="unstructured (weights), structured (channels and heads), or both",
    )
    parser.add_argument(
        "--settings",
        choices=("all", "mlp", "heads"),
        default="all",
        help="structured section: the MLP-neuron settings, the head settings, or both",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_data, held = stdlib_bytes()
    print(f"stdlib: {len(train_data) / 1e6:.1f} MB train, {len(held) / 1e6:.1f} MB held out")
    key = f"{args.cache}.{args.d_model}.{args.steps}.{args.batch}.{args.lr}"
    if os.path.exists(key):
        model = ByteGPT(args.d_model)
        model.load_state_dict(torch.load(key))
        model.eval()
    else:
        print(f"training a {args.d_model}-wide 4-layer byte GPT for {args.steps} steps ...")
        model = train(args, train_data)
        torch.save(model.state_dict(), key)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")
    if args.train_only:
        return
    gen = torch.Generator().manual_seed(2)
    calib_windows = windows(train_data, torch.randint(len(train_data) - SEQ - 1, (args.calib,), generator=gen))[:, :-1]
    calib = list(calib_windows.split(32))
    example = calib[0][:2]
    dense = held_out_loss(model, held, args.eval)
    print(f"\ndense: perplexity {math.exp(dense):.3f}\n")
    if args.section in ("structured", "all"):
        structured(model, held, calib, example, dense, args)
    if args.section == "structured":
        return
    print("| method | pattern | perplexity | loss added | added / first row's | step CPU s |")
    print("|---|---|---|---|---|---|")
    for label, pattern, n, m in (("50 %", {"sparsity": 0.5}, 0, 0), ("2:4", {"n": 2, "m": 4}, 2, 4)):
        sparsity = pattern.get("sparsity", 0.0)

        nm_method = {"method": "nm", "n": 2, "m": 4}
        runs: list[tuple[str, Callable[[], tuple[nn.Module, float]]]] = [
            (
                "magnitude",
                lambda: prune_with_spec(
                    model, rule({"method": "l1_unstructured", **pattern} if not n else nm_method), calib, example
                ),
            ),
            (
                "wanda",
                lambda: prune_with_spec(
                    model,
                    rule(
                        {"method": "l1_unstructured", **pattern, "scores": "wanda"}
                        if not n
                        else {**nm_method, "scores": "wanda"}
                    ),
                    calib,
                    example,
                ),
            ),
            (
                "SparseGPT reference (fasterprune)",
                lambda: prune_per_layer(
                    model, calib, lambda w, h: reference_fasterprune(w, h, sparsity, m - n if n else 0, m)
                ),
            ),
            (
                "ours sparsegpt (one pass)",
                lambda: prune_with_spec(model, rule({"method": "sparsegpt", **pattern}), calib, example),
            ),
            (
                "ours sparsegpt, sequential",
                lambda: prune_with_spec(
                    model, rule({"method": "sparsegpt", **pattern, "sequential": True}), calib, example
                ),
            ),
        ]
        kernel = llmcompressor_kernel(sparsity, n, m)
        if kernel is not None:
            runs.insert(3, ("llm-compressor SparseGPT kernel", lambda: prune_per_layer(model, calib, kernel)))
            runs.append(
                (
                    "llm-compressor SparseGPT kernel, block by block (its pipeline)",
                    lambda: prune_per_layer(model, calib, kernel, sequential=True),
                )
            )
        reference = "llm-compressor SparseGPT kernel" if kernel is not None else "SparseGPT reference (fasterprune)"
        runs.sort(key=lambda r: r[0] != reference)  # the reference first: the ratios are to its added loss
        ref_added = math.nan
        for name, fn in runs:
            start = time.perf_counter()
            pruned, seconds = fn()
            loss = held_out_loss(pruned, held, args.eval)
            added = loss - dense
            ref_added = added if math.isnan(ref_added) else ref_added
            print(
                f"| {name} | {label} | {math.exp(loss):.3f} | {added:.4f} | {added / ref_added:.2f}x | {seconds:.2f} |"
                f"  ({time.perf_counter() - start:.0f} s in all)",
                flush=True,
            )
        kernels = {
            "SparseGPT reference (fasterprune)": lambda w, h: reference_fasterprune(
                w, h, sparsity, m - n if n else 0, m
            )
        }
        if kernel is not None:
            kernels["llm-compressor SparseGPT kernel"] = kernel
        timed = step_times(model, calib, example, pattern, kernels, args.repeats)
        ours = timed["ours sparsegpt (one pass)"]
        print(
            f"\n{label}: CPU seconds to prune every layer (one thread, median of {args.repeats}): "
            + ", ".join(f"{name} {t:.2f} s ({t / ours:.2f}x ours)" for name, t in timed.items())
            + "\n",
            flush=True,
        )


if __name__ == "__main__":
    main()
