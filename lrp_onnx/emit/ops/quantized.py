"""Quantized models in ONNX Runtime's QDQ format: ``QuantizeLinear -> DequantizeLinear`` pairs.

``quantize_static(..., quant_format=QuantFormat.QDQ)`` writes every quantized activation as
``DequantizeLinear(QuantizeLinear(x, s, zp), s, zp)`` and every weight as
``DequantizeLinear(W_int8, s_w, zp_w)``. The forward pass keeps both as deployed. The layer view
takes a quantize/dequantize pair on the relevance path as one layer, ``QuantizeDequantize``, whose
input and output are float: relevance passes it unchanged (like an activation: the rule of the
layer before acts on its pre-quantization output), so no relevance ever sits on an integer
tensor. Weights: :meth:`lrp_onnx.frontend.graph.Graph.constant` gives the linear layers the
dequantized values (a float copy, see docs/wild-models.md). A ``QuantizeLinear`` or
``DequantizeLinear`` on the relevance path outside such a pair has no rule.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lrp_onnx.emit.builder import Builder
from lrp_onnx.emit.registry import Kind, Sign, Support, declare, emitter
from lrp_onnx.frontend.graph import Graph
from lrp_onnx.frontend.layers import Layer
from lrp_onnx.rules.core import ROUTING_RULES, Rule


def _params(graph: Graph, node: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """``(scale, zero point)`` of a QuantizeLinear/DequantizeLinear as constants, or ``None``."""
    scale = graph.optional_const(node, 1)
    zero = graph.optional_const(node, 2)
    if scale is None:
        return None
    return scale, (np.zeros((), dtype=np.int64) if zero is None else zero)


def _same_pair(graph: Graph, q: gs.Node, dq: gs.Node) -> bool:
    """``dq`` dequantizes with ``q``'s constant scale (positive) and zero point."""
    a, b = _params(graph, q), _params(graph, dq)
    if a is None or b is None or a[0].shape != b[0].shape or a[1].shape != b[1].shape:
        return False
    same = np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and \
        q.attrs.get("axis", 1) == dq.attrs.get("axis", 1)
    return bool(same and np.all(a[0] > 0))


def _quantize_clamps_at_zero(graph: Graph, node: gs.Node) -> bool:
    """The zero point is the integer type's minimum (a range starting at 0: ONNX Runtime's
    quantizer then drops the ReLU before it) and every reader dequantizes with the same
    parameters: each reader's output ``(q - zp) * s`` is then ``>= 0`` whatever the input."""
    params = _params(graph, node)
    if params is None or not np.issubdtype(params[1].dtype, np.integer):
        return False
    lowest = np.iinfo(params[1].dtype).min
    readers = graph.consumers(node.outputs[0])
    return bool(np.all(params[1] == lowest)) and bool(readers) and \
        all(r.op == "DequantizeLinear" and _same_pair(graph, node, r) for r in readers)


def _dequantize_pairs(graph: Graph, node: gs.Node) -> bool:
    """The input comes from a QuantizeLinear with the same parameters."""
    q = graph.producer(node.inputs[0])
    return q is not None and q.op == "QuantizeLinear" and _same_pair(graph, q, node)


# The int8 value of a clamping QuantizeLinear is marked non-negative in the sense of what it
# stands for (q >= zp), so that its DequantizeLinear's output, which is >= 0, is marked too.
declare("QuantizeLinear", kind=Kind.ELEMENTWISE, sign=Sign.NONNEG,
        sign_condition=_quantize_clamps_at_zero, quantizes=True)
declare("DequantizeLinear", kind=Kind.ELEMENTWISE, sign=Sign.PRESERVES,
        sign_condition=_dequantize_pairs, quantizes=True)
declare("DynamicQuantizeLinear", kind=Kind.ELEMENTWISE, quantizes=True)


def _summary(graph: Graph, layer: Layer) -> str:
    """``quantize(int8)``: the integer type the pair rounds to."""
    q = layer.nodes[1].inputs[0] if len(layer.nodes) > 1 else layer.primary.outputs[0]
    try:
        name = np.dtype(q.dtype).name
    except TypeError:
        name = "?"
    return f"quantize({name})"


@emitter("QuantizeDequantize", kind=Kind.IDENTITY, rules=ROUTING_RULES, support=Support.ROUTING,
         summary=_summary, reads_input=True)
def quantize_dequantize(b: Builder, layer: Layer, rule: Rule,
                        r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """``R = R'``: a quantize/dequantize pair passes relevance unchanged (as an activation)."""
    return [r_out]
