"""The sparsified pipeline against the tools a user would otherwise use, in one process.

    python benchmarks/bench_pipeline.py             # full sizes (a few minutes)
    python benchmarks/bench_pipeline.py --quick     # small sizes, few repeats (< 60 s)
    python benchmarks/bench_pipeline.py --write     # also write benchmarks/RESULTS_pipeline.md

Every row is the median of repeated timings, and its ratio against the plain (unpruned) model
measured in the same process. The contenders, all at 50 % unstructured L1 sparsity:

- ``prune``: ``torch.nn.utils.prune.l1_unstructured`` (a forward-pre-hook recomputes ``weight * mask``);
- ``ao``: ``torch.ao.pruning.WeightNormSparsifier.prepare`` + ``step`` (a parametrization that
  recomputes ``weight * mask`` on every access of ``.weight``);
- ``ours``: ``fx_sparsify.sparsify_graph`` after ``step()`` (mask nodes in the graph);
- ``squashed``: ``sgm.squash()`` (a plain GraphModule with the masks folded into the weights).

Sections: (1) an MLP of 4096 x 4096 Linears, eval forward and a training step; (2) an
``nn.TransformerEncoder`` eval forward (export capture); (3) an ``EmbeddingBag(1_000_000, 64)``
lookup, without and with autograd; (4) capture + passes time of ``sparsify_graph`` against graph size.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.ao.pruning import WeightNormSparsifier
from torch.nn.utils import prune

import fx_sparsify as fxs
from fx_sparsify import _native

from _timing import interleaved  # noqa: E402  (benchmarks/ is on sys.path)

SPARSITY = 0.5
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_pipeline.md")


@dataclass(frozen=True)
class Sizes:
    mlp_width: int
    mlp_layers: int
    mlp_batch: int
    tf_d_model: int
    tf_heads: int
    tf_layers: int
    tf_batch: int
    tf_seq: int
    emb_rows: int
    emb_dim: int
    emb_bags: int
    emb_per_bag: int
    capture_layers: tuple[int, int]
    capture_width: int
    repeats: int
    capture_repeats: int


FULL = Sizes(4096, 4, 64, 512, 8, 4, 16, 128, 1_000_000, 64, 4096, 20, (1000, 3000), 8, 15, 5)
QUICK = Sizes(1024, 2, 64, 128, 4, 2, 8, 64, 100_000, 64, 1024, 20, (100, 300), 8, 5, 1)


# --- timing --------------------------------------------------------------------------------------
def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def ratio_rows(results: dict[str, float], base: str, notes: dict[str, str] | None = None) -> list[list[str]]:
    notes = notes or {}
    return [[name, fmt_ms(t), f"{t / results[base]:.2f}x", notes.get(name, "")] for name, t in results.items()]


def check_close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Each contender must compute its masked model; a wrong one would make its timing meaningless."""
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise AssertionError(
            f"{name}: output differs from its masked reference (max abs diff {(got - want).abs().max().item():.3g})"
        )


def folded(model: nn.Module, plain: nn.Module) -> nn.Module:
    """``plain`` with the masked weights of a prune / parametrize model written in (``model`` untouched).

    The masks of the tools may differ where magnitudes tie exactly, so each contender is checked against
    its own masks.
    """
    ref = copy.deepcopy(plain)
    with torch.no_grad():
        for fqn, module in model.named_modules():
            names = [
                h._tensor_name for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)
            ]
            for name in names:
                masked = getattr(module, f"{name}_orig") * getattr(module, f"{name}_mask")
                ref.get_submodule(fqn).get_parameter(name).copy_(masked)
            if torch.nn.utils.parametrize.is_parametrized(module):
                for name in module.parametrizations:
                    ref.get_submodule(fqn).get_parameter(name).copy_(getattr(module, name))
    return ref


