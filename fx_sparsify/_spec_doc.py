"""The spec's keys in one text, appended to ``help(fxs.sparsify_graph)`` and ``SparsitySpec.from_dict``.

``tests/test_docs.py`` checks that every key the code accepts is named here and in the documentation's
spec reference (docs/spec.md).
"""

from __future__ import annotations

__all__ = ["SPEC_KEYS_DOC"]

SPEC_KEYS_DOC = """
    Spec keys (a dict, or a recipe file read by ``fxs.load_spec``; the documentation's spec reference,
    docs/spec.md, has types, defaults and examples):

    - ``seed`` (int, 0): seeds the random mask methods (per target name).
    - ``mode`` ("graph" | "inplace", "graph"): mask nodes in the graph, or weights zeroed in place.
    - ``weights``: list of rules, applied in order (the last rule that selects a tensor wins):
      ``target`` (module FQN, tensor FQN, glob, ``"re:<regex>"`` or ``"type:<Class>"``), ``method``
      (a mask method or shorthand such as ``"2:4"``, ``"TOPK{0.5}"``; ``"dense"`` excludes), the
      method's options as flat keys (``sparsity``, ``density``, ``n``, ``m``, ``dim``, ``p``,
      ``block_shape``, ``zeros_per_block``, ``threshold``), ``gradient`` ("mask" | "ste" |
      "supermask" | "joint"), ``scores`` (tensor FQN, callable or "wanda"), ``regrow`` (bool),
      ``schedule`` ({"kind": "cubic" | "linear", ...} or a callable step -> sparsity).
    - ``global``: rules ranking all their ``targets`` (a list of selectors) together: ``method``,
      options, ``scores``, ``regrow``.
    - ``activations``: rules masking a layer's input: ``target`` (the layer), ``aggregate`` (sum,
      abs_sum, sq_sum, max, abs_max or a callable), ``reduce`` (mean, sum, none or a callable),
      ``mask`` (a mask method or a callable) and its options, ``features`` + ``feature_dim``.
    - ``channels``: structured rules pruning output channels / heads: ``target``, ``sparsity``,
      ``heads``, ``p``, ``global``, ``round_to``, ``min_channels``, ``schedule``, ``importance``,
      ``reconstruct``, ``damp``, ``sequential`` (calibrated importance and consumer refit).
"""
