"""Structured pruning that pays off: latency of squash(shrink=True) vs the dense model and Torch-Pruning.

    python benchmarks/bench_shrink.py            # ResNet-18/50 (224x224, batch 1 and 16), BERT, LLaMA block
    python benchmarks/bench_shrink.py --quick    # smaller inputs, fewer repeats
    python benchmarks/bench_shrink.py --big      # also a LLaMA-7B-size MLP (4096 -> 11008 -> 4096)
    python benchmarks/bench_shrink.py --memory   # only the peak-memory table (ResNet-50)

One thread (``torch.set_num_threads(1)``), median of repeats, models and tools in one process. For each
model: latency pruned / dense for ours and (when ``torch-pruning`` is installed: ``pip install
fx-sparsify[bench]``) Torch-Pruning at the same widths (group magnitude importance, p=2), the MACs ratio
(``torch.utils.flop_counter``), whether ours equals the masked module, and the time of the analysis
(``sparsify_graph``) + shrink. The machine is shared and noisy: read the ratios, not the milliseconds.

Peak memory (ResNet-50, 224x224, batch 1; the issue's budget: analysis + shrink <= 2x the model): each
pipeline runs in a fresh subprocess after a warm-up on a small model; the peak is the process's VmHWM,
reset (``/proc/self/clear_refs``) once the model is built and again at each stage, so every stage's
figure is the peak resident memory above the process holding its model, as a multiple of the model's
size (parameters + buffers). Stages: the analysis (``plan_channels``, with its shape run on the
example inputs), the check run ``sparsify_graph`` does on the example inputs, ``step()``, the dense
squash, the shrink pass; "whole" is the largest of them.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fx_sparsify as fxs
from fx_sparsify import api as api_module
from fx_sparsify import sparse_graph_module as sgm_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from shrink_resnet import resnet18, resnet50  # noqa: E402

from _memory import reset_peak, status  # noqa: E402  (benchmarks/ is on sys.path)

try:
    import torch_pruning as tp
except ImportError:  # the bench extra is missing: the Torch-Pruning column is skipped
    tp = None


def median_ms(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each function, the functions interleaved round by round (shared noise)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for k, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - start)
    return {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}


def flops(model: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*inputs, **kwargs)
    return counter.get_total_flops()


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


SPENT: dict[str, float] = {}


def _timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[name] = SPENT.get(name, 0.0) + time.perf_counter() - start

    return run


# the two stages of the "analysis + shrink" budget, timed inside the pipeline
api_module.plan_channels = _timed("analysis", api_module.plan_channels)
sgm_module._shrink = _timed("shrink", sgm_module._shrink)


def ours(
    model: nn.Module, spec: dict[str, Any], inputs: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[nn.Module, str, bool]:
    SPENT.clear()
    start = time.perf_counter()
    sgm = fxs.sparsify_graph(model, spec, example_inputs=inputs or None, example_kwargs=kwargs or None)
    sgm.step()
    small = sgm.squash(shrink=True)
    total = time.perf_counter() - start
    seconds = f"{total:.2f} s ({SPENT['analysis']:.2f} + {SPENT['shrink']:.2f} s)"
    with torch.no_grad():
        equal = torch.allclose(_first(small(*inputs, **kwargs)), _first(sgm(*inputs, **kwargs)), atol=1e-4, rtol=1e-4)
    return small, seconds, equal


def torch_pruning(
    model: nn.Module, inputs: tuple[Any, ...], ignored: list[nn.Module], ratio: float
) -> nn.Module | None:
    if tp is None:
        return None
    pruned = copy.deepcopy(model)
    names = {id(m): n for n, m in model.named_modules()}
    by_name = dict(pruned.named_modules())
    pruner = tp.pruner.MetaPruner(
        pruned,
        inputs,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=[by_name[names[id(m)]] for m in ignored],
        round_to=8,
    )
    pruner.step()
    return pruned


def torch_pruning_hf_heads(
    model: nn.Module,
    kwargs: dict[str, Any],
    layers: dict[str, tuple[str, ...]],
    heads: dict[str, int],
    fix: Callable[[nn.Module, Any], None],
) -> nn.Module | None:
    """Torch-Pruning on a Hugging Face model at our widths: 50 % of the heads (whole heads, ``prune_head_dims=False``)
    and 50 % of the MLP neurons, the hidden size untouched (``pruning_ratio`` 0 elsewhere), as its examples do.
    ``layers``: module-name suffix → the Linear children pruned at 50 %; ``heads``: projection suffix → heads."""
    if tp is None:
        return None
    pruned = copy.deepcopy(model)
    num_heads: dict[nn.Module, int] = {}
    ratios: dict[nn.Module, float] = {}
    for name, module in pruned.named_modules():
        for suffix, children in layers.items():
            if name.endswith(suffix):
                for child in children:
                    ratios[module.get_submodule(child)] = 0.5
        for suffix, n in heads.items():
            if name.endswith(suffix):
                num_heads[module] = n
    small = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    ignored = [m for n, m in pruned.named_modules() if n in ("pooler", "lm_head")]
    pruner = tp.pruner.MetaPruner(
        pruned,
        small,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.0,
        pruning_ratio_dict=ratios,
        ignored_layers=ignored,
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=0.5,
        round_to=8,
        output_transform=lambda out: _first(out).sum(),
    )
    pruner.step()
    fix(pruned, pruner)  # the attention modules' head counts, as Torch-Pruning's examples update them
    return pruned


def _bert_heads(model: nn.Module, pruner: Any) -> None:
    for module in model.modules():
        if type(module).__name__ == "BertSelfAttention":
            module.num_attention_heads = pruner.num_heads[module.query]
            module.attention_head_size = module.query.out_features // module.num_attention_heads
            module.all_head_size = module.query.out_features


def _llama_heads(model: nn.Module, pruner: Any) -> None:
    for module in model.modules():
        if type(module).__name__ == "LlamaAttention":
            q, kv = pruner.num_heads[module.q_proj], pruner.num_heads[module.k_proj]
            module.num_heads, module.num_key_value_heads, module.num_key_value_groups = q, kv, q // kv


def case(
    name: str,
    model: nn.Module,
    spec: dict[str, Any],
    inputs: tuple[Any, ...],
    tp_ignored: list[nn.Module] | None,
    repeats: int,
    batch_inputs: dict[str, tuple[Any, ...]] | None = None,
    kwargs: dict[str, Any] | None = None,
    tp_build: Callable[[], nn.Module | None] | None = None,
) -> None:
    model.eval()
    kwargs = kwargs or {}
    small, seconds, equal = ours(model, spec, inputs, kwargs)
    theirs = torch_pruning(model, inputs, tp_ignored, 0.5) if tp_ignored is not None else None
    crashed = ""
    if tp_build is not None:
        try:
            theirs = tp_build()
            with torch.no_grad():
                if theirs is not None:
                    theirs(*inputs, **kwargs)
        except Exception as exc:  # Torch-Pruning's failures are part of the comparison: say so, skip the column
            theirs, crashed = None, f"crashed ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
    for label, x in (batch_inputs or {"": inputs}).items():
        fns = {"dense": lambda: model(*x, **kwargs), "ours": lambda: small(*x, **kwargs)}
        if theirs is not None:
            fns["tp"] = lambda: theirs(*x, **kwargs)  # type: ignore[misc]
        ms = median_ms(fns, repeats)
        dense_flops = flops(model, x, kwargs)
        macs = flops(small, x, kwargs) / dense_flops
        tp_text = crashed or "-"
        if theirs is not None:
            tp_text = f"{ms['tp'] / ms['dense']:.2f}x (MACs {flops(theirs, x, kwargs) / dense_flops:.2f})"
        print(
            f"| {name}{label} | {ms['ours'] / ms['dense']:.2f}x | {tp_text} | {macs:.2f} | {equal} | {seconds} |",
            flush=True,
        )


def memory_child(inplace: bool, cache: bool = True) -> None:
    """One pipeline in this (fresh) process; prints a JSON line of peak extra memory per stage, x model."""
    torch.set_num_threads(1)
    if not cache:
        from fx_sparsify.ops import set_cache_limit

        set_cache_limit(0)
    spec = {"channels": [{"target": "type:Conv2d", "sparsity": 0.5}]}
    warm = fxs.sparsify_graph(resnet18().eval(), spec, example_inputs=(torch.randn(1, 3, 32, 32),))
    warm.step()
    warm.squash(shrink=True)
    del warm
    model = resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    gc.collect()
    base = status("VmRSS")
    peaks: dict[str, float] = {}

    def staged(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any, **k: Any) -> Any:
            peaks["before " + name] = (status("VmRSS") - base) / size
            reset_peak()
            try:
                return fn(*a, **k)
            finally:
                peaks[name] = (status("VmHWM") - base) / size
                reset_peak()

        return run

    api_module.plan_channels = staged("analysis", api_module.plan_channels)
    api_module._check_runs = staged("check run", api_module._check_runs)
    sgm_module._squash = staged("squash", sgm_module._squash)
    sgm_module._shrink = staged("shrink pass", sgm_module._shrink)
    reset_peak()
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(x,), inplace=inplace)
    peaks["sparsify (rest)"] = (status("VmHWM") - base) / size
    reset_peak()
    sgm.step()
    peaks["step"] = (status("VmHWM") - base) / size
    reset_peak()
    small = sgm.squash(shrink=True)
    peaks["after"] = (status("VmHWM") - base) / size
    peaks["whole"] = max(v for k, v in peaks.items() if not k.startswith("before"))
    del small
    print(json.dumps({"model_mib": size / 2**20, **peaks}))


def memory_table() -> None:
    print(
        "\nPeak resident memory during each stage above the process holding its model (what earlier stages "
        "left resident included), x model size (ResNet-50, 224x224, batch 1, a fresh subprocess each):"
    )
    print("(in parentheses: what was resident when the stage began; the stage's own cost is the difference)")
    print("| sparsify_graph | analysis | check run | step | squash (dense) | shrink pass | whole pipeline |")
    print("|---|---|---|---|---|---|---|")
    labels = {
        "copy": "default (copies the model)",
        "copy-nocache": "default, eval cache off (set_cache_limit(0))",
        "inplace": "inplace=True",
    }
    for mode, label in labels.items():
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", mode], capture_output=True, text=True, check=True
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        cells = [
            f"{row[k]:.2f}x" + (f" ({row['before ' + k]:.2f}x)" if "before " + k in row else "")
            for k in ("analysis", "check run", "step", "squash", "shrink pass", "whole")
        ]
        print(f"| {label} (model {row['model_mib']:.0f} MiB) | " + " | ".join(cells) + " |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--big", action="store_true")
    parser.add_argument("--memory", action="store_true", help="only the peak-memory table")
    parser.add_argument("--hf", action="store_true", help="only the BERT and LLaMA rows")
    parser.add_argument("--memory-child", choices=["copy", "copy-nocache", "inplace"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child == "inplace", cache=args.memory_child != "copy-nocache")
        return
    if args.memory:
        memory_table()
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    repeats = 3 if args.quick else 7
    side = 112 if args.quick else 224
    print(f"torch {torch.__version__}, 1 thread, Torch-Pruning {getattr(tp, '__version__', 'not installed')}")
    print(
        "| model | ours pruned/dense | Torch-Pruning pruned/dense | MACs ratio (ours) | ours == masked | "
        "sparsify + step + squash(shrink) (of which analysis + shrink pass) |"
    )
    print("|---|---|---|---|---|---|")
    if not args.hf:
        conv_spec = {"channels": [{"target": "type:Conv2d", "sparsity": 0.5}]}
        for name, build in (("ResNet-18 50%", resnet18), ("ResNet-50 50%", resnet50)):
            model = build().eval()
            x1, x16 = torch.randn(1, 3, side, side), torch.randn(16, 3, side, side)
            case(name, model, conv_spec, (x1,), [model.fc], repeats, {" (batch 1)": (x1,), " (batch 16)": (x16,)})

        mlp = LlamaMLP(1024, 2816) if not args.big else LlamaMLP(4096, 11008)
        x = torch.randn(16, 1024 if not args.big else 4096)
        case(
            "LLaMA-style MLP 50% neurons" + (" (7B size)" if args.big else " (1024/2816)"),
            mlp,
            {"channels": [{"target": "up_proj", "sparsity": 0.5}]},
            (x,),
            [mlp.down_proj],
            repeats,
        )
    hf_cases(repeats)
    if not args.hf:
        memory_table()


def hf_cases(repeats: int) -> None:
    """BERT and a LLaMA with GQA from configs (random weights), ours and Torch-Pruning at the same head ratio."""
    try:
        import transformers
    except ImportError:
        print("(transformers missing: BERT / LLaMA rows skipped; pip install fx-sparsify[models])")
        return
    ids = torch.randint(0, 1000, (8, 128))
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024
        )
    ).eval()
    bert_spec = {
        "channels": [
            {"target": "re:encoder\\.layer\\.\\d+\\.intermediate\\.dense", "sparsity": 0.5},
            {"target": "re:encoder\\.layer\\.\\d+\\.attention\\.self", "heads": 0.5},
        ]
    }
    bert_kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    case(
        "BERT (256, 4 layers) FFN + heads 50%",
        bert,
        bert_spec,
        (),
        None,
        repeats,
        kwargs=bert_kwargs,
        tp_build=lambda: torch_pruning_hf_heads(
            bert,
            bert_kwargs,
            {"intermediate": ("dense",), "attention.self": ("query", "key", "value")},
            {"attention.self.query": 4, "attention.self.key": 4, "attention.self.value": 4},
            _bert_heads,
        ),
    )
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=1000,
            hidden_size=512,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=1408,
        )
    ).eval()
    llama_spec = {
        "channels": [
            {"target": "re:model\\.layers\\.\\d+\\.mlp\\.up_proj", "sparsity": 0.5},
            {"target": "re:model\\.layers\\.\\d+\\.self_attn", "heads": 0.5},
        ]
    }
    llama_kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    case(
        "LLaMA (GQA 8q/2kv) MLP + heads 50%",
        llama,
        llama_spec,
        (),
        None,
        repeats,
        kwargs=llama_kwargs,
        tp_build=lambda: torch_pruning_hf_heads(
            llama,
            llama_kwargs,
            {"mlp": ("gate_proj", "up_proj"), "self_attn": ("q_proj", "k_proj", "v_proj")},
            {"self_attn.q_proj": 8, "self_attn.k_proj": 2, "self_attn.v_proj": 2},
            _llama_heads,
        ),
    )


if __name__ == "__main__":
    main()
