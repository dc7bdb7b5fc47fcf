"""Pass: a Hessian observer in front of each ``"method": "sparsegpt"`` layer's input (SPEC §16).

For a rule selecting ``fc1.weight`` the pass adds ``fc1_input_hessian_observer`` (a
:class:`~fx_sparsify.hessian.HessianObserver`) and rewires the layer's input through it::

    %fc1_input_hessian_observer : call_module[target=fc1_input_hessian_observer](args = (%x,))
    %fc1 : call_module[target=fc1](args = (%fc1_input_hessian_observer,))

Layers that read the same input node (the ``q``, ``k``, ``v`` projections of an attention block) share
one observer, so one ``in × in`` statistic serves all of them.

With ``"sequential": true`` on a rule, a forward pre-hook also keeps the module's calibration inputs
(``passes/reconstruct.py``), so that ``step()`` can re-run them after pruning each level of layers.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping

import torch
from torch import nn
from torch.fx import GraphModule

from .._caller import user_stacklevel
from ..hessian import SUM_DTYPE, HessianObserver
from ..methods.sparsegpt import HESSIAN_DTYPES
from ..select import Selection
from ._runner import PassResult, finish
from .insert_activation_masks import insert_observer
from .layer_index import LayerIndex
from .reconstruct import record_calibration_inputs

__all__ = ["insert_hessian_observers", "sparsegpt_layers"]


def _unfold_of(name: str, conv: nn.Conv2d) -> dict[str, Any]:
    """``F.unfold`` arguments that turn the conv's input into the rows its weight multiplies; errors name it."""
    why = None
    if conv.groups != 1:
        why = f"groups={conv.groups} (each output channel sees only its group's inputs)"
    elif conv.padding_mode != "zeros":
        why = f"padding_mode={conv.padding_mode!r}"
    elif isinstance(conv.padding, str):
        why = f"padding={conv.padding!r}"
    if why is not None:
        raise ValueError(
            f"'method': 'sparsegpt' on {name!r}: a Conv2d is reconstructed from its unfolded input, which needs "
            f"groups=1 and zero padding given as numbers; this layer has {why}. Use another method (e.g. "
            "l1_unstructured, nm) for it"
        )
    return {"kernel_size": conv.kernel_size, "dilation": conv.dilation, "padding": conv.padding, "stride": conv.stride}


def _tied_names(model: nn.Module, name: str) -> list[str]:
    """The other FQNs of the parameter ``name`` (a tied ``lm_head.weight`` for ``embed.weight``)."""
    tensor = dict(model.named_parameters(remove_duplicate=False)).get(name)
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p is tensor and n != name]


def sparsegpt_layers(
    model: nn.Module, targets: Mapping[str, Any]
) -> dict[str, tuple[str, str, bool, dict[str, Any] | None]]:
    """Layer FQN → (weight target, hessian dtype name, sequential, Conv2d unfold arguments or None) for
    ``sparsegpt`` rules; errors name the layer.

    ``targets`` are the resolved weight targets (``select.WeightTarget``: ``.rule``, ``.group``).
    """
    out: dict[str, tuple[str, str, bool, dict[str, Any] | None]] = {}
    for name, target in targets.items():
        rule = target.rule
        if rule.method != "sparsegpt":
            continue
        if target.group is not None:
            raise ValueError(
                f"global rule over {name!r}: 'sparsegpt' prunes each layer against its own inputs' Hessian and "
                "cannot rank layers together; use a 'weights' rule per layer (same sparsity) instead"
            )
        layer = name.rpartition(".")[0]
        module = model.get_submodule(layer) if name.endswith(".weight") else None
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            kind = type(module).__name__ if module is not None else "not a layer's weight"
            tied = _tied_names(model, name)
            why = (
                f" It is one tensor with {', '.join(map(repr, tied))} (tied weights, named after their first use), "
                f"which the rule selected: exclude it with {{'target': {tied[0].rpartition('.')[0]!r}, "
                "'method': 'dense'} after this rule, or untie the weights."
                if tied
                else ""
            )
            raise ValueError(
                f"'method': 'sparsegpt' reconstructs nn.Linear (and nn.Conv2d) weights from their inputs; {name!r} "
                f"({kind}) is not the weight of either.{why} Select Linear layers for this rule, or use another "
                "method (e.g. l1_unstructured, nm) for this layer"
            )
        unfold = _unfold_of(name, module) if isinstance(module, nn.Conv2d) else None
        if getattr(rule, "scores", None) is not None:
            raise ValueError(
                f"weights rule {rule.target!r}: 'sparsegpt' ranks by its own OBS saliency; drop 'scores' from the rule"
            )
        if getattr(rule, "gradient", "mask") in ("supermask", "joint"):
            raise ValueError(
                f"weights rule {rule.target!r}: 'sparsegpt' chooses masks from calibration data, gradient "
                f"{rule.gradient!r} from learned scores; use gradient 'mask' (or 'ste') with sparsegpt"
            )
        out[layer] = (
            name,
            rule.options.get("hessian_dtype", "float32"),
            bool(rule.options.get("sequential", False)),
            unfold,
        )
    return out


