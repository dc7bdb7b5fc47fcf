"""Channel analysis: which channel slices go together, for ``channels`` rules and ``squash(shrink=True)``.

The analysis reads top-down, each module importing only those above it:

- :mod:`.ops`: each node as an op (the tables :data:`FUNCTIONS`, :data:`METHODS`, :data:`MODULES`, and
  :data:`LAYERS`, where a layer keeps its operands);
- :mod:`.graph`: the graph's ops indexed, who reads each parameter, every value's shape;
- :mod:`.rules`: how each op kind maps a channel slot between its operands and its output (:data:`RULES`),
  and the :class:`Flood` that follows them;
- :mod:`.constants`: the constant a pruned zero-row channel carries, and where it folds;
- :mod:`.plan`: :func:`plan_channels`, the groups seeded by the spec's rules;
- :mod:`.masks`: scores, kept counts and keep-masks (:func:`channel_masks`, :func:`group_keeps`), and the
  report tables.

    >>> plan = plan_channels(gm, spec, model, aliases, example_inputs=(x,))  # doctest: +SKIP
    >>> plan.groups[0].members[:3]                                          # doctest: +SKIP
    [Member('conv1.weight', dim=0), Member('conv1.bias', dim=0), Member('bn1.weight', dim=0)]
"""

from __future__ import annotations

from .constants import ConstProgram, build_program, evaluate, fold_deltas
from .graph import ChannelGraph, Edit, Member, record_shapes
from .masks import (
    GroupScore,
    channel_masks,
    group_keeps,
    magnitude_scores,
    shrink_plan_table,
    shrink_summary,
    shrunk_sizes,
    unit_view,
)
from .ops import FUNCTIONS, LAYERS, METHODS, MODULES, arg_at, node_arg
from .plan import CHANNELS, ChannelGroup, ChannelPlan, heads_attention, passive_rules, plan_channels
from .rules import RULES, Flood, map_reshape

__all__ = [
    "CHANNELS",
    "ChannelGroup",
    "ChannelPlan",
    "Member",
    "Edit",
    "plan_channels",
    "passive_rules",
    "heads_attention",
    "channel_masks",
    "group_keeps",
    "GroupScore",
    "magnitude_scores",
    "unit_view",
    "shrink_plan_table",
    "shrink_summary",
    "shrunk_sizes",
    "record_shapes",
    "map_reshape",
    "ChannelGraph",
    "Flood",
    "ConstProgram",
    "build_program",
    "evaluate",
    "fold_deltas",
    "FUNCTIONS",
    "METHODS",
    "MODULES",
    "LAYERS",
    "RULES",
    "node_arg",
    "arg_at",
]
