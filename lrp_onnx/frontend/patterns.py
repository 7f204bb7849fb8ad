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
class NormMatch:
    """What every matched normalization unit has.

    Attributes:
        nodes: every node of the unit, in the order the matcher found them.
        x: the normalized input.
        axes: the normalized axes (non-negative, the trailing ones).
        gamma: the constant scale, or ``None``.
        output: the unit's output ``y``.
    """

    nodes: tuple[gs.Node, ...]
    x: gs.Tensor
    axes: tuple[int, ...]
    gamma: gs.Tensor | None
    output: gs.Tensor


@dataclass(frozen=True)
class NormUnit(NormMatch):
    """A matched decomposed layer normalization (``nodes``: the first ``ReduceMean`` first).

    Attributes:
        std: the ``Sqrt`` output σ (the value held constant).
    """

    std: gs.Tensor


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


def _trailing_axes(graph: Graph, mean: gs.Node | None, rank: int) -> tuple[int, ...] | None:
    """The axes of ``mean`` if it is a ``keepdims`` ``ReduceMean`` over the trailing axes."""
    axes = _reduce_axes(graph, mean, rank) if mean is not None else None
    return axes if axes is not None and axes == tuple(range(axes[0], rank)) else None


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


def _by_constant(graph: Graph, value: gs.Tensor, op: str) -> gs.Node | None:
    """The single consumer of ``value`` if it is an ``op`` of ``value`` and a constant."""
    node = only_into(graph, value, op)
    other = _other(node, value) if node is not None else None
    return node if other is not None and graph.const_value(other) is not None else None


def _scaled(graph: Graph, out: gs.Tensor
            ) -> tuple[list[gs.Node], gs.Tensor | None, gs.Tensor]:
    """The ``Mul`` of ``out`` by a constant γ if one follows: ``([Mul], γ, its output)``, else
    ``([], None, out)``."""
    scale = _by_constant(graph, out, "Mul")
    return ([], None, out) if scale is None else ([scale], _other(scale, out), scale.outputs[0])


def _squares(graph: Graph, node: gs.Node, x: gs.Tensor) -> bool:
    """``node`` is ``Pow(x, 2)`` or ``Mul(x, x)``."""
    return len(node.inputs) == 2 and node.inputs[0] is x and (
        (node.op == "Pow" and _is(graph.const_value(node.inputs[1]), 2.0)) or
        (node.op == "Mul" and node.inputs[1] is x))


def _sqrt_plus_eps(graph: Graph, value: gs.Tensor) -> tuple[gs.Node, gs.Node] | None:
    """``Sqrt(value + eps)`` (``eps`` a constant) read from ``value`` alone: its ``Add`` and
    ``Sqrt`` nodes."""
    add = _by_constant(graph, value, "Add")
    sqrt = only_into(graph, add.outputs[0], "Sqrt") if add is not None else None
    return None if add is None or sqrt is None else (add, sqrt)


def match_layer_norm(graph: Graph, mean: gs.Node) -> NormUnit | None:
    """The decomposed layer normalization starting at the ``ReduceMean`` node ``mean``."""
    if mean.op != "ReduceMean" or not mean.inputs or mean.inputs[0].name not in graph.data:
        return None
    x = mean.inputs[0]
    rank = len(graph.shape(x))
    axes = _trailing_axes(graph, mean, rank)
    if axes is None:
        return None
    sub = only_into(graph, mean.outputs[0], "Sub")
    if sub is None or sub.inputs[0] is not x:
        return None
    c = sub.outputs[0]
    cons = list({id(n): n for n in graph.consumers(c)}.values())  # Mul(c, c) reads c twice
    square = next((n for n in cons if _squares(graph, n, c)), None)
    div = next((n for n in cons if n.op == "Div" and n.inputs[0] is c), None)
    if square is None or div is None or len(cons) != 2:
        return None
    var = only_into(graph, square.outputs[0], "ReduceMean")
    if var is None or _reduce_axes(graph, var, rank) != axes:
        return None
    root = _sqrt_plus_eps(graph, var.outputs[0])
    if root is None or div.inputs[1] is not root[1].outputs[0]:
        return None
    nodes = [mean, sub, square, var, *root, div]
    scale, gamma, out = _scaled(graph, div.outputs[0])
    nodes += scale
    shift = _by_constant(graph, out, "Add")
    if shift is not None:
        nodes.append(shift)
        out = shift.outputs[0]
    return NormUnit(tuple(nodes), x, axes, gamma, out, std=root[1].outputs[0])


def _is(value: np.ndarray | None, target: float) -> bool:
    return value is not None and value.size == 1 and float(value.ravel()[0]) == target


@dataclass(frozen=True)
class RMSUnit(NormMatch):
    """A matched decomposed RMS normalization ``y = x / sqrt(mean(x²) + eps) [* γ]``
    (``nodes``: the square ``Pow(x, 2)`` or ``Mul(x, x)`` first).

    Attributes:
        rms: the ``Sqrt`` output (the value held constant).
        inv: its reciprocal ``1 / rms`` where the model computes it (``Reciprocal``,
            ``Div(1, ·)``), else ``None`` (``x / rms``).
    """

    rms: gs.Tensor
    inv: gs.Tensor | None


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
    if not _squares(graph, square, x):
        return None
    rank = len(graph.shape(x))
    mean = only_into(graph, square.outputs[0], "ReduceMean")
    axes = _trailing_axes(graph, mean, rank)
    root = _sqrt_plus_eps(graph, mean.outputs[0]) if mean is not None else None
    if mean is None or axes is None or root is None:
        return None
    nodes = [square, mean, *root]
    rms = root[1].outputs[0]
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
    out = scaled.outputs[0]
    cast = _same_float_cast(graph, out)
    if cast is not None:
        nodes.append(cast)
        out = cast.outputs[0]
    scale, gamma, out = _scaled(graph, out)
    nodes += scale
    return RMSUnit(tuple(nodes), x, axes, gamma, out, rms=rms, inv=recip)
