"""fx_sparsify: a graph-level sparsification compiler for PyTorch.

>>> import fx_sparsify as fxs
>>> sgm = fxs.sparsify_graph(model, {"weights": [{"target": "fc1", "method": "l1_unstructured",
...                                               "sparsity": 0.5}]})     # doctest: +SKIP
>>> sgm.step(); print(sgm.report()); plain = sgm.squash()                 # doctest: +SKIP
"""

from __future__ import annotations

import warnings as _warnings

with _warnings.catch_warnings():  # numpy is not a dependency: torch.export's import warns when it is absent
    _warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch.export  # noqa: F401

# Load the modules that share a name with a function of the API first, so the functions win
# (a later first import of fx_sparsify.report would otherwise rebind fxs.report to the module).
from . import export as _export_module, report as _report_module  # noqa: F401
from . import data
from ._compressed import load_compressed, save_compressed
from .api import masks, report, sparsify_graph, sparsity, squash, step
from .export import export
from .methods import available_mask_methods, compute_mask, register_mask_method
from .methods.channel_importance import register_channel_importance
from .ops import set_cache_limit
from .sparse_graph_module import SparseGraphModule
from .sparsify import Sparsify
from .storage_choices import load_storage_choices, save_storage_choices
from .streamed import prune_streamed
from .spec import ActivationRule, ChannelRule, GlobalRule, SparsitySpec, WeightRule
from .trace import CaptureError
from .io import load_spec
from .viz import plot_mask, plot_sparsity  # matplotlib / pydot are imported on first use (extra `viz`)

try:
    from importlib.metadata import PackageNotFoundError as _NotInstalled, version as _version

    __version__: str = _version("fx-sparsify")
except _NotInstalled:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "ActivationRule",
    "ChannelRule",
    "CaptureError",
    "GlobalRule",
    "SparseGraphModule",
    "Sparsify",
    "SparsitySpec",
    "WeightRule",
    "available_mask_methods",
    "compute_mask",
    "data",
    "export",
    "load_compressed",
    "load_spec",
    "load_storage_choices",
    "masks",
    "plot_mask",
    "plot_sparsity",
    "prune_streamed",
    "register_channel_importance",
    "register_mask_method",
    "set_cache_limit",
    "report",
    "save_compressed",
    "save_storage_choices",
    "sparsify_graph",
    "sparsity",
    "squash",
    "step",
]
