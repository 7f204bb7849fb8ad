"""Layers that only move values: reshapes, transposes, concatenation, dropout, identity and
standalone activations. Relevance is routed as the gradient routes it (no ops for identity-like
layers); ZeroRule/EpsilonRule on them equal PassRule (RelevancePropagation.jl's fast path)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..builder import Builder
from ..errors import UnsupportedAttribute, node_label
from ..graph import attr, ints
from ..layers import ACTIVATION_OPS, Layer
from ..registry import relevance
from ..rules import ROUTING_RULES, Rule


@relevance("Flatten", "Reshape", "Squeeze", "Unsqueeze", rules=ROUTING_RULES)
def reshape(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """``R = reshape(R', shape(x))``."""
    x = layer.inputs[0]
    if layer.primary.inputs[0] is not x:
        raise UnsupportedAttribute(f"node {node_label(layer.name, layer.kind)}: the shape "
                                   "input depends on the data")
    return [b.reshape_like(r_out, x, tag="R")]


@relevance("Transpose", rules=ROUTING_RULES)
def transpose(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """``R = Transpose(R', inverse(perm))``."""
    rank = len(b.graph.shape(layer.inputs[0], layer.primary))
    perm = ints(attr(layer.primary, "perm", b.graph.opset, None)) or list(range(rank))[::-1]
    inverse = [0] * rank
    for i, p in enumerate(perm):
        inverse[p] = i
    return [b.op("Transpose", r_out, tag="R", perm=inverse)]


@relevance("Identity", *sorted(ACTIVATION_OPS), rules=ROUTING_RULES)
def identity(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """``R = R'``: identity and elementwise activations pass relevance unchanged (Zennit's Pass)."""
    return [r_out]


@relevance("Dropout", rules=ROUTING_RULES)
def dropout(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """``R = R'`` for inference-mode Dropout; a ``training_mode`` that may be true is refused."""
    node, g = layer.primary, b.graph
    if len(node.inputs) > 2 and node.inputs[2].name:
        mode = g.const_value(node.inputs[2])
        if mode is None or bool(mode):
            raise UnsupportedAttribute(f"node {node_label(node.name, node.op, g.opset)}: "
                                       "Dropout in training mode is random; export in eval mode")
    return [r_out]


@relevance("Concat", rules=ROUTING_RULES)
def concat(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """Each input gets back the slice of ``R'`` it produced (constant inputs absorb theirs)."""
    node, g = layer.primary, b.graph
    rank = len(g.shape(node.outputs[0], node))
    axis = int(attr(node, "axis", g.opset, 0)) % rank
    sizes = [g.shape(t, node)[axis] for t in node.inputs]
    if any(s is None for s in sizes):
        raise UnsupportedAttribute(f"node {node_label(node.name, node.op, g.opset)}: Concat "
                                   "along a dynamic axis")
    parts = b.op("Split", r_out, b.ints([int(s) for s in sizes]), tag="R",  # type: ignore[arg-type]
                 outputs=len(sizes), axis=axis)
    parts = parts if isinstance(parts, list) else [parts]
    return [p for t, p in zip(node.inputs, parts) if t.name in g.data]