def insert_hessian_observers(gm: GraphModule, selection: Selection) -> PassResult:
    """Observers for ``selection.hessian_layers`` (layer FQN → (weight target, hessian dtype, sequential, unfold));
    ``created[target]["observer"]``."""
    layers, aliases = selection.hessian_layers, selection.aliases
    created: dict[str, dict[str, str]] = {}
    shared: dict[tuple[Any, ...], str] = {}  # (input nodes, dtype, unfold) -> observer name
    one_pass: dict[str, tuple[int, torch.device]] = {}  # observer -> its Hessian's bytes, device
    index = LayerIndex(gm, aliases)
    for layer, (weight_target, dtype_name, _, unfold) in layers.items():
        calls = index(layer)
        if not calls:
            raise ValueError(
                f"'method': 'sparsegpt' on {weight_target!r}: layer {layer!r} is never called in the graph"
            )
        dtype = HESSIAN_DTYPES[dtype_name]
        observer = HessianObserver(dtype, unfold=unfold)
        name = insert_observer(gm, index, layer, calls, observer, False, "input_hessian_observer")["observer"]
        nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]
        key = (tuple(n.args[0] for n in nodes), dtype, None if unfold is None else tuple(sorted(unfold.items())))
        if key in shared:  # this layer reads an observed input already: use that observer, drop the new one
            for node in nodes:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
            gm.delete_submodule(name)
            name = shared[key]
        shared[key] = name
        created[weight_target] = {"observer": name}
        if not layers[layer][2]:  # one-pass: this observer's Hessian lives through the whole calibration
            weight: Any = gm.get_submodule(layer).weight
            one_pass[name] = math.prod(weight.shape[1:]) ** 2 * SUM_DTYPE.itemsize, weight.device  # float64 sums
    if any(sequential for _, _, sequential, _ in layers.values()):
        record_calibration_inputs(gm)
    _warn_if_hessians_do_not_fit(one_pass)
    return finish(gm, created)


def _available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` as the OS (or CUDA) reports it now, or None where it cannot tell."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _warn_if_hessians_do_not_fit(one_pass: Mapping[str, tuple[int, torch.device]]) -> None:
    """One-pass SparseGPT holds every layer's ``in × in`` Hessian at once from the first calibration forward;
    where together they would take over half the free memory, say so now, not through an out-of-memory kill."""
    by_device: dict[torch.device, int] = {}
    for nbytes, device in one_pass.values():
        by_device[device] = by_device.get(device, 0) + nbytes
    for device, total in by_device.items():
        free = _available_bytes(device)
        if free is not None and total > free // 2:
            warnings.warn(
                f"'method': 'sparsegpt': the {len(one_pass)} Hessians of the one-pass layers take {total / 2**30:.2f} "
                f"GiB together on {device} from the first calibration forward on, and {free / 2**30:.2f} GiB is free. "
                'Set "sequential": true on the rule (one level of layers at a time: its Hessians, then the next), '
                "or calibrate a part of the model at a time",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