def check_contenders(models: dict[str, nn.Module], plain: nn.Module, *inputs: torch.Tensor) -> None:
    """prune / ao: equal to themselves folded; ours (both): equal to the plain model with squashed weights."""
    ours = copy.deepcopy(plain)
    ours.load_state_dict(models["ours (squashed)"].state_dict())
    with torch.no_grad():
        for name, model in models.items():
            if name.startswith("ours"):
                check_close(name, model(*inputs), ours(*inputs))
            elif name in ("prune", "ao (parametrize)"):
                check_close(name, model(*inputs), folded(model, plain)(*inputs))


# --- contenders ----------------------------------------------------------------------------------
def linear_spec(target: str = "type:Linear") -> dict[str, Any]:
    return {"weights": [{"target": target, "method": "l1_unstructured", "sparsity": SPARSITY}]}


def with_prune(model: nn.Module, params: list[tuple[str, str]]) -> nn.Module:
    model = copy.deepcopy(model)
    for module, name in params:
        prune.l1_unstructured(model.get_submodule(module), name, amount=SPARSITY)
    return model


def with_ao(model: nn.Module, modules: list[str]) -> nn.Module:
    model = copy.deepcopy(model)
    sparsifier = WeightNormSparsifier(sparsity_level=SPARSITY, sparse_block_shape=(1, 1), zeros_per_block=1)
    sparsifier.prepare(model, [{"tensor_fqn": f"{m}.weight"} for m in modules])
    sparsifier.step()
    return model


def with_ours(model: nn.Module, spec: dict[str, Any], **kwargs: Any) -> tuple[nn.Module, nn.Module]:
    sgm = fxs.sparsify_graph(model, spec, **kwargs)
    sgm.step()
    return sgm, sgm.squash()


# --- 1. MLP ----------------------------------------------------------------------------------------
def bench_mlp(s: Sizes) -> str:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(s.mlp_layers):
        layers.append(nn.Linear(s.mlp_width, s.mlp_width))
        if i < s.mlp_layers - 1:
            layers.append(nn.ReLU())
    plain = nn.Sequential(*layers)
    linears = [n for n, m in plain.named_modules() if isinstance(m, nn.Linear)]
    x = torch.randn(s.mlp_batch, s.mlp_width)
    models = {
        "plain": plain,
        "prune": with_prune(plain, [(m, "weight") for m in linears]),
        "ao (parametrize)": with_ao(plain, linears),
    }
    models["ours (unsquashed)"], models["ours (squashed)"] = with_ours(plain, linear_spec())

    for model in models.values():
        model.eval()
    check_contenders(models, plain, x)

    def forward(model: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return model(x)

        return run

    evals = interleaved({name: forward(m) for name, m in models.items()}, s.repeats)

    target = torch.randn(s.mlp_batch, s.mlp_width)

    def train_step(model: nn.Module) -> Callable[[], object]:
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)

        def run() -> object:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), target)
            loss.backward()
            opt.step()
            return loss

        return run

    for model in models.values():
        model.train()
    trains = interleaved({name: train_step(m) for name, m in models.items()}, s.repeats)

    notes = {"ours (unsquashed)": "target <= 1.10x (eval)", "ours (squashed)": "target 1.00x (eval)"}
    rows = []
    for name in models:
        rows.append(
            [
                name,
                fmt_ms(evals[name]),
                f"{evals[name] / evals['plain']:.2f}x",
                fmt_ms(trains[name]),
                f"{trains[name] / trains['plain']:.2f}x",
                notes.get(name, ""),
            ]
        )
    title = (
        f"### 1. MLP: {s.mlp_layers} x Linear({s.mlp_width}, {s.mlp_width}), batch {s.mlp_batch}\n\n"
        "Eval forward under `torch.no_grad`; training step = zero_grad + forward + MSE backward + SGD step.\n\n"
    )
    del models
    gc.collect()
    return title + table(["model", "eval ms", "eval vs plain", "train step ms", "train vs plain", "note"], rows)


