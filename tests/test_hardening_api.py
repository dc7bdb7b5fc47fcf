"""Argument checks of the facade: wrong types are errors that say what to pass, never silent misbehaviour."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fx_sparsify as fxs

from models import MLP


@pytest.mark.parametrize("fn", [fxs.step, fxs.squash, fxs.masks, fxs.sparsity, fxs.report])
def test_function_forms_on_a_plain_module_name_sparsify_graph(fn) -> None:
    with pytest.raises(TypeError, match="sparsify_graph"):
        fn(nn.Linear(2, 2))
