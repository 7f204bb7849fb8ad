"""Conv, Gemm, MatMul as :class:`~lrp_onnx.emit.linear.LinearOp` s (forward with modified
parameters, transpose), with BatchNormalization and ``Add(const)`` bias folding."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from lrp_onnx.emit.builder import Builder
from lrp_onnx.emit.linear import LinearOp, emit_linear
from lrp_onnx.emit.ops.windows import explicit_pads, fit_like, transpose_geometry
from lrp_onnx.emit.registry import Kind, Support, declare, emitter
from lrp_onnx.errors import UnsupportedAttribute, UnsupportedModel, UnsupportedOp, node_label
from lrp_onnx.frontend.graph import Graph, attr, check_attrs, ints
from lrp_onnx.frontend.layers import Layer, fmt_tuple, window_args
from lrp_onnx.rules.core import (
    LINEAR_RULES,
    AlphaBetaRule,
    FlatRule,
    GradientRule,
    LinearRule,
    PassRule,
    Rule,
    WSquareRule,
    ZBoxRule,
)


def _affine(bn: gs.Node, eps: float) -> tuple[np.ndarray, np.ndarray]:
    gamma, beta, mean, var = (np.asarray(Graph.const_value(t), dtype=np.float64)
                              for t in bn.inputs[1:5])
    a = gamma / np.sqrt(var + eps)
    return a, beta - mean * a


def bn_affine(graph: Graph, bn: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    """``(a, c)`` with ``BN(y) = a * y + c`` per channel, in float64 (BN epsilon included):
    ``a = γ/√(σ²+ε)``, ``c = β − μa``, of an inference BatchNormalization (constant
    statistics, as the layer view requires)."""
    check_attrs(bn, graph.opset, {"epsilon": None, "momentum": None, "training_mode": (0,),
                                  "spatial": (1,)})
    return _affine(bn, float(attr(bn, "epsilon", graph.opset, 1e-5)))


def _bn_scale_shift(b: Builder, layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """The folded BatchNormalization's ``(a, c)``."""
    assert layer.batchnorm is not None
    return bn_affine(b.graph, layer.batchnorm)


def _bias_add_vector(b: Builder, layer: Layer, channels: int, feature_axis: int,
                     rank: int) -> np.ndarray:
    """The per-feature vector of a folded ``Add(const)``."""
    node = layer.bias_add
    assert node is not None
    other = [t for t in node.inputs if isinstance(t, gs.Constant)][0]
    value = np.asarray(other.values, dtype=np.float64)
    shape = [1] * rank
    shape[feature_axis] = channels
    return np.broadcast_to(value, shape).reshape(channels).copy()


