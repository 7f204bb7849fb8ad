"""The ops of attention: ``Softmax`` inside the graph and the ``MatMul`` of two activations.

AttnLRP (Achtibat et al., ICML 2024) explains attention with the softmax rule (Prop. 3.1) and the
uniform rule on products of activations (Prop. 3.2/3.3); CP-LRP (Ali et al., ICML 2022) holds the
attention weights constant, so ``A V`` is a linear map of ``V`` and nothing reaches the scores.
Both are local rules, emitted here; the composites ``AttnLRP()`` and ``CPLRP()`` pick them.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from lrp_onnx.emit.builder import Builder
from lrp_onnx.emit.denominators import divide
from lrp_onnx.emit.ops.merge import times_input
from lrp_onnx.emit.registry import Kind, Sign, emitter, spec_of
from lrp_onnx.errors import RuleNotApplicable, UnsupportedAttribute, UnsupportedOp, node_label
from lrp_onnx.frontend.graph import Graph, attr
from lrp_onnx.frontend.layers import Layer, fmt_tuple
from lrp_onnx.rules.core import Z_RULES, Rule, UniformRule, rule_eps


def _softmax_summary(graph: Graph, layer: Layer) -> str:
    axis = int(attr(layer.primary, "axis", graph.opset, -1))
    return f"softmax(axis={axis})"


@emitter("Softmax", kind=Kind.OUTPUT, rules=Z_RULES, head=True, sign=Sign.NONNEG, gate=True,
         groups=("SoftmaxLayer",), summary=_softmax_summary,
         conserves=lambda layer, rule: False)  # Σ R_x = Σ x R − (Σ x s) Σ R
def softmax(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """AttnLRP's softmax rule ``R_x = x * (R - s * sum(R))`` along the axis (``-inf`` x -> 0).

    This is the z-rule ``x * J^T (R / s)`` of the softmax ``s`` with the division cancelled
    (``s > 0``, so no stabilizer is needed and ε is not used). A trailing Softmax is an output
    head and is explained through; this emitter serves one inside the graph (attention).
    """
    node, g = layer.primary, b.graph
    x = layer.inputs[0]
    rank = len(g.shape(x, node))
    axis = int(attr(node, "axis", g.opset, -1 if g.opset >= 13 else 1)) % rank
    if g.opset < 13 and axis != rank - 1:
        raise UnsupportedAttribute(f"node {node_label(node.name, node.op, g.opset)}: a "
                                   "Softmax before opset 13 flattens from its axis; only the "
                                   "last axis is supported")
    s = node.outputs[0]
    total = b.op("ReduceSum", r_out, b.ints([axis]), tag="sumR", keepdims=1)
    d = b.op("Sub", r_out, b.op("Mul", s, total, tag="s_sumR"), tag="d")
    # masked positions (x = -inf) get no relevance: x * d would be -inf * 0 = NaN there
    inf = b.op("IsInf", x, tag="isinf")
    x0 = b.op("Where", inf, b.scalar(0.0), x, tag="x0")
    r_in = b.op("Mul", x0, d, tag="R")
    b.factored(r_in, x, b.later(lambda: b.op("Where", inf, b.scalar(0.0), d, tag="g")))
    return [r_in]


def _bilinear_summary(graph: Graph, layer: Layer) -> str:
    a, c = (graph.shape(t, layer.primary)[-2:] for t in layer.inputs)
    shown = [fmt_tuple(dims) for dims in (a, c)]
    return f"BilinearMatMul({shown[0]} × {shown[1]})"


def _swap_last(b: Builder, t: gs.Tensor, rank: int, tag: str) -> gs.Tensor:
    perm = list(range(rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    return b.op("Transpose", t, tag=tag, perm=perm)


def _is_gate(graph: Graph, t: gs.Tensor) -> bool:
    """Whether ``t`` is made by a gate op (a Softmax), seen through Casts and Identities (the
    legacy exporter writes ``Softmax -> Cast -> MatMul``)."""
    producer = graph.producer(t)
    spec = spec_of(str(producer.op)) if producer is not None else None
    while producer is not None and spec is not None and spec.kind is Kind.IDENTITY and \
            graph.data_inputs(producer):
        producer = graph.producer(graph.data_inputs(producer)[0])
        spec = spec_of(str(producer.op)) if producer is not None else None
    return spec is not None and spec.gate


@emitter("BilinearMatMul", kind=Kind.MERGE, rules=(*Z_RULES, UniformRule),
         groups=("ProductLayer",), summary=_bilinear_summary)
def bilinear_matmul(b: Builder, layer: Layer, rule: Rule,
                    r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """``O = A B`` of two activations. UniformRule (AttnLRP): ``R_A = A * (S Bᵀ)``, ``R_B = B *
    (Aᵀ S)``, ``S = R / stab(2 O)``; ZeroRule/EpsilonRule (CP-LRP): the gate operand (a Softmax
    output, the attention weights) is held constant, the other gets all: ``R_V = V * (Aᵀ S)``,
    ``S = R / stab(O)``."""
    node, g = layer.primary, b.graph
    a, c = node.inputs[0], node.inputs[1]
    out = node.outputs[0]
    ranks = [len(g.shape(t, node)) for t in (a, c)]
    if min(ranks) < 2:
        raise UnsupportedOp(f"node {node_label(node.name, node.op, g.opset)}: a MatMul of two "
                            "activations with a 1-D operand")
    rank = len(g.shape(out, node))
    out_shape = g.shape(out, node)
    if isinstance(rule, UniformRule):
        s = b.op("Mul", divide(b, r_out, out, rule.eps / 2), b.scalar(0.5), tag="S")
        wanted = [True, True]
    else:
        gates = [_is_gate(g, t) for t in (a, c)]
        if gates[0] == gates[1]:
            raise RuleNotApplicable(
                f"{rule!r} on layer {layer.index + 1} {node_label(node.name, node.op)}: the "
                "ε-rule on a product of two activations holds its gate (a Softmax output) "
                f"constant, and {'both' if gates[0] else 'neither'} operand is one; use "
                "UniformRule() (AttnLRP)")
        s = divide(b, r_out, out, rule_eps(rule), tag="S")
        wanted = [not gates[0], not gates[1]]
    result: list[gs.Tensor | None] = []
    for i, (x, want) in enumerate(zip((a, c), wanted)):
        if not want or x.name not in g.data:
            result.append(None)
            continue
        if i == 0:
            t = b.op("MatMul", s, _swap_last(b, c, ranks[1], "BT"), tag="SBT")
        else:
            t = b.op("MatMul", _swap_last(b, a, ranks[0], "AT"), s, tag="ATS")
        full = out_shape[:rank - 2] + g.shape(x, node)[-2:]  # x broadcast over batch dims
        result.append(times_input(b, x, t, full, f"R{i}"))
    return [r for r, x in zip(result, node.inputs) if x.name in g.data]

