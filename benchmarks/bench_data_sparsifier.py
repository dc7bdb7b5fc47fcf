"""DataNormSparsifier.step() on an EmbeddingBag: fx_sparsify.data vs torch.ao.pruning (reference).

    python benchmarks/bench_data_sparsifier.py            # EmbeddingBag(1_000_000, 64)
    python benchmarks/bench_data_sparsifier.py --quick    # EmbeddingBag(50_000, 64)

Time: both sparsifiers in this process on the same table, median of ``--repeats`` steps.
Masks: compared entry by entry. With the default ``tie_break="index"``, blocks whose scores tie exactly
at the threshold may be chosen differently (the reference's unstable sort); the script checks that
every difference is such a tie, and that ``tie_break="reference"`` is bit-identical.
Memory: each sparsifier runs one step in a fresh subprocess; "peak extra" is the peak resident set
during ``step()`` (VmHWM, reset just before the step) minus the resident set before it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

DIM = 64
CONFIG = dict(sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=4)


def _table(rows: int) -> nn.EmbeddingBag:
    gen = torch.Generator().manual_seed(0)
    weight = torch.empty(rows, DIM).normal_(generator=gen)  # no init temporaries
    return nn.EmbeddingBag(rows, DIM, _weight=weight)


def _sparsifier(impl: str, **kwargs):
    if impl == "reference":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier
        return DataNormSparsifier(**CONFIG)
    import fx_sparsify.data as fxd

    return fxd.DataNormSparsifier(**CONFIG, **kwargs)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def measure_memory(impl: str, rows: int) -> None:
    """Child process: print the peak extra MiB of one step()."""
    sparsifier = _sparsifier(impl)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparsifier.add_data("emb", _table(rows))
    before = _rss_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM) to the current one
    except OSError:
        pass
    sparsifier.step()
    peak = _rss_kib("VmHWM")
    print(json.dumps({"extra_mib": (peak - before) / 1024}))


def _child(impl: str, rows: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", impl, "--rows", str(rows)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]


def _timed(sparsifier, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sparsifier.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="EmbeddingBag(50_000, 64) instead of 1_000_000 rows")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["reference", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, printed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = args.rows or (50_000 if args.quick else 1_000_000)
    if args.child:
        measure_memory(args.child, rows)
        return

    table = _table(rows)
    ref = _sparsifier("reference")
    ours = _sparsifier("ours")
    ours_exact = _sparsifier("ours", tie_break="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in (ref, ours, ours_exact):
            s.add_data("emb", table)
    t_ref = _timed(ref, args.repeats)
    t_ours = _timed(ours, args.repeats)
    t_exact = _timed(ours_exact, args.repeats)

    ref_mask = ref.get_mask("emb").bool()
    diff = ours.get_mask("emb") != ref_mask
    scores = F.avg_pool2d(table.weight.detach().abs()[None, None], (1, 4), (1, 4), ceil_mode=True)[0, 0]
    k = round(CONFIG["sparsity_level"] * scores.numel())
    kth = scores.flatten().kthvalue(k).values
    diff_blocks = diff.view(rows, -1, 4).any(-1)
    only_ties = bool((scores[diff_blocks] == kth).all())
    exact_identical = torch.equal(ours_exact.get_mask("emb"), ref_mask)
    if not (only_ties and exact_identical):
        raise SystemExit(
            f"mask mismatch: differences only at ties={only_ties}, tie_break='reference' identical={exact_identical}"
        )

    m_ref, m_ours = _child("reference", rows), _child("ours", rows)
    table_mib = rows * DIM * 4 / 2**20
    print(
        f"\nDataNormSparsifier.step() on EmbeddingBag({rows:_}, {DIM}) (table {table_mib:.0f} MiB), "
        f"{CONFIG}, torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}\n"
    )
    print("| implementation | step time (s) | speed-up | peak extra memory (MiB) | vs reference | masks |")
    print("|---|---:|---:|---:|---:|---|")
    print(f"| torch.ao.pruning DataNormSparsifier | {t_ref:.3f} | 1.0x | {m_ref:.0f} | 100% | reference |")
    print(
        f"| fx_sparsify.data.DataNormSparsifier | {t_ours:.3f} | {t_ref / t_ours:.1f}x | {m_ours:.0f} | "
        f"{100 * m_ours / m_ref:.0f}% | identical except {int(diff_blocks.sum())} of {scores.numel():_} blocks "
        f"tied exactly at the threshold |"
    )
    print(
        f'| fx_sparsify.data.DataNormSparsifier(tie_break="reference") | {t_exact:.3f} | {t_ref / t_exact:.1f}x '
        f"| – | – | bit-identical: {exact_identical} |"
    )


if __name__ == "__main__":
    main()
