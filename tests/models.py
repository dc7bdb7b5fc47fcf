"""Small real-world-shaped models shared by the tests (random weights, built offline)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 16, hidden: int = 32, d_out: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class KeywordCall(nn.Module):
    """Calls its one layer with the input by keyword, ``self.layer(input=x)`` (fx keeps it a kwarg)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(input=x)


class MobileNetBlock(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, each with BatchNorm."""

    def __init__(self, c: int, expand: int = 4) -> None:
        super().__init__()
        h = c * expand
        self.expand = nn.Conv2d(c, h, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(h)
        self.dw = nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False)
        self.bn2 = nn.BatchNorm2d(h)
        self.project = nn.Conv2d(h, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        return x + self.bn3(self.project(y))


class SmallCNN(nn.Module):
    """A ResNet/MobileNet-style CNN: stem conv + BN, inverted residual blocks, pooled linear head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.blocks = nn.Sequential(MobileNetBlock(16), MobileNetBlock(16))
        self.reflect = nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.reflect(self.blocks(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Recommender(nn.Module):
    """A DLRM-style model: EmbeddingBag tables (sum, mean), a plain Embedding, and an MLP on top."""

    def __init__(self, rows: int = 100, dim: int = 8) -> None:
        super().__init__()
        self.users = nn.EmbeddingBag(rows, dim, mode="sum")
        self.items = nn.EmbeddingBag(rows, dim, mode="mean", padding_idx=0)
        self.cat = nn.Embedding(rows, dim)
        self.top = nn.Sequential(nn.Linear(3 * dim, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(
        self, user_ids: torch.Tensor, offsets: torch.Tensor, item_ids: torch.Tensor, cat: torch.Tensor
    ) -> torch.Tensor:
        u = self.users(user_ids, offsets)
        i = self.items(item_ids)
        c = self.cat(cat)
        return self.top(torch.cat([u, i, c], dim=1))

    @staticmethod
    def example_inputs(batch: int = 4, rows: int = 100) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(1)
        user_ids = torch.randint(0, rows, (batch * 3,), generator=g)
        offsets = torch.arange(0, batch * 3, 3)
        item_ids = torch.randint(0, rows, (batch, 5), generator=g)
        item_ids[0, :2] = 0  # padding entries
        cat = torch.randint(0, rows, (batch,), generator=g)
        return user_ids, offsets, item_ids, cat


class TiedLM(nn.Module):
    """A tiny language model whose output head shares the embedding table."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(self.emb(ids))))


class Functional(nn.Module):
    """Parameters used directly in forward, and a custom scale parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(12, 10))
        self.b = nn.Parameter(torch.randn(12))
        self.v = nn.Parameter(torch.randn(4, 12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.relu(F.linear(x, self.w, self.b)), self.v) + self.w.sum()


def transformer_encoder(d_model: int = 16, layers: int = 2) -> nn.Module:
    layer = nn.TransformerEncoderLayer(d_model, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False).eval()


# Hugging Face models from a config (random weights, no downloads): the `models` extra. Callers
# pytest.importorskip("transformers") first.


def hf_bert() -> tuple[nn.Module, str]:
    """A 2-layer BERT and a selector for its MLP Linears."""
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return transformers.BertModel(cfg), "re:encoder\\.layer\\.\\d+\\.(intermediate|output)\\.dense"


def hf_llama() -> tuple[nn.Module, str]:
    """A 2-layer LLaMA (grouped-query attention) and a selector for its projections."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg), "re:model\\.layers\\.\\d+\\.(mlp|self_attn)\\.\\w+_proj"


def hf_inputs(model: nn.Module) -> dict[str, Any]:
    """Keyword inputs for the models above: 2 random sequences of 7 tokens (no KV cache but for BERT)."""
    import transformers

    ids = torch.randint(1, 100, (2, 7))
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if not isinstance(model, transformers.BertModel):
        kwargs["use_cache"] = False
    return kwargs


def hf_first(out: Any) -> torch.Tensor:
    """The main tensor of a Hugging Face model's output (logits or last hidden state)."""
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
