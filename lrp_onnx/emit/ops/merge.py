"""Layers that merge values: ``Add``/``Sum`` of activations (residual connections)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from lrp_onnx.emit.builder import Builder
from lrp_onnx.emit.denominators import divide
from lrp_onnx.emit.registry import (
    Kind,
    Sign,
    Support,
    conserves_default,
    declare,
    emitter,
    is_kind,
    spec_of,
)
from lrp_onnx.errors import UnsupportedOp, node_label
from lrp_onnx.frontend.graph import Graph
from lrp_onnx.frontend.layers import Layer, match_activation
from lrp_onnx.rules.core import Z_RULES, GradientRule, PassRule, Rule, UniformRule, rule_eps


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


def summands_are_data(layer: Layer, rule: Rule) -> bool:
    """A sum passes on all it receives (up to the stabilizer) when every summand is data; a
    constant or data-free summand (a position embedding) absorbs its share."""
    data = {t.name for t in layer.inputs}
    return conserves_default(layer, rule) and all(
        t.name in data for t in layer.primary.inputs if t.name)


#: Facts of the ops that combine data values elementwise.
_MERGE: dict[str, Any] = {"kind": Kind.MERGE, "sign": Sign.PRESERVES,
          "sign_condition": Graph.constant_operands_nonneg, "support": Support.PROPORTIONAL}


@emitter("Add", "Sum", rules=Z_RULES, merges=True, conserves=summands_are_data, **_MERGE)
@emitter("Sub", kind=Kind.MERGE, rules=Z_RULES, merges=True, support=Support.PROPORTIONAL,
         conserves=summands_are_data)
def add(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """Proportional split ``R_i = x_i * R / stab(sum_j x_j)`` (a subtrahend counts as ``-x``);
    constant summands absorb theirs."""
    node = layer.primary
    y = node.outputs[0]
    s = divide(b, r_out, y, rule_eps(rule))
    out_shape = b.graph.shape(y, node)
    result: list[gs.Tensor | None] = []
    data = [(j, x) for j, x in enumerate(node.inputs) if x.name in b.graph.data]
    for i, (j, x) in enumerate(data):
        t = b.op("Neg", s, tag=f"R{i}/neg") if node.op == "Sub" and j == 1 else s
        result.append(times_input(b, x, t, out_shape, f"R{i}"))
    return result


def _is_gate(op: str) -> bool:
    spec = spec_of(op)
    return spec is not None and spec.gate


def _activation_output(graph: Graph, t: gs.Tensor) -> bool:
    """Whether ``t`` is the output of an activation: a node of kind ``ACTIVATION`` or a
    multi-node one (SiLU ``x * Sigmoid(x)``, the GELU decompositions)."""
    node = graph.producer(t)
    if node is None:
        return False
    if is_kind(node.op, Kind.ACTIVATION):
        return True
    for u in graph.data_inputs(node):
        act = match_activation(graph, u, exclusive=False)
        if act is not None and act.output is t:
            return True
    return False


def _gate_index(b: Builder, layer: Layer) -> int:
    """Which of two data inputs of a ``Mul`` is the gate: the one a gate op (an op whose output
    lies in [0, 1]: Sigmoid, HardSigmoid, Softmax) made, else the one with fewer elements (a
    broadcast scale; with sizes known only at run time: the one whose dims are 1 where the
    other's are not), else, of two of one size, the one an activation made where the other is
    none (SwiGLU's ``silu(gate_proj(x)) * up_proj(x)``: LXT's CP-LRP holds the SiLU branch
    constant), else the second."""
    a, c = layer.inputs
    made = [b.graph.producer(t) for t in (a, c)]
    gated = [p is not None and _is_gate(p.op) for p in made]
    if gated[0] != gated[1]:
        return 0 if gated[0] else 1
    sizes = [b.graph.shape(t, layer.primary)[1:] for t in (a, c)]
    acts = [_activation_output(b.graph, t) for t in (a, c)]
    if all(d is not None for size in sizes for d in size):
        counts = [int(np.prod(size)) for size in sizes]  # type: ignore[arg-type]
        if counts[0] != counts[1]:
            return 0 if counts[0] < counts[1] else 1
        if acts[0] != acts[1]:
            return 0 if acts[0] else 1
        return 1
    # a size known only at run time: the gate is the input whose dims are 1 where the other's
    # are not (a per-channel scale [C, 1, 1] of a [C, H, W] value)
    rank = max(len(size) for size in sizes)
    one: list[int | None] = [1]
    full = [one * (rank - len(size)) + size for size in sizes]
    smaller = [any(d == 1 and o != 1 for d, o in zip(full[i], full[1 - i])) for i in (0, 1)]
    if smaller[0] != smaller[1]:
        return 0 if smaller[0] else 1
    if full[0] == full[1] and acts[0] != acts[1]:
        return 0 if acts[0] else 1
    return 1


@emitter("Mul", rules=(*Z_RULES, PassRule, GradientRule, UniformRule), groups=("ProductLayer",),
         **_MERGE)
def mul(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """A product ``x * g``: by default the gate ``g`` (a constant, or the Sigmoid/HardSigmoid
    input of a squeeze-excitation block) is a weight and all relevance goes to ``x``: ZeroRule/
    EpsilonRule ``R_x = x g R' / stab(x g)``, PassRule ``R_x = R'``. UniformRule (AttnLRP, two
    activations): ``R_a = R_b = a b R' / stab(2 a b)``. GradientRule gives Zennit's plain
    gradient ``R_x = g R'``, ``R_g = x R'`` (relevance is not conserved)."""
    node = layer.primary
    y = node.outputs[0]
    out_shape = b.graph.shape(y, node)
    ins = list(layer.inputs)
    if isinstance(rule, GradientRule):
        result: list[gs.Tensor | None] = []
        for i, x in enumerate(ins):
            others = [t for t in node.inputs if t is not x]
            other = others[0] if others else x  # x * x: d/dx = 2x, each input takes x R'
            r = b.op("Mul", other, r_out, tag=f"R{i}")
            result.append(unbroadcast(b, r, x, out_shape, tag=f"R{i}"))
        return result
    if isinstance(rule, UniformRule) and len(ins) == 2:
        s = b.op("Mul", divide(b, r_out, y, rule.eps / 2), b.scalar(0.5), tag="S")
        return [times_input(b, x, b.op("Mul", s, other, tag=f"g{i}"), out_shape, f"R{i}")
                for i, (x, other) in enumerate(zip(ins, ins[::-1]))]
    keep = 0 if len(ins) == 1 else 1 - _gate_index(b, layer)
    x = ins[keep]
    result = [None] * len(ins)
    if isinstance(rule, PassRule):
        result[keep] = unbroadcast(b, r_out, x, out_shape, tag="R")
        return result
    eps = rule_eps(rule)
    s = divide(b, r_out, y, eps)
    others = [t for t in node.inputs if t is not x]
    if eps == 0.0 and len(others) == 1:  # the gradient form: R_x = x * (g s)
        result[keep] = times_input(b, x, b.op("Mul", s, others[0], tag="g"), out_shape, "R")
    else:
        result[keep] = unbroadcast(b, b.op("Mul", y, s, tag="R"), x, out_shape, tag="R")
    return result


def times_input(b: Builder, x: gs.Tensor, t: gs.Tensor, out_shape: list[int | None],
                tag: str) -> gs.Tensor:
    """``x * t`` (``t`` shaped ``out_shape``) summed down to the shape of ``x``; recorded as
    ``x * t`` (the gradient form) where no sum is needed."""
    r = b.op("Mul", x, t, tag=tag)
    if b.graph.shape(x) == out_shape:
        return b.factored(r, x, t)
    return unbroadcast(b, r, x, out_shape, tag=tag)


# A quotient of two activations outside a recognised pattern (LayerNorm's decomposition) has no
# rule, nor has a constant divided by an activation (``Div(1, Sqrt(...))`` outside an RMSNorm):
# the layer view names them so, and they are refused with every other unsupported node at once.
declare("DivByActivation", "ReciprocalOfActivation", kind=Kind.ELEMENTWISE)


@emitter("Div", rules=(*Z_RULES, PassRule), kind=Kind.MERGE, support=Support.PROPORTIONAL,
         sign=Sign.PRESERVES, sign_condition=Graph.constant_operands_nonneg,
         product_kind="DivByActivation", reciprocal_kind="ReciprocalOfActivation")
def div(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """``x / c`` by a constant (or data-free) ``c``: a scaling, ZeroRule/EpsilonRule
    ``R_x = x (R' / stab(x / c)) / c``, PassRule ``R_x = R'``."""
    node, g = layer.primary, b.graph
    x = node.inputs[0]
    if len(layer.inputs) != 1 or x.name not in g.data:
        raise UnsupportedOp(f"node {node_label(node.name, node.op, g.opset)}: a division by "
                            "an activation (only x / constant is supported)")
    y = node.outputs[0]
    out_shape = g.shape(y, node)
    if isinstance(rule, PassRule):
        return [unbroadcast(b, r_out, x, out_shape, tag="R")]
    s = divide(b, r_out, y, rule_eps(rule))
    return [times_input(b, x, b.op("Div", s, node.inputs[1], tag="g"), out_shape, "R")]