# --- 2. TransformerEncoder ----------------------------------------------------------------------
def bench_transformer(s: Sizes) -> str:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(s.tf_d_model, s.tf_heads, 4 * s.tf_d_model, dropout=0.0, batch_first=True)
    plain = nn.TransformerEncoder(layer, s.tf_layers, enable_nested_tensor=False).eval()
    x = torch.randn(s.tf_batch, s.tf_seq, s.tf_d_model)
    prune_params = []
    for i in range(s.tf_layers):
        p = f"layers.{i}"
        prune_params += [
            (f"{p}.self_attn", "in_proj_weight"),
            (f"{p}.self_attn.out_proj", "weight"),
            (f"{p}.linear1", "weight"),
            (f"{p}.linear2", "weight"),
        ]
    spec = {
        "weights": [
            {"target": f"{m}.{t}" if t != "weight" else m, "method": "l1_unstructured", "sparsity": SPARSITY}
            for m, t in prune_params
        ]
    }
    models: dict[str, nn.Module] = {"plain": plain, "prune": with_prune(plain, prune_params).eval()}
    models["plain (exported graph)"] = torch.export.export(plain, (x,)).module()
    models["ours (unsquashed)"], models["ours (squashed)"] = with_ours(
        plain, spec, capture="export", example_inputs=(x,)
    )

    for fastpath in (True, False):  # prune's hooks must run on both paths
        torch.backends.mha.set_fastpath_enabled(fastpath)
        check_contenders(models, plain, x)
    torch.backends.mha.set_fastpath_enabled(True)

    def forward(model: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return model(x)

        return run

    out = []
    for fastpath in (True, False):
        torch.backends.mha.set_fastpath_enabled(fastpath)
        res = interleaved({name: forward(m) for name, m in models.items()}, s.repeats)
        notes = {
            "plain (exported graph)": "the aten graph that export capture yields, unmasked",
            "ours (unsquashed)": "capture='export'; target <= 1.10x",
            "ours (squashed)": "target 1.00x",
        }
        if fastpath:
            notes["prune"] = "hooked layers leave the fused fast path (its output is checked)"
            notes["plain"] = "fused `_transformer_encoder_layer_fwd` fast path"
        out.append((fastpath, res, notes))
    torch.backends.mha.set_fastpath_enabled(True)

    title = (
        f"### 2. TransformerEncoder: {s.tf_layers} layers, d_model {s.tf_d_model}, {s.tf_heads} heads, "
        f"ff {4 * s.tf_d_model}, input ({s.tf_batch}, {s.tf_seq}, {s.tf_d_model}), eval under no_grad\n\n"
        "Targets: every `in_proj_weight`, `out_proj.weight`, `linear1.weight`, `linear2.weight`.\n"
    )
    parts = [title]
    for fastpath, res, notes in out:
        parts.append(
            f"\nMHA fast path {'enabled (default)' if fastpath else 'disabled'} "
            f"(`torch.backends.mha.set_fastpath_enabled({fastpath})`):\n"
        )
        parts.append(table(["model", "eval ms", "vs plain", "note"], ratio_rows(res, "plain", notes)))
    del models
    gc.collect()
    return "\n".join(parts)


# --- 3. EmbeddingBag -----------------------------------------------------------------------------
class Bag(nn.Module):
    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(rows, dim, mode="sum")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids)


EMB_NOTE = (
    "Ours (unsquashed): in eval mode under torch.no_grad the lookup reads the cached masked table (rebuilt only "
    "when the weight or the mask changed; one table-sized copy); with autograd on it gathers the rows of "
    "the table and of the mask and multiplies them, never the whole table."
)


