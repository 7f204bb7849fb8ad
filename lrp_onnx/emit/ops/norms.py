"""Normalizations: LayerNorm/RMSNorm (AttnLRP's identity rule on the division by σ) and LRN.

``y = γ (x − μ(x)) / σ(x) + β`` with σ held constant: the centring is linear (ε-rule), the
scalings by ``1/σ`` and ``γ`` are elementwise (identity) and ``β`` absorbs its share. This is
the LN-rule of Ali et al. (ICML 2022) and what LXT computes (``std.detach()``). RMS
normalization ``y = γ x / rms(x)`` (Llama) is the same with no centring and no ``β``: with the
rms held constant (LXT's ``LlamaRMSNorm`` patch detaches ``rsqrt``) it is an elementwise scaling.

Local response normalization ``y = x / (bias + α/size Σ_window x²)^β`` (AlexNet, GoogLeNet) is
the same with the denominator held constant: an elementwise scaling, through which the z-rule
at ε = 0 passes relevance unchanged. So relevance passes it as it is (the Caffe LRP toolbox's and
iNNvestigate's treatment), whatever rule the composite gives it (docs/wild-models.md).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from lrp_onnx.emit.builder import Builder
from lrp_onnx.emit.denominators import divide
from lrp_onnx.emit.registry import Kind, Sign, Support, conserves_default, emitter
from lrp_onnx.errors import UnsupportedOp, node_label
from lrp_onnx.frontend.graph import Graph, attr
from lrp_onnx.frontend.layers import Layer
from lrp_onnx.frontend.patterns import NormMatch, match_layer_norm, match_rms_norm
from lrp_onnx.rules.core import ROUTING_RULES, Z_RULES, PassRule, Rule, rule_eps


def _summary(graph: Graph, layer: Layer) -> str:
    node = layer.primary
    dims = graph.shape(node.inputs[1]) if len(node.inputs) > 1 else []
    shown = ", ".join(str(d) for d in dims)
    return f"LayerNorm({shown})" if len(dims) != 1 else f"LayerNorm({dims[0]})"


def _inv_std(b: Builder, node: gs.Node) -> gs.Tensor:
    """The forward node's ``InvStdDev`` output (optional output 2), added if the model does not
    read it: ONNX Runtime computes it anyway, ``y`` is unchanged."""
    if len(node.outputs) > 2 and node.outputs[2].name:
        return node.outputs[2]
    while len(node.outputs) < 2:
        node.outputs.append(gs.Variable.empty())
    inv = gs.Variable(b.name("inv_std"), dtype=np.float32)
    if len(node.outputs) == 2:
        node.outputs.append(inv)
    else:
        node.outputs[2] = inv
    return inv


def _unshifted(layer: Layer, rule: Rule) -> bool:
    """LN's rule passes on all it receives when no shift β is added after the normalization
    (``Σ R_x = Σ R (y − β) / y``): no β input, a zero one, or no final ``Add`` of a spelled-out
    LayerNorm."""
    if not conserves_default(layer, rule):
        return False
    node = layer.primary
    if node.op == "LayerNormalization":
        shift = node.inputs[2] if len(node.inputs) > 2 else None
    else:  # a spelled-out LayerNorm ends in its Div, the Mul by γ or the Add of a constant β
        last = layer.output.inputs[0]
        shift = next((t for t in last.inputs if isinstance(t, gs.Constant)), None) \
            if last.op == "Add" else None
    return shift is None or not shift.name or (
        isinstance(shift, gs.Constant) and not np.any(shift.values))


@emitter("LayerNormalization", kind=Kind.NORMALIZATION, rules=(*Z_RULES, PassRule),
         groups=("LayerNormLayer",), summary=_summary, support=Support.PROPORTIONAL,
         conserves=_unshifted)
def layer_normalization(b: Builder, layer: Layer, rule: Rule,
                        r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """``R_x = x * (gv − mean(gv)) / σ``, ``gv = γ R / stab(y)`` over the normalized axes (σ held
    constant: AttnLRP's LN rule); PassRule: ``R_x = R``."""
    if isinstance(rule, PassRule):
        return [r_out]
    node, g = layer.primary, b.graph
    x, y = node.inputs[0], node.outputs[0]
    if x.name not in g.data or any(t.name in g.data for t in node.inputs[1:]):
        raise UnsupportedOp(f"node {node_label(node.name, node.op, g.opset)}: only a "
                            "LayerNormalization with constant scale and bias is supported")
    shape = g.shape(x, node)
    rank = len(shape)
    axis = int(attr(node, "axis", g.opset, -1)) % rank
    sizes = shape[axis:]
    if None in sizes:
        raise UnsupportedOp(f"node {node_label(node.name, node.op, g.opset)}: normalizes over "
                            "an axis whose size is known only at run time")
    inv = _inv_std(b, node)
    if b.dtype != np.float32:
        inv = b.op("Cast", inv, tag="inv_std/cast",
                   to=int(helper.np_dtype_to_tensor_dtype(b.dtype)))
    s = divide(b, r_out, y, rule_eps(rule))
    return [_ln_rule(b, x, s, node.inputs[1], list(range(axis, rank)), sizes, inv, "Mul")]


def _ln_rule(b: Builder, x: gs.Tensor, s: gs.Tensor, gamma: gs.Tensor | None, axes: list[int],
             sizes: list[int | None], sigma: gs.Tensor, scale_op: str) -> gs.Tensor:
    """``x * (gv − mean(gv)) / σ`` with ``gv = γ s`` (``scale_op``: ``Mul`` by 1/σ or ``Div``
    by σ), recorded in the gradient form."""
    gv = s if gamma is None else b.op("Mul", s, gamma, tag="gv")
    total = b.op("ReduceSum", gv, b.ints(axes), tag="sum", keepdims=1)
    count = float(np.prod([int(d or 0) for d in sizes]))
    mean = b.op("Mul", total, b.scalar(1.0 / count), tag="mean")
    t = b.op(scale_op, b.op("Sub", gv, mean, tag="gc"), sigma, tag="g")
    return b.factored(b.op("Mul", x, t, tag="R"), x, t)


def _unit_summary(name: str, match: Callable[[Graph, gs.Node], NormMatch | None]
                  ) -> Callable[[Graph, Layer], str]:
    """``name(sizes of the normalized axes)`` of a matched multi-node norm."""

    def summary(graph: Graph, layer: Layer) -> str:
        unit = match(graph, layer.primary)
        shape = graph.shape(layer.inputs[0])
        dims = [shape[a] for a in unit.axes] if unit is not None else []
        return f"{name}({', '.join('?' if d is None else str(d) for d in dims)})"

    return summary


@emitter("DecomposedLayerNorm", kind=Kind.NORMALIZATION, rules=(*Z_RULES, PassRule),
         groups=("LayerNormLayer",), summary=_unit_summary("LayerNorm", match_layer_norm),
         support=Support.PROPORTIONAL, conserves=_unshifted)
def decomposed_layer_norm(b: Builder, layer: Layer, rule: Rule,
                          r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """The LN rule on ``(x − mean) / σ [* γ] [+ β]`` spelled out in elementwise ops: ``R_x = x *
    (gv − mean(gv)) / σ``, ``gv = γ R / stab(y)``; PassRule: ``R_x = R``."""
    if isinstance(rule, PassRule):
        return [r_out]
    unit = match_layer_norm(b.graph, layer.primary)
    assert unit is not None  # the layer view matched it
    sizes = [b.graph.shape(unit.x)[a] for a in unit.axes]
    if None in sizes:
        raise UnsupportedOp(f"node {node_label(layer.name, layer.kind)}: normalizes over an "
                            "axis whose size is known only at run time")
    s = divide(b, r_out, unit.output, rule_eps(rule))
    return [_ln_rule(b, unit.x, s, unit.gamma, list(unit.axes), sizes, unit.std, "Div")]




@emitter("RMSNorm", kind=Kind.NORMALIZATION, rules=(*Z_RULES, PassRule),
         groups=("LayerNormLayer",), summary=_unit_summary("RMSNorm", match_rms_norm),
         support=Support.PROPORTIONAL)
def rms_norm(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """``R_x = x * γ R / stab(y) / rms`` (the rms held constant: LXT's RMSNorm rule; ``R_x = R``
    at ε = 0), recorded in the gradient form; PassRule: ``R_x = R``."""
    if isinstance(rule, PassRule):
        return [r_out]
    unit = match_rms_norm(b.graph, layer.primary)
    assert unit is not None  # the layer view matched it
    s = divide(b, r_out, unit.output, rule_eps(rule))
    gv = s if unit.gamma is None else b.op("Mul", s, unit.gamma, tag="gv")
    if unit.x.dtype is not None and unit.output.dtype is not None and \
            np.dtype(unit.x.dtype) != np.dtype(unit.output.dtype):  # computed in another type
        gv = b.op("Cast", gv, tag="gv/cast",
                  to=int(helper.np_dtype_to_tensor_dtype(np.dtype(unit.x.dtype))))
    t = b.op("Div", gv, unit.rms, tag="g") if unit.inv is None else \
        b.op("Mul", gv, unit.inv, tag="g")
    return [b.factored(b.op("Mul", unit.x, t, tag="R"), unit.x, t)]


def _lrn_summary(graph: Graph, layer: Layer) -> str:
    return f"LRN({int(attr(layer.primary, 'size', graph.opset, 0))})"


def _lrn_bias_nonneg(graph: Graph, node: gs.Node) -> bool:
    """With ``bias >= 0`` the denominator is positive, so ``y`` has the sign of ``x``."""
    return float(attr(node, "bias", graph.opset, 1.0)) >= 0.0


@emitter("LRN", kind=Kind.NORMALIZATION, rules=ROUTING_RULES, groups=("NormalizationLayer",),
         summary=_lrn_summary, sign=Sign.PRESERVES, sign_condition=_lrn_bias_nonneg,
         support=Support.ROUTING)
def lrn(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """``R = R'``: relevance passes a local response normalization unchanged (its denominator
    held constant; the Caffe LRP toolbox's and iNNvestigate's rule)."""
    return [r_out]
