"""Layers that merge values: ``Add``/``Sum`` of activations (residual connections)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..builder import Builder
from ..layers import Layer
from ..registry import relevance
from ..rules import Z_RULES, Rule, rule_eps
from ..stabilize import divide


def unbroadcast(b: Builder, value: gs.Tensor, like: gs.Tensor, node_shape: list[int | None],
                tag: str) -> gs.Tensor:
    """Sum ``value`` (shaped like the node output) down to the shape of the input ``like``."""
    shape = b.graph.shape(like)
    rank = len(node_shape)
    full = [1] * (rank - len(shape)) + list(shape)
    axes = [i for i, (d, o) in enumerate(zip(full, node_shape)) if d == 1 and o != 1]
    if axes:
        value = b.op("ReduceSum", value, b.ints(axes), tag=f"{tag}/sum", keepdims=1)
    if len(shape) != rank:
        value = b.reshape_like(value, like, tag=f"{tag}/reshape")
    return value


@relevance("Add", "Sum", rules=Z_RULES)
def add(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """Proportional split ``R_i = x_i * R / stab(sum_j x_j)``; constant summands absorb theirs."""
    node = layer.primary
    y = node.outputs[0]
    s = divide(b, r_out, y, rule_eps(rule))
    out_shape = b.graph.shape(y, node)
    result: list[gs.Tensor | None] = []
    for i, x in enumerate(layer.inputs):
        r = b.op("Mul", x, s, tag=f"R{i}")
        result.append(unbroadcast(b, r, x, out_shape, tag=f"R{i}"))
    return result