class ConvOp(LinearOp):
    """``Conv`` (1-D, 2-D, 3-D; any stride, padding, dilation, group); transpose = ConvTranspose."""

    def __init__(self, b: Builder, layer: Layer) -> None:
        super().__init__(b, layer)
        node, g = layer.primary, b.graph
        check_attrs(node, g.opset, {"auto_pad": None, "dilations": None, "group": None,
                                    "kernel_shape": None, "pads": None, "strides": None})
        w = g.constant(node.inputs[1])  # an initializer, or a dequantized copy for relevance
        if w is None:
            raise UnsupportedOp(f"node {node_label(node.name, node.op, g.opset)}: weight "
                                f"'{node.inputs[1].name}' is not a constant")
        nd = len(w.shape) - 2
        self.kernel = ints(attr(node, "kernel_shape", g.opset, None)) or list(w.shape[2:])
        self.strides = ints(attr(node, "strides", g.opset, None)) or [1] * nd
        self.dilations = ints(attr(node, "dilations", g.opset, None)) or [1] * nd
        self.group = int(attr(node, "group", g.opset, 1))
        x = layer.inputs[0]
        channels = g.shape(x, node)[1]
        if channels is not None and channels != int(w.shape[1]) * self.group:
            # ONNX shape inference does not check it, and ONNX Runtime's CPU Conv may run it
            raise UnsupportedModel(
                f"{g.label}: node {node_label(node.name, node.op, g.opset)} reads {channels} "
                f"channels but its weight '{w.name}' {list(w.shape)} with group={self.group} "
                f"takes {int(w.shape[1]) * self.group}")
        # spatial sizes; None where unknown before run time (a dynamic image size)
        self.in_spatial = g.shape(x, node)[2:]
        self.out_spatial = g.shape(node.outputs[0], node)[2:]
        self.pads = explicit_pads(node, g.opset, self.in_spatial, self.kernel, self.strides,
                                  self.dilations)
        self.t_pads, self.output_padding, self.extra = transpose_geometry(
            self.in_spatial, self.out_spatial, self.kernel, self.strides, self.dilations,
            self.pads)
        channels = int(w.shape[0])
        scale: np.ndarray | None = None
        bias: np.ndarray | None = None
        if g.optional_input(node, 2) is not None:
            bias_t = g.constant(node.inputs[2])
            if bias_t is None:
                raise UnsupportedOp(f"node {node_label(node.name, node.op, g.opset)}: bias is "
                                    "not a constant")
            bias = np.asarray(bias_t.values, dtype=np.float64)
            self.bias_tensor = bias_t
        if layer.bias_add is not None:
            add = _bias_add_vector(b, layer, channels, 1, nd + 2)
            bias = add if bias is None else bias + add
            self.bias_tensor = None
        if layer.batchnorm is not None:
            a, c = _bn_scale_shift(b, layer)
            scale = a.reshape([-1] + [1] * (nd + 1))
            bias = (np.zeros(channels) if bias is None else bias) * a + c
            self.bias_tensor = None
        else:
            self.weight_tensor = w

        def effective() -> np.ndarray:
            weight = np.asarray(w.values, dtype=np.float64)
            return weight if scale is None else weight * scale

        self.weight, self.bias = effective, bias
        self.weight_source, self.weight_scale = w, scale

    def _attrs(self) -> dict[str, Any]:
        return {"kernel_shape": self.kernel, "strides": self.strides, "pads": self.pads,
                "dilations": self.dilations, "group": self.group}

    def forward(self, x: gs.Tensor, w: gs.Tensor, bias: gs.Tensor | None) -> gs.Tensor:
        return self.b.op("Conv", x, w, *([bias] if bias is not None else []), tag="z/conv",
                         **self._attrs())

    def transpose(self, s: gs.Tensor, w: gs.Tensor) -> gs.Tensor:
        pads = self._conv_pads()
        if pads is not None and self.b.options.conv_transpose_as_conv:
            if self.b.options.modifiers_as_ops:
                wt = self.b.cached(("flipped", w.name), lambda: self._flip_ops(w))
            else:
                assert isinstance(w, gs.Constant)
                wt = self.b.cached(("flipped", w.name), lambda: self.b.const(
                    _flip_transpose(np.asarray(w.values), self.group), "W/flipT",
                    dtype=np.asarray(w.values).dtype))
            return self.b.op("Conv", s, wt, tag="convT", kernel_shape=self.kernel,
                             strides=self.strides, pads=pads, dilations=self.dilations,
                             group=self.group)
        if self.extra is None:
            return self.b.op("ConvTranspose", s, w, tag="convT",
                             output_padding=self.output_padding, **self._attrs())
        # output_padding depends on a size known only at run time: fit the shape then
        back = self.b.op("ConvTranspose", s, w, tag="convT", output_padding=self.output_padding,
                         **{**self._attrs(), "pads": self.t_pads})
        nd = len(self.kernel)
        begin = [p - t for p, t in zip(self.pads[:nd], self.t_pads[:nd])]
        return fit_like(self.b, back, self.layer.inputs[0], self.extra, tag="convT/fit",
                        begin=begin)

    def _flip_ops(self, w: gs.Tensor) -> gs.Tensor:
        """:func:`_flip_transpose` as ops on ``w`` (constant-folded by ONNX Runtime)."""
        b = self.b
        assert self.weight_source is not None
        c_out, c_in_g, *k = (int(d) for d in self.weight_source.shape)
        g = self.group
        if g > 1:
            w = b.op("Reshape", w, b.ints([g, c_out // g, c_in_g, *k]), tag="W/groups")
            perm = [0, 2, 1, *range(3, 3 + len(k))]
            w = b.op("Transpose", w, tag="W/swap", perm=perm)
            w = b.op("Reshape", w, b.ints([g * c_in_g, c_out // g, *k]), tag="W/ungroup")
        else:
            w = b.op("Transpose", w, tag="W/swap", perm=[1, 0, *range(2, 2 + len(k))])
        if all(d == 1 for d in k):
            return w  # nothing to flip
        axes = list(range(2, 2 + len(k)))
        big = np.iinfo(np.int64).max
        return b.op("Slice", w, b.ints([-1] * len(k)), b.ints([-big] * len(k)), b.ints(axes),
                    b.ints([-1] * len(k)), tag="W/flipT")

    def _conv_pads(self) -> list[int] | None:
        """Pads of the ``Conv`` equal to this layer's transpose, or ``None`` when there is none
        (a stride above 1, or a forward padding wider than the dilated kernel). A 1x1 kernel is
        included: ONNX Runtime's CPU ``Conv`` runs it in its blocked layout, faster than its
        ``ConvTranspose`` (see docs/performance.md)."""
        n = len(self.kernel)
        if any(s != 1 for s in self.strides) or any(self.output_padding):
            return None
        span = [(k - 1) * d for k, d in zip(self.kernel, self.dilations)]
        pads = [span[i % n] - p for i, p in enumerate(self.pads)]
        return pads if min(pads) >= 0 else None


def _flip_transpose(weight: np.ndarray, group: int) -> np.ndarray:
    """``[C_out, C_in/g, *k]`` -> ``[C_in, C_out/g, *k]`` per group, kernel flipped in every
    spatial axis: the weights of the Conv that computes this Conv's transpose (stride 1)."""
    c_out, c_in_g, *k = weight.shape
    w = weight.reshape(group, c_out // group, c_in_g, *k).swapaxes(1, 2)
    w = w.reshape(group * c_in_g, c_out // group, *k)
    return np.ascontiguousarray(np.flip(w, axis=tuple(range(2, w.ndim))))


class GemmOp(LinearOp):
    """``Gemm`` with a constant B: ``alpha * x @ B' + beta * C``; transpose = Gemm with
    the other ``transB`` (the model's weight tensor is reused, never transposed in Python)."""

    def __init__(self, b: Builder, layer: Layer) -> None:
        super().__init__(b, layer)
        node, g = layer.primary, b.graph
        check_attrs(node, g.opset, {"alpha": None, "beta": None, "transA": (0,),
                                    "transB": (0, 1)})
        w = g.constant(node.inputs[1])
        if w is None or node.inputs[0].name not in g.data:
            raise UnsupportedOp(f"node {node_label(node.name, node.op, g.opset)}: only "
                                "x @ W with a constant W is supported")
        alpha = float(attr(node, "alpha", g.opset, 1.0))
        beta = float(attr(node, "beta", g.opset, 1.0))
        self.trans_b = int(attr(node, "transB", g.opset, 0))
        channels = int(w.shape[0] if self.trans_b else w.shape[1])
        scale: np.ndarray | None = None
        bias: np.ndarray | None = None
        if g.optional_input(node, 2) is not None:
            c = g.constant(node.inputs[2])
            if c is None:
                raise UnsupportedOp(f"node {node_label(node.name, node.op, g.opset)}: C is "
                                    "not a constant")
            cval = np.asarray(c.values, dtype=np.float64)
            try:
                bias = np.broadcast_to(cval, (1, channels)).reshape(channels) * beta
            except ValueError:
                raise UnsupportedAttribute(
                    f"node {node_label(node.name, node.op, g.opset)}: C of shape "
                    f"{cval.shape} varies along the batch") from None
            if beta == 1.0 and list(cval.shape) == [channels]:
                self.bias_tensor = c
        if layer.bias_add is not None:
            add = _bias_add_vector(b, layer, channels, 1, 2)
            bias = add if bias is None else bias + add
            self.bias_tensor = None
        if layer.batchnorm is not None:
            a, c2 = _bn_scale_shift(b, layer)
            scale = a[:, None] if self.trans_b else a[None, :]
            bias = (np.zeros(channels) if bias is None else bias) * a + c2
            self.bias_tensor = None
        elif alpha == 1.0:
            self.weight_tensor = w

        def effective() -> np.ndarray:
            weight = np.asarray(w.values, dtype=np.float64) * alpha
            return weight if scale is None else weight * scale

        self.weight, self.bias = effective, bias
        self.weight_source = w
        if scale is not None or alpha != 1.0:
            self.weight_scale = np.asarray(alpha if scale is None else scale * alpha)

    def forward(self, x: gs.Tensor, w: gs.Tensor, bias: gs.Tensor | None) -> gs.Tensor:
        return self.b.op("Gemm", x, w, *([bias] if bias is not None else []), tag="z/gemm",
                         transB=self.trans_b)

    def transpose(self, s: gs.Tensor, w: gs.Tensor) -> gs.Tensor:
        return self.b.op("Gemm", s, w, tag="gemmT", transB=1 - self.trans_b)


class MatMulOp(LinearOp):
    """``MatMul(x, W)`` with a constant 2-D W (+ a folded ``Add(const)`` bias); ``x`` may be N-D."""

    def __init__(self, b: Builder, layer: Layer) -> None:
        super().__init__(b, layer)
        node, g = layer.primary, b.graph
        w = g.constant(node.inputs[1])
        if w is None or node.inputs[0].name not in g.data or len(w.shape) != 2:
            raise UnsupportedOp(f"node {node_label(node.name, node.op, g.opset)}: only "
                                "x @ W with a constant 2-D W is supported")
        self.rank = len(g.shape(layer.inputs[0], node))
        bias = None
        if layer.bias_add is not None:
            bias = _bias_add_vector(b, layer, int(w.shape[1]), self.rank - 1, self.rank)
        self.weight_tensor = self.weight_source = w
        self.weight, self.bias = (lambda: np.asarray(w.values, dtype=np.float64)), bias

    def forward(self, x: gs.Tensor, w: gs.Tensor, bias: gs.Tensor | None) -> gs.Tensor:
        z = self.b.op("MatMul", x, w, tag="z/matmul")
        return z if bias is None else self.b.op("Add", z, bias, tag="z/bias")

    def transpose(self, s: gs.Tensor, w: gs.Tensor) -> gs.Tensor:
        if self.rank == 2:
            return self.b.op("Gemm", s, w, tag="matmulT", transB=1)
        if self.b.options.modifiers_as_ops:
            wt = self.b.cached(("T", w.name), lambda: self.b.op("Transpose", w, tag="W^T"))
        else:
            assert isinstance(w, gs.Constant)
            wt = self.b.cached(("T", w.name),
                               lambda: self.b.const(np.asarray(w.values).T, "W^T"))
        return self.b.op("MatMul", s, wt, tag="matmulT")


class BatchNormOp(LinearOp):
    """A standalone inference ``BatchNormalization`` as the per-channel affine map ``a x + c``,
    ``a = γ/√(σ²+ε)``, ``c = β − μa``; its transpose is ``a s``."""

    def __init__(self, b: Builder, layer: Layer) -> None:
        super().__init__(b, layer)
        node, g = layer.primary, b.graph
        a, c = bn_affine(g, node)
        rank = len(g.shape(layer.inputs[0], node))
        self.bshape = [a.shape[0]] + [1] * (rank - 2)
        self.weight, self.bias = a, c

    def prepare(self, which: str, value: np.ndarray) -> np.ndarray:
        return value.reshape(self.bshape)

    def forward(self, x: gs.Tensor, w: gs.Tensor, bias: gs.Tensor | None) -> gs.Tensor:
        z = self.b.op("Mul", x, w, tag="z/scale")
        return z if bias is None else self.b.op("Add", z, bias, tag="z/shift")

    def transpose(self, s: gs.Tensor, w: gs.Tensor) -> gs.Tensor:
        return self.b.op("Mul", s, w, tag="scaleT")


_OPS: dict[str, type[LinearOp]] = {"Conv": ConvOp, "Gemm": GemmOp, "MatMul": MatMulOp,
                                   "BatchNormalization": BatchNormOp}


# -- facts: conservation and summaries -------------------------------------------------------
def has_bias(layer: Layer) -> bool:
    """Whether the layer's affine map has a shift that can absorb relevance (a non-zero bias,
    a folded ``Add(const)`` or BatchNorm, a standalone BatchNorm's ``β − μa``)."""
    if layer.bias_add is not None or layer.batchnorm is not None:
        return True
    node = layer.primary
    if layer.kind == "BatchNormalization":  # the schema's epsilon default is 1e-5
        return bool(np.any(_affine(node, float(node.attrs.get("epsilon", 1e-5)))[1]))
    if len(node.inputs) > 2:
        bias = node.inputs[2]
        if isinstance(bias, gs.Constant):
            return bool(np.any(bias.values))
        return str(bias.name) != ""  # a computed bias: assume non-zero
    return False


def linear_conserves(layer: Layer, rule: Rule) -> bool:
    """A linear layer passes on all it receives when it has no bias (or the rule drops it:
    ``zero_bias=True``, ``FlatRule``) and the rule is not an ``AlphaBetaRule`` with
    ``alpha - beta != 1``; ``PassRule`` does, ``GradientRule`` does not."""
    if isinstance(rule, PassRule):
        return True
    if isinstance(rule, GradientRule) or not isinstance(rule, LinearRule):
        return False
    if isinstance(rule, AlphaBetaRule) and abs(rule.alpha - rule.beta - 1.0) > 1e-12:
        return False
    if isinstance(rule, FlatRule):
        return True
    if isinstance(rule, (WSquareRule, ZBoxRule)) or hasattr(rule, "zero_bias"):
        return bool(getattr(rule, "zero_bias", False)) or not has_bias(layer)
    return not has_bias(layer)


def _activation(layer: Layer) -> str | None:
    return layer.act_name if layer.activation is not None else None


def _conv_summary(graph: Graph, layer: Layer) -> str:
    """``Conv((3, 3), 3 => 8, relu, pad=1)``."""
    node, act = layer.primary, _activation(layer)
    wshape = graph.shape(node.inputs[1])
    group = int(attr(node, "group", graph.opset, 1))
    kernel = list(attr(node, "kernel_shape", graph.opset, None) or wshape[2:])
    parts = [fmt_tuple(kernel), f"{int(wshape[1] or 0) * group} => {wshape[0]}"]
    if act:
        parts.append(act)
    parts += window_args(graph, node, kernel, default_stride=[1] * len(kernel))
    if group != 1:
        parts.append(f"groups={group}")
    if graph.optional_input(node, 2) is None and layer.bias_add is None \
            and layer.batchnorm is None:
        parts.append("bias=false")
    if layer.batchnorm is not None:
        parts.append("bn")
    return f"Conv({', '.join(parts)})"


def _dense_summary(graph: Graph, layer: Layer) -> str:
    """``Dense(1024 => 512, relu)``."""
    node, act = layer.primary, _activation(layer)
    op = node.op
    wshape = graph.shape(node.inputs[1])
    trans_b = int(attr(node, "transB", graph.opset, 0)) if op == "Gemm" else 0
    n_in, n_out = (wshape[1], wshape[0]) if trans_b else (wshape[-2], wshape[-1])
    parts = [f"{n_in} => {n_out}"]
    if act:
        parts.append(act)
    has_c = op == "Gemm" and graph.optional_input(node, 2) is not None
    if not (layer.bias_add is not None or layer.batchnorm is not None or has_c):
        parts.append("bias=false")
    return f"Dense({', '.join(parts)})"


def _batchnorm_summary(graph: Graph, layer: Layer) -> str:
    act = _activation(layer)
    channels = graph.shape(layer.primary.inputs[1])[0]
    return f"BatchNorm({channels}{', ' + act if act else ''})"


_LINEAR: dict[str, Any] = {"kind": Kind.LINEAR, "support": Support.LINEAR,
                           "conserves": linear_conserves}
_WEIGHTED = frozenset({"bias", "batchnorm", "activation"})
declare("ConvTranspose", kind=Kind.LINEAR, weight_rank="input")


@emitter("Conv", rules=LINEAR_RULES, groups=("ConvLayer",), summary=_conv_summary,
         absorbs=_WEIGHTED, weight_rank="input", **_LINEAR)
@emitter("Gemm", rules=LINEAR_RULES, groups=("DenseLayer",), summary=_dense_summary,
         absorbs=_WEIGHTED, weight_rank=2, **_LINEAR)
@emitter("MatMul", rules=LINEAR_RULES, groups=("DenseLayer",), summary=_dense_summary,
         absorbs=frozenset({"bias", "activation"}), product_kind="BilinearMatMul", **_LINEAR)
def linear_layer(b: Builder, layer: Layer, rule: Rule,
                 r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """Any linear rule on Conv/Gemm/MatMul through the generic engine (:func:`emit_linear`)."""
    assert isinstance(rule, LinearRule)
    op = _OPS[layer.kind](b, layer)
    return [emit_linear(b, rule, op, r_out)]


@emitter("BatchNormalization", rules=(PassRule, *LINEAR_RULES), groups=("NormalizationLayer",),
         summary=_batchnorm_summary, absorbs=frozenset({"activation"}), **_LINEAR)
def batch_normalization(b: Builder, layer: Layer, rule: Rule,
                        r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """PassRule (the presets' and Zennit's choice) or any linear rule on ``y = a x + c``."""
    if isinstance(rule, PassRule):
        return [r_out]
    assert isinstance(rule, LinearRule)
    return [emit_linear(b, rule, BatchNormOp(b, layer), r_out)]
