"""Round trips with the user's own model and with torch's pruning tools (SPEC §14).

- :func:`take_over`: a model carrying ``torch.nn.utils.prune`` hooks (``weight_orig`` / ``weight_mask``)
  or ``torch.ao.pruning`` ``FakeSparsity`` parametrizations becomes a plain model (the original tensor
  is the weight under its plain name again) plus the masks it carried; ``sparsify_graph`` uses them
  as the initial masks ("adopted" in the report).
- :func:`set_initial_masks`: ``sparsify_graph(model, spec, masks={...})``.
- :func:`attach_prune_hooks`: the masks applied to an eager model with ``prune.custom_from_mask``.

Sits beside the facade (it is called by ``api`` and ``sparse_graph_module``); it never imports them.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune

from .state import SparsityState

__all__ = ["take_over", "set_initial_masks", "attach_prune_hooks", "ADOPTED", "INITIAL"]

ADOPTED = "adopted"  # the report's word for a mask taken over from torch's pruning tools
INITIAL = "initial mask"  # ... and for one given with masks={...}


def _fake_sparsity_type() -> type | None:
    try:
        from torch.ao.pruning.sparsifier.utils import FakeSparsity
    except ImportError:  # pragma: no cover - every supported torch has it
        return None
    return FakeSparsity  # type: ignore[no-any-return]


def _prune_hooks(module: nn.Module) -> list[tuple[Any, Any]]:
    return [(k, h) for k, h in module._forward_pre_hooks.items() if isinstance(h, prune.BasePruningMethod)]


def needs_take_over(model: nn.Module) -> bool:
    """Whether ``model`` carries prune hooks or FakeSparsity parametrizations."""
    fake = _fake_sparsity_type()
    for module in model.modules():
        if _prune_hooks(module):
            return True
        if fake is not None and parametrize.is_parametrized(module):
            if any(
                isinstance(p, fake)
                for plist in module.parametrizations.values()  # type: ignore[union-attr, operator]
                for p in plist
            ):
                return True
    return False


def take_over(model: nn.Module, *, inplace: bool) -> tuple[nn.Module, dict[str, Tensor], dict[str, str]]:
    """A model without prune hooks / FakeSparsity parametrizations, the masks they held, and their origin.

    Returns ``(model, masks, origin)``: ``model`` is a deep copy (the user's model itself when
    ``inplace``) whose pruned tensors are plain parameters holding the original (unmasked) values;
    ``masks`` maps each tensor's FQN to its boolean keep-mask; ``origin`` names the tool it came from.
    A model carrying neither is returned as it is, with empty dicts.
    """
    if not needs_take_over(model):
        return model, {}, {}
    # prune keeps ``module.weight = weight_orig * weight_mask``, a non-leaf tensor deepcopy refuses: it is
    # dropped from the copy below anyway, so the copy starts without it
    memo: dict[int, Any] = {id(getattr(m, h._tensor_name)): None for m in model.modules() for _, h in _prune_hooks(m)}
    work = model if inplace else copy.deepcopy(model, memo)
    fake = _fake_sparsity_type()
    masks: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for fqn, module in list(work.named_modules()):
        prefix = f"{fqn}." if fqn else ""
        for key, hook in _prune_hooks(module):
            name = hook._tensor_name
            mask = getattr(module, f"{name}_mask").detach() != 0
            original = getattr(module, f"{name}_orig")
            del module._forward_pre_hooks[key]
            delattr(module, name)  # the masked copy prune keeps as a plain attribute
            del module._parameters[f"{name}_orig"]
            del module._buffers[f"{name}_mask"]
            module.register_parameter(name, original)
            masks[prefix + name] = mask
            origin[prefix + name] = "torch.nn.utils.prune"
        if fake is not None and parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):  # type: ignore[union-attr]
                plist = module.parametrizations[name]  # type: ignore[index]
                fakes: list[Any] = [p for p in plist if isinstance(p, fake)]
                if not fakes:
                    continue
                if len(fakes) != len(plist):
                    raise ValueError(
                        f"{prefix + name!r} carries a FakeSparsity parametrization together with others "
                        f"({', '.join(type(p).__name__ for p in plist)}); fx_sparsify can take over FakeSparsity "
                        "alone. Remove the others first (parametrize.remove_parametrizations) or squash the "
                        "sparsifier (sparsifier.squash_mask())."
                    )
                mask = torch.ones_like(plist.original, dtype=torch.bool)
                for p in fakes:
                    mask &= p.mask.detach() != 0
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
                masks[prefix + name] = mask
                origin[prefix + name] = "torch.ao.pruning"
    return work, masks, origin


def set_initial_masks(gm: nn.Module, state: SparsityState, masks: Mapping[str, Any], origin: Mapping[str, str]) -> None:
    """Write ``masks`` (target name → keep-mask) into the mask buffers; record where each came from.

    Every name must be a weight target of the spec and every mask a 0/1 (or bool) tensor of the
    target's shape; nothing is written unless all are valid.
    """
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict of target name -> keep-mask tensor, got {type(masks).__name__}")
    weights = {n: r for n, r in state.targets.items() if r.kind != "activation"}
    checked: dict[str, Tensor] = {}
    for name, mask in masks.items():
        record = weights.get(name)
        if record is None:
            via = origin.get(name)
            if via is not None:
                raise ValueError(
                    f"{name!r} carries a {via} mask, but no weight rule of the spec selects it, so the mask would be "
                    f"dropped. Add a rule for it (e.g. {{'target': {name!r}, 'method': 'l1_unstructured', "
                    f"'sparsity': 0.5}}: later steps keep the pruned entries pruned), or fold it first "
                    f"({'prune.remove(module, name)' if via.endswith('prune') else 'sparsifier.squash_mask()'})."
                )
            import difflib

            close = difflib.get_close_matches(name, list(weights), n=5, cutoff=0.3)
            raise KeyError(
                f"masks: {name!r} is not a weight target of the spec; targets: {', '.join(close or list(weights)[:8])}"
            )
        if not isinstance(mask, Tensor):
            raise TypeError(f"masks[{name!r}]: expected a tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(record.shape):
            raise ValueError(f"masks[{name!r}]: shape {tuple(mask.shape)} does not match the tensor's {record.shape}")
        if mask.dtype != torch.bool:
            if mask.is_floating_point() and bool(torch.isnan(mask).any()):
                raise ValueError(f"masks[{name!r}]: contains NaN; a keep-mask is 0/1 or boolean")
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"masks[{name!r}]: a keep-mask holds only 0 and 1 (or True / False)")
        checked[name] = mask != 0
    with torch.no_grad():
        for name, mask in checked.items():
            buffer = gm.get_buffer(weights[name].buffer)
            buffer.copy_(mask.to(device=buffer.device, dtype=buffer.dtype))
    state.initial_masks.update({n: ADOPTED if n in origin else INITIAL for n in checked})
    state.adopted_from.update({n: origin[n] for n in checked if n in origin})


def attach_prune_hooks(sgm: nn.Module, state: SparsityState, model: nn.Module) -> nn.Module:
    """Apply every weight mask to ``model`` with ``torch.nn.utils.prune.custom_from_mask`` and return it.

    Each masked ``module.weight`` becomes prune's layout: ``weight_orig`` (parameter), ``weight_mask``
    (buffer) and a forward pre-hook. Activation masks have no counterpart in ``prune`` and are skipped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_torch_prune() takes your eager nn.Module, got {type(model).__name__}")
    plan = []
    for name, record in state.targets.items():
        if record.kind == "activation":
            continue
        owner, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            raise ValueError(f"to_torch_prune(): the model has no module {owner!r} (for target {name!r})") from None
        param = module._parameters.get(attr)
        if param is None:
            raise ValueError(
                f"to_torch_prune(): {name!r} is not a parameter of the model"
                + (" (it is already pruned: prune.remove it first)" if hasattr(module, f"{attr}_orig") else "")
            )
        if tuple(param.shape) != record.shape:
            raise ValueError(
                f"to_torch_prune(): {name!r} has shape {tuple(param.shape)} in the model, {record.shape} here"
            )
        plan.append((module, attr, sgm.get_buffer(record.buffer).detach() != 0, param.device))
    for module, attr, mask, device in plan:
        prune.custom_from_mask(module, attr, mask.to(device))
    return model
