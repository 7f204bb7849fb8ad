"""Multi-node patterns that are one layer: a layer (or RMS) normalization spelled out in
elementwise ops.

Exporters write ``LayerNormalization`` below opset 17 (and after LXT's patches) as
``mean = ReduceMean(x); c = x - mean; sd = Sqrt(ReduceMean(c * c) + eps); y = c / sd [* γ] [+ β]``.
AttnLRP's LN rule needs the whole unit (σ is held constant, the centring is linear), so the
layer view makes it one layer of kind ``DecomposedLayerNorm``. Llama's RMS normalization
``y = γ x / sqrt(mean(x²) + eps)`` (no opset before 23 has it as one op) is likewise one layer,
of kind ``RMSNorm`` (:func:`match_rms_norm`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from lrp_onnx.frontend.graph import Graph, attr, ints


@dataclass(frozen=True)
class NormUnit:
    """A matched decomposed layer normalization.

    Attributes:
        nodes: every node, the first ``ReduceMean`` first.
        x: the normalized input.
        axes: the normalized axes (non-negative).
        std: the ``Sqrt`` output σ (the value held constant).
        gamma: the constant scale, or ``None``.
        output: the unit's output ``y``.
    """

    nodes: tuple[gs.Node, ...]
    x: gs.Tensor
    axes: tuple[int, ...]
    std: gs.Tensor
    gamma: gs.Tensor | None
    output: gs.Tensor


def _reduce_axes(graph: Graph, node: gs.Node, rank: int) -> tuple[int, ...] | None:
    if node.op != "ReduceMean" or int(attr(node, "keepdims", graph.opset, 1)) != 1:
        return None
    axes = ints(node.attrs.get("axes")) if "axes" in node.attrs else None
    if axes is None and len(node.inputs) > 1:
        value = graph.const_value(node.inputs[1])
        axes = None if value is None else [int(a) for a in value.ravel()]
    if not axes:
        return None
    return tuple(sorted(a % rank for a in axes))


def only_into(graph: Graph, value: gs.Tensor, op: str) -> gs.Node | None:
    """The single consumer of an internal ``value`` if it is an ``op`` node."""
    cons = graph.consumers(value)
    if len(cons) != 1 or cons[0].op != op or graph.is_graph_output(value) or \
            value.name == graph.logits.name:
        return None
    return cons[0]


def _other(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    if len(node.inputs) != 2 or t not in node.inputs:
        return None
    return node.inputs[1] if node.inputs[0] is t else node.inputs[0]


def match_layer_norm(graph: Graph, mean: gs.Node) -> NormUnit | None:
    """The decomposed layer normalization starting at the ``ReduceMean`` node ``mean``."""
    if mean.op != "ReduceMean" or not mean.inputs or mean.inputs[0].name not in graph.data:
        return None
    x = mean.inputs[0]
    rank = len(graph.shape(x))
    axes = _reduce_axes(graph, mean, rank)
    if axes is None or axes != tuple(range(axes[0], rank)):
        return None
    sub = only_into(graph, mean.outputs[0], "Sub")
    if sub is None or sub.inputs[0] is not x:
        return None
    c = sub.outputs[0]
    cons = graph.consumers(c)
    square = next((n for n in cons if (n.op == "Pow" and n.inputs[0] is c and
                                       _is(graph.const_value(n.inputs[1]), 2.0)) or
                   (n.op == "Mul" and n.inputs[0] is c and n.inputs[1] is c)), None)
    div = next((n for n in cons if n.op == "Div" and n.inputs[0] is c), None)
    if square is None or div is None or len(cons) != 2:
        return None
    var = only_into(graph, square.outputs[0], "ReduceMean")
    if var is None or _reduce_axes(graph, var, rank) != axes:
        return None
    add = only_into(graph, var.outputs[0], "Add")
    eps = _other(add, var.outputs[0]) if add is not None else None
    if add is None or eps is None or graph.const_value(eps) is None:
        return None
    sqrt = only_into(graph, add.outputs[0], "Sqrt")
    if sqrt is None or div.inputs[1] is not sqrt.outputs[0]:
        return None
    nodes = [mean, sub, square, var, add, sqrt, div]
    out, gamma = div.outputs[0], None
    scale = only_into(graph, out, "Mul")
    if scale is not None and graph.const_value(_other(scale, out) or out) is not None:
        gamma = _other(scale, out)
        nodes.append(scale)
        out = scale.outputs[0]
    shift = only_into(graph, out, "Add")
    if shift is not None and graph.const_value(_other(shift, out) or out) is not None:
        nodes.append(shift)
        out = shift.outputs[0]
    return NormUnit(tuple(nodes), x, axes, sqrt.outputs[0], gamma, out)


def _is(value: np.ndarray | None, target: float) -> bool:
    return value is not None and value.size == 1 and float(value.ravel()[0]) == target


@dataclass(frozen=True)
class RMSUnit:
    """A matched decomposed RMS normalization ``y = x / sqrt(mean(x²) + eps) [* γ]``.

    Attributes:
        nodes: every node, the square (``Pow(x, 2)`` or ``Mul(x, x)``) first.
        x: the normalized input.
        axes: the normalized axes (non-negative, the trailing ones).
        rms: the ``Sqrt`` output (the value held constant).
        inv: its reciprocal ``1 / rms`` where the model computes it (``Reciprocal``,
            ``Div(1, ·)``), else ``None`` (``x / rms``).
        gamma: the constant scale, or ``None``.
        output: the unit's output ``y``.
    """

    nodes: tuple[gs.Node, ...]
    x: gs.Tensor
    axes: tuple[int, ...]
    rms: gs.Tensor
    inv: gs.Tensor | None
    gamma: gs.Tensor | None
    output: gs.Tensor


def _same_float_cast(graph: Graph, value: gs.Tensor) -> gs.Node | None:
    """The single consumer of ``value`` if it is a ``Cast`` to the type ``value`` has."""
    cast = only_into(graph, value, "Cast")
    if cast is None or value.dtype is None or cast.outputs[0].dtype is None:
        return None
    return cast if np.dtype(cast.outputs[0].dtype) == np.dtype(value.dtype) else None


def match_rms_norm(graph: Graph, square: gs.Node) -> RMSUnit | None:
    """The decomposed RMS normalization starting at the square ``Pow(x, 2)`` (or ``Mul(x, x)``)
    of a data value ``x``, as both torch exporters write Llama's ``LlamaRMSNorm``:

    * dynamo: ``Pow -> ReduceMean(-1) -> Add(eps) -> Sqrt -> Reciprocal -> Mul(x, ·) ->
      Mul(γ, ·)``;
    * legacy: ``Pow -> ReduceMean -> Add -> Sqrt -> Div(1, ·) -> Mul(x, ·) -> Cast -> Mul(γ, ·)``
      (``x`` is the output of a float-to-float ``Cast``, which stays a layer of its own because
      the residual sum reads it too);

    and ``Div(x, Sqrt(...))`` (no reciprocal)."""
    if not square.inputs or square.inputs[0].name not in graph.data:
        return None
    x = square.inputs[0]
    if not ((square.op == "Pow" and len(square.inputs) == 2 and
             _is(graph.const_value(square.inputs[1]), 2.0)) or
            (square.op == "Mul" and len(square.inputs) == 2 and square.inputs[1] is x)):
        return None
    rank = len(graph.shape(x))
    mean = only_into(graph, square.outputs[0], "ReduceMean")
    axes = _reduce_axes(graph, mean, rank) if mean is not None else None
    if mean is None or axes is None or axes != tuple(range(axes[0], rank)):
        return None
    add = only_into(graph, mean.outputs[0], "Add")
    eps = _other(add, mean.outputs[0]) if add is not None else None
    if add is None or eps is None or graph.const_value(eps) is None:
        return None
    sqrt = only_into(graph, add.outputs[0], "Sqrt")
    if sqrt is None:
        return None
    nodes = [square, mean, add, sqrt]
    rms = sqrt.outputs[0]
    cons = graph.consumers(rms)
    if len(cons) != 1 or graph.is_graph_output(rms):
        return None
    inv = cons[0]
    recip: gs.Tensor | None = None
    if inv.op == "Div" and inv.inputs[0] is x and inv.inputs[1] is rms:
        scaled = inv  # x / rms
    else:
        recip = inv.outputs[0]
        one = inv.op == "Reciprocal" or (inv.op == "Div" and inv.inputs[1] is rms and
                                          _is(graph.const_value(inv.inputs[0]), 1.0))
        scaled = only_into(graph, inv.outputs[0], "Mul") if one else None
        if scaled is None or _other(scaled, inv.outputs[0]) is not x:
            return None
        nodes.append(inv)
    nodes.append(scaled)
    out, gamma = scaled.outputs[0], None
    cast = _same_float_cast(graph, out)
    if cast is not None:
        nodes.append(cast)
        out = cast.outputs[0]
    scale = only_into(graph, out, "Mul")
    if scale is not None and graph.const_value(_other(scale, out) or out) is not None:
        gamma = _other(scale, out)
        nodes.append(scale)
        out = scale.outputs[0]
    return RMSUnit(tuple(nodes), x, axes, rms, recip, gamma, out)
