"""Smaller on disk, faster on the CPU: sparse storage at squash and a compressed checkpoint (docs/storage.md).

    python examples/compressed_checkpoint.py [--width 1024] [--sparsity 0.9] [--out DIR]

Prunes an MLP, squashes it with ``storage="auto"`` (each layer sparse only where that measured
faster at the given batch size), saves it with ``fxs.save_compressed`` (non-zero values + a 1-bit
mask per entry) and loads the file back into a fresh eager model.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import fx_sparsify as fxs


def build(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, 4 * width), nn.ReLU(), nn.Linear(4 * width, width)).eval()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="directory for the files (default: a temporary one)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = build(args.width)
    spec = {"weights": [{"target": "type:Linear", "method": "l1_unstructured", "sparsity": args.sparsity}]}
    sgm = fxs.sparsify_graph(model, spec)
    sgm.step()

    # 1. sparse storage: CSR layers where they are faster at this batch size, dense elsewhere
    fast = sgm.squash(storage="auto", batch_size=args.batch_size)
    print(sgm.report())  # ends with the per-layer storage table: dense or csr, and why
    x = torch.randn(args.batch_size, args.width)
    dense = sgm.squash()
    torch.testing.assert_close(fast(x), dense(x), atol=1e-4, rtol=1e-4)

    # 2. a compressed checkpoint: state_dict() is dense under the original keys, the file is not
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        fxs.save_compressed(fast, out / "model.safetensors")
        save_file(dense.state_dict(), str(out / "dense.safetensors"))
        ratio = (out / "model.safetensors").stat().st_size / (out / "dense.safetensors").stat().st_size
        print(f"compressed checkpoint: {ratio:.3f}x the dense safetensors file")

        fresh = fxs.load_compressed(out / "model.safetensors", build(args.width))  # strict, bit-exact
        for name, tensor in dense.state_dict().items():
            assert torch.equal(fresh.state_dict()[name], tensor), name
        torch.testing.assert_close(fresh(x), dense(x))
    sparse_layers = sum(c.storage != "dense" for c in fast.storage_choices)
    return {"file_ratio": ratio, "sparse_layers": float(sparse_layers), "layers": float(len(fast.storage_choices))}


if __name__ == "__main__":
    main()