def bench_embedding_bag(s: Sizes) -> str:
    torch.manual_seed(0)
    plain = Bag(s.emb_rows, s.emb_dim)
    ids = torch.randint(0, s.emb_rows, (s.emb_bags, s.emb_per_bag))
    models: dict[str, nn.Module] = {"plain": plain, "prune": with_prune(plain, [("emb", "weight")])}
    models["ours (unsquashed)"], models["ours (squashed)"] = with_ours(plain, linear_spec("emb"))
    for model in models.values():
        model.eval()  # ours caches the masked table for no-grad lookups in eval mode only
    check_contenders(models, plain, ids)

    def lookup(model: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return model(ids)

        return run

    grad_out = torch.randn(s.emb_bags, s.emb_dim)

    def train_lookup(model: nn.Module) -> Callable[[], object]:
        params = [p for p in model.parameters() if p.requires_grad]

        def run() -> object:
            for p in params:
                p.grad = None
            model(ids).backward(grad_out)
            return None

        return run

    res_eval = interleaved({name: lookup(m) for name, m in models.items()}, s.repeats)
    res_train = interleaved({name: train_lookup(m) for name, m in models.items()}, s.repeats)
    notes = {
        "prune": "multiplies the whole table every lookup",
        "ours (unsquashed)": "target <= 4x",
        "ours (squashed)": "target 1.00x",
    }
    rows = [
        [
            name,
            fmt_ms(res_eval[name]),
            f"{res_eval[name] / res_eval['plain']:.2f}x",
            fmt_ms(res_train[name]),
            f"{res_train[name] / res_train['plain']:.2f}x",
            notes.get(name, ""),
        ]
        for name in models
    ]
    title = (
        f"### 3. EmbeddingBag({s.emb_rows:_}, {s.emb_dim}, mode='sum'): {s.emb_bags} bags x "
        f"{s.emb_per_bag} ids\n\nLookup under `torch.no_grad`; training lookup = forward + backward "
        "(dense gradient of the table, `.grad` reset to None each time). " + EMB_NOTE + "\n\n"
    )
    del models
    gc.collect()
    return title + table(["model", "lookup ms", "vs plain", "fwd+bwd ms", "vs plain", "note"], rows)


# --- 3b. EmbeddingBag lookups under no_grad in training mode ----------------------------------------
TRAIN_NOGRAD_ROWS = 200_000
TRAIN_NOGRAD_BATCHES = ((512, 20), (4096, 1))  # (bags, ids per bag): typical recommender batches


class Lookup(nn.Module):
    """A plain ``nn.Embedding`` (rows out, no pooling), for the same no-grad training-mode comparison."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(rows, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids)


def bench_embedding_train_nograd(s: Sizes) -> str:
    """No-grad lookups of an unsquashed module left in training mode (no eval cache): the fused C kernels."""
    rows_n = TRAIN_NOGRAD_ROWS if s is FULL else TRAIN_NOGRAD_ROWS // 4
    out_rows = []
    for kind, cls in (("EmbeddingBag", Bag), ("Embedding", Lookup)):
        torch.manual_seed(0)
        plain = cls(rows_n, s.emb_dim)
        ours, squashed = with_ours(plain, linear_spec("emb"))
        ours.train()
        for bags, per_bag in TRAIN_NOGRAD_BATCHES:
            ids = torch.randint(0, rows_n, (bags, per_bag))
            with torch.no_grad():
                check_close(f"ours {kind} (train mode)", ours(ids), squashed(ids))

            def lookup(model: nn.Module, ids: torch.Tensor = ids) -> Callable[[], object]:
                def run() -> object:
                    with torch.no_grad():
                        return model(ids)

                return run

            res = interleaved({"plain": lookup(plain), "ours": lookup(ours)}, s.repeats * 20)
            out_rows.append(
                [
                    kind,
                    f"{bags} x {per_bag}",
                    f"{res['plain'] * 1e3:.3f}",
                    f"{res['ours'] * 1e3:.3f}",
                    f"{res['ours'] / res['plain']:.2f}x",
                ]
            )
    title = (
        f"### 3b. EmbeddingBag / Embedding({rows_n:_}, {s.emb_dim}) under `torch.no_grad` in training mode\n\n"
        "The unsquashed module is left in `train()` mode, so there is no eval cache: each lookup runs a fused "
        f"C kernel ({'built' if _native.LIB is not None else 'NOT built: the torch path, gathered rows'}): "
        "weight row times mask row (added into the bag: mode 'sum'), no table-sized temporary; target <= 2x "
        "plain for EmbeddingBag.\n\n"
    )
    return title + table(["module", "ids", "plain ms", "ours ms", "ours vs plain"], out_rows)


# --- 4. capture + passes vs graph size -----------------------------------------------------------
def bench_capture(s: Sizes) -> str:
    rows, per_size = [], {}
    models = {}
    for n in s.capture_layers:
        torch.manual_seed(0)
        models[n] = nn.Sequential(*[nn.Linear(s.capture_width, s.capture_width) for _ in range(n)])
    times: dict[int, list[float]] = {n: [] for n in models}
    nodes: dict[int, int] = {}
    for _ in range(s.capture_repeats):  # the sizes interleaved: load on the shared machine hits both alike
        for n, model in models.items():
            gc.collect()
            start = time.perf_counter()
            sgm = fxs.sparsify_graph(model, linear_spec())
            times[n].append(time.perf_counter() - start)
            nodes[n] = len(sgm.graph.nodes)
            del sgm
    for n, model in models.items():
        t = statistics.median(times[n])
        traced = len(torch.fx.symbolic_trace(model).graph.nodes)
        per_size[n] = t
        rows.append(
            [str(n), str(traced), str(nodes[n]), f"{t:.3f}", f"{t / nodes[n] * 1e6:.1f}", f"{t / traced * 1e6:.0f}"]
        )
    del models
    small, big = s.capture_layers
    ratio = per_size[big] / per_size[small]
    title = (
        f"### 4. Capture + passes (`sparsify_graph`, capture='fx') vs graph size: nn.Sequential of "
        f"Linear({s.capture_width}, {s.capture_width}), every layer targeted\n\n"
        "Time includes the deep copy of the model (`inplace=False`). µs / node divides by the nodes of the "
        "rewritten graph (5 per layer: weight, mask, mask node, bias, linear; target <= 150 µs per node); "
        "the last column divides by the nodes of the captured graph instead.\n\n"
    )
    body = table(
        ["layers", "nodes traced", "nodes rewritten", "seconds (median)", "µs / node", "µs / traced node"], rows
    )
    scale = big / small
    return (
        title + body + f"\n\ntime({big}) / time({small}) = **{ratio:.2f}** "
        f"(linear would be {scale:.1f}; target <= {1.1 * scale:.1f})"
    )


# --- main ------------------------------------------------------------------------------------------
def environment(threads: int, quick: bool) -> str:
    return table(
        ["item", "value"],
        [
            ["torch", torch.__version__],
            ["python", platform.python_version()],
            ["machine", f"{platform.machine()}, {os.cpu_count()} logical CPUs"],
            ["torch.get_num_threads()", str(threads)],
            ["mode", "quick" if quick else "full"],
        ],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (< 60 s)")
    parser.add_argument("--write", action="store_true", help=f"also write {RESULTS}")
    # half the cores: on a shared machine, OpenMP threads on every core collapse as soon as another
    # process competes for one of them, which swamps the ratios with noise
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="torch.set_num_threads (default: half the logical CPUs)",
    )
    parser.add_argument(
        "--only",
        choices=["mlp", "transformer", "embedding", "embedding-train", "capture"],
        action="append",
        help="run only these sections (repeatable)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    sections = {
        "mlp": bench_mlp,
        "transformer": bench_transformer,
        "embedding": bench_embedding_bag,
        "embedding-train": bench_embedding_train_nograd,
        "capture": bench_capture,
    }
    start = time.perf_counter()
    parts = [
        "## fx_sparsify pipeline benchmark",
        "",
        f"`python benchmarks/bench_pipeline.py{' --quick' if args.quick else ''}`: median of "
        f"{sizes.repeats} interleaved repeats (capture: {sizes.capture_repeats}), 50 % L1 unstructured.",
        "",
        environment(torch.get_num_threads(), args.quick),
    ]
    print("\n".join(parts), flush=True)
    for key, fn in sections.items():
        if args.only and key not in args.only:
            continue
        section = fn(sizes)
        print("\n" + section, flush=True)
        parts += ["", section]
    elapsed = f"\nTotal benchmark time: {time.perf_counter() - start:.1f} s"
    print(elapsed)
    parts.append(elapsed)
    if args.write:
        with open(RESULTS, "w") as f:
            f.write("\n".join(parts) + "\n")
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
