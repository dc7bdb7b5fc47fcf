"""Getting a smaller, faster model: prune half the channels of a ResNet and remove them (docs/shrink.md).

    python examples/shrink_resnet.py            # ResNet-18, 224x224
    python examples/shrink_resnet.py --quick    # a narrow ResNet on 32x32 (what the tests run)

channels rule → step() → shrink_plan() → squash(shrink=True) → a smaller plain GraphModule whose
outputs equal the masked model's; torch.export accepts it.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
from torch import nn

import fx_sparsify as fxs


# --- a torchvision-style ResNet (same module names and layout as torchvision.models.resnet) -----------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    def __init__(
        self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], width: int = 64, num_classes: int = 1000
    ) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._layer(block, width, layers[0])
        self.layer2 = self._layer(block, width * 2, layers[1], 2)
        self.layer3 = self._layer(block, width * 4, layers[2], 2)
        self.layer4 = self._layer(block, width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

    def _layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(width: int = 64) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], width)


def resnet50(width: int = 64) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], width)


def latency_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of ``fn`` in milliseconds (after one warm-up call)."""
    with torch.no_grad():
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a narrow ResNet-18 on 32x32 inputs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the timing (default 1: steadiest)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = (resnet18(width=16) if args.quick else resnet18()).eval()
    x = torch.randn(1, 3, 32, 32) if args.quick else torch.randn(1, 3, 224, 224)

    # every Conv2d loses half its output channels (rounded to multiples of 8); fc keeps its 1000 outputs
    spec = {"channels": [{"target": "type:Conv2d", "sparsity": 0.5}]}
    sgm = fxs.sparsify_graph(model, spec, example_inputs=(x,))
    sgm.step()
    print(sgm.shrink_plan())
    small = sgm.squash(shrink=True)

    with torch.no_grad():
        torch.testing.assert_close(small(x), sgm(x), atol=1e-4, rtol=1e-4)  # shrunk == masked
    if not args.quick:
        torch.export.export(small, (x,))  # a plain graph that torch.export accepts (tests/passes/test_shrink.py)
    dense_params = sum(p.numel() for p in model.parameters())
    small_params = sum(p.numel() for p in small.parameters())
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # the same thread count for both, said below; restored after
    try:
        dense_ms, small_ms = latency_ms(lambda: model(x)), latency_ms(lambda: small(x))
    finally:
        torch.set_num_threads(threads)
    print(f"parameters: {dense_params:,} -> {small_params:,} ({small_params / dense_params:.2f}x)")
    print(
        f"latency (batch 1, {args.threads} thread(s)): {dense_ms:.2f} ms -> {small_ms:.2f} ms "
        f"({small_ms / dense_ms:.2f}x)"
    )
    return {"dense_params": dense_params, "small_params": small_params, "dense_ms": dense_ms, "small_ms": small_ms}


if __name__ == "__main__":
    main()
