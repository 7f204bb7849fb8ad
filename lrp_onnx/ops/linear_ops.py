"""Conv, Gemm, MatMul as :class:`~lrp_onnx.linear.LinearOp` s (forward with modified parameters,
transpose), with BatchNormalization and ``Add(const)`` bias folding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from ..builder import Builder
from ..errors import UnsupportedAttribute, UnsupportedOp, node_label
from ..graph import attr, check_attrs, ints
from ..layers import Layer
from ..linear import LinearOp, emit_linear
from ..registry import relevance
from ..rules import LINEAR_RULES, LinearRule, PassRule, Rule


def _bn_scale_shift(b: Builder, layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """``(a, c)`` with ``BN(y) = a * y + c`` per channel, in float64 (BN epsilon included)."""
    bn = layer.batchnorm
    assert bn is not None
    g = b.graph
    check_attrs(bn, g.opset, {"epsilon": None, "momentum": None, "training_mode": (0,),
                              "spatial": (1,)})
    gamma, beta, mean, var = (np.asarray(g.const_value(t), dtype=np.float64)
                              for t in bn.inputs[1:5])
    eps = float(attr(bn, "epsilon", g.opset, 1e-5))
    a = gamma / np.sqrt(var + eps)
    return a, beta - mean * a


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


def explicit_pads(node: gs.Node, opset: int, in_shape: Sequence[int], kernel: Sequence[int],
                  strides: Sequence[int], dilations: Sequence[int]) -> list[int]:
    """ONNX ``pads`` (begins then ends) with ``auto_pad`` resolved against static shapes."""
    auto_pad = attr(node, "auto_pad", opset, "NOTSET")
    n = len(kernel)
    if auto_pad in ("NOTSET", ""):
        pads = ints(attr(node, "pads", opset, None)) or [0] * (2 * n)
        return pads
    if auto_pad == "VALID":
        return [0] * (2 * n)
    begins, ends = [], []
    for i in range(n):
        out = -(-in_shape[i] // strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_shape[i])
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def transpose_padding(in_shape: Sequence[int], out_shape: Sequence[int], kernel: Sequence[int],
                      strides: Sequence[int], dilations: Sequence[int],
                      pads: Sequence[int]) -> tuple[list[int], list[int]]:
    """``(pads, output_padding)`` for a ConvTranspose that maps ``out_shape`` back to ``in_shape``.

    Forward windows: ``out = floor((in + pb + pe - ((k-1)d+1)) / s) + 1`` (or one more with
    ``ceil_mode``). End pads are extended when a ceil-mode window overhangs, and
    ``output_padding = in + pb + pe' - ((k-1)d+1) - (out-1)s`` restores the rows the stride dropped.
    """
    n = len(kernel)
    new_pads = list(pads)
    out_pad = []
    for i in range(n):
        span = (kernel[i] - 1) * dilations[i] + 1
        pb, pe = pads[i], pads[i + n]
        pe = max(pe, (out_shape[i] - 1) * strides[i] + span - in_shape[i] - pb)
        new_pads[i + n] = pe
        op = in_shape[i] + pb + pe - span - (out_shape[i] - 1) * strides[i]
        if not 0 <= op < max(strides[i], dilations[i]):
            raise ValueError(f"cannot invert window geometry along dim {i}")
        out_pad.append(op)
    return new_pads, out_pad


class ConvOp(LinearOp):
    """``Conv`` (1-D, 2-D, 3-D; any stride, padding, dilation, group); transpose = ConvTranspose."""

    def __init__(self, b: Builder, layer: Layer) -> None:
        super().__init__(b, layer)
        node, g = layer.primary, b.graph
        check_attrs(node, g.opset, {"auto_pad": None, "dilations": None, "group": None,
                                    "kernel_shape": None, "pads": None, "strides": None})
        w = node.inputs[1]
        if not isinstance(w, gs.Constant):
            raise UnsupportedOp(f"node {node_label(node.name, node.op, g.opset)}: weight "
                                f"'{w.name}' is not a constant")
        weight = np.asarray(w.values, dtype=np.float64)
        nd = weight.ndim - 2
        self.kernel = ints(attr(node, "kernel_shape", g.opset, None)) or list(weight.shape[2:])
        self.strides = ints(attr(node, "strides", g.opset, None)) or [1] * nd
        self.dilations = ints(attr(node, "dilations", g.opset, None)) or [1] * nd
        self.group = int(attr(node, "group", g.opset, 1))
        x = layer.inputs[0]
        self.in_spatial = g.sample_shape(x, node)[1:]
        self.out_spatial = g.sample_shape(node.outputs[0], node)[1:]
        self.pads = explicit_pads(node, g.opset, self.in_spatial, self.kernel, self.strides,
                                  self.dilations)
        _, self.output_padding = transpose_padding(self.in_spatial, self.out_spatial, self.kernel,
                                                   self.strides, self.dilations, self.pads)
        channels = weight.shape[0]
        bias: np.ndarray | None = None
        if len(node.inputs) > 2 and node.inputs[2].name:
            if not isinstance(node.inputs[2], gs.Constant):
                raise UnsupportedOp(f"node {node_label(node.name, node.op, g.opset)}: bias is "
                                    "not a constant")
            bias = np.asarray(node.inputs[2].values, dtype=np.float64)
            self.bias_tensor = node.inputs[2]
        if layer.bias_add is not None:
            add = _bias_add_vector(b, layer, channels, 1, nd + 2)
            bias = add if bias is None else bias + add
            self.bias_tensor = None
        if layer.batchnorm is not None:
            a, c = _bn_scale_shift(b, layer)
            weight = weight * a.reshape([-1] + [1] * (nd + 1))
            bias = (np.zeros(channels) if bias is None else bias) * a + c
            self.bias_tensor = None
        else:
            self.weight_tensor = w
        self.weight, self.bias = weight, bias

    def _attrs(self) -> dict[str, Any]:
        return {"kernel_shape": self.kernel, "strides": self.strides, "pads": self.pads,
                "dilations": self.dilations, "group": self.group}

    def forward(self, x: gs.Tensor, w: gs.Tensor, bias: gs.Tensor | None) -> gs.Tensor:
        return self.b.op("Conv", x, w, *([bias] if bias is not None else []), tag="z/conv",
                         **self._attrs())

    def transpose(self, s: gs.Tensor, w: gs.Tensor) -> gs.Tensor:
        return self.b.op("ConvTranspose", s, w, tag="convT", output_padding=self.output_padding,
                         **self._attrs())


class GemmOp(LinearOp):
    """``Gemm`` with a constant B: ``alpha * x @ B' + beta * C``; transpose = Gemm with
    the other ``transB`` (the model's weight tensor is reused, never transposed in Python)."""

    def __init__(self, b: Builder, layer: Layer) -> None:
        super().__init__(b, layer)
        node, g = layer.primary, b.graph
        check_attrs(node, g.opset, {"alpha": None, "beta": None, "transA": (0,),
                                    "transB": (0, 1)})
        w = node.inputs[1]
        if not isinstance(w, gs.Constant) or node.inputs[0].name not in g.data:
            raise UnsupportedOp(f"node {node_label(node.name, node.op, g.opset)}: only "
                                "x @ W with a constant W is supported")
        alpha = float(attr(node, "alpha", g.opset, 1.0))
        beta = float(attr(node, "beta", g.opset, 1.0))
        self.trans_b = int(attr(node, "transB", g.opset, 0))
        weight = np.asarray(w.values, dtype=np.float64) * alpha
        channels = weight.shape[0] if self.trans_b else weight.shape[1]
        bias: np.ndarray | None = None
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = node.inputs[2]
            if not isinstance(c, gs.Constant):
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
            weight = weight * (a[:, None] if self.trans_b else a[None, :])
            bias = (np.zeros(channels) if bias is None else bias) * a + c2
            self.bias_tensor = None
        elif alpha == 1.0:
            self.weight_tensor = w
        self.weight, self.bias = weight, bias

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
        w = node.inputs[1]
        if not isinstance(w, gs.Constant) or node.inputs[0].name not in g.data or \
                len(w.shape) != 2:
            raise UnsupportedOp(f"node {node_label(node.name, node.op, g.opset)}: only "
                                "x @ W with a constant 2-D W is supported")
        weight = np.asarray(w.values, dtype=np.float64)
        self.rank = len(g.shape(layer.inputs[0], node))
        bias = None
        if layer.bias_add is not None:
            bias = _bias_add_vector(b, layer, weight.shape[1], self.rank - 1, self.rank)
        self.weight_tensor = w
        self.weight, self.bias = weight, bias

    def forward(self, x: gs.Tensor, w: gs.Tensor, bias: gs.Tensor | None) -> gs.Tensor:
        z = self.b.op("MatMul", x, w, tag="z/matmul")
        return z if bias is None else self.b.op("Add", z, bias, tag="z/bias")

    def transpose(self, s: gs.Tensor, w: gs.Tensor) -> gs.Tensor:
        if self.rank == 2:
            return self.b.op("Gemm", s, w, tag="matmulT", transB=1)
        assert isinstance(w, gs.Constant)
        wt = self.b.cached(("T", w.name), lambda: self.b.const(np.asarray(w.values).T, "W^T"))
        return self.b.op("MatMul", s, wt, tag="matmulT")


class BatchNormOp(LinearOp):
    """A standalone inference ``BatchNormalization`` as the per-channel affine map ``a x + c``,
    ``a = γ/√(σ²+ε)``, ``c = β − μa``; its transpose is ``a s``."""

    def __init__(self, b: Builder, layer: Layer) -> None:
        super().__init__(b, layer)
        node, g = layer.primary, b.graph
        check_attrs(node, g.opset, {"epsilon": None, "momentum": None, "training_mode": (0,),
                                    "spatial": (1,)})
        gamma, beta, mean, var = (np.asarray(g.const_value(t), dtype=np.float64)
                                  for t in node.inputs[1:5])
        eps = float(attr(node, "epsilon", g.opset, 1e-5))
        a = gamma / np.sqrt(var + eps)
        rank = len(g.shape(layer.inputs[0], node))
        self.bshape = [a.shape[0]] + [1] * (rank - 2)
        self.weight, self.bias = a, beta - mean * a

    def prepare(self, which: str, value: np.ndarray) -> np.ndarray:
        return value.reshape(self.bshape)

    def forward(self, x: gs.Tensor, w: gs.Tensor, bias: gs.Tensor | None) -> gs.Tensor:
        z = self.b.op("Mul", x, w, tag="z/scale")
        return z if bias is None else self.b.op("Add", z, bias, tag="z/shift")

    def transpose(self, s: gs.Tensor, w: gs.Tensor) -> gs.Tensor:
        return self.b.op("Mul", s, w, tag="scaleT")


_OPS: dict[str, type[LinearOp]] = {"Conv": ConvOp, "Gemm": GemmOp, "MatMul": MatMulOp,
                                   "BatchNormalization": BatchNormOp}


@relevance("Conv", "Gemm", "MatMul", rules=LINEAR_RULES)
def linear_layer(b: Builder, layer: Layer, rule: Rule,
                 r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """Any linear rule on Conv/Gemm/MatMul through the generic engine (:func:`emit_linear`)."""
    assert isinstance(rule, LinearRule)
    op = _OPS[layer.kind](b, layer)
    return [emit_linear(b, rule, op, r_out)]


@relevance("BatchNormalization", rules=(PassRule, *LINEAR_RULES))
def batch_normalization(b: Builder, layer: Layer, rule: Rule,
                        r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """PassRule (the presets' and Zennit's choice) or any linear rule on ``y = a x + c``."""
    if isinstance(rule, PassRule):
        return [r_out]
    assert isinstance(rule, LinearRule)
    return [emit_linear(b, rule, BatchNormOp(b, layer), r_out)]
