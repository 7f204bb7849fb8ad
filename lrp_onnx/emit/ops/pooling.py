"""Pooling layers under the z-rule (ZeroRule / EpsilonRule): ``R = x * J^T (R' / stab(y))``.

MaxPool routes to the window's maximum through the forward node's own ``Indices`` output and
``ScatterElements(reduction="add")`` (overlapping windows add up, ties go where the gradient
goes). Under ZeroRule a max pool routes ``R`` to its winner unchanged: the z-rule's factor
``x_j / y_i`` is exactly 1 there, so this is the z-rule without its stabilizer's bias
``y / (y + eps)`` (Zennit gives max pools their plain gradient, which is the same routing);
EpsilonRule keeps the factor ``y / (y + eps * sign(y))``. Average pools distribute over each
window with a ConvTranspose of a constant kernel, which makes them agree with Zennit's ``Norm``
rule (stabilizer on the mean).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from lrp_onnx.emit.builder import Builder
from lrp_onnx.emit.denominators import divide
from lrp_onnx.emit.ops.windows import explicit_pads, fit_like, transpose_geometry
from lrp_onnx.emit.registry import Kind, Sign, Support, declare, emitter
from lrp_onnx.errors import UnsupportedAttribute, UnsupportedModel, node_label
from lrp_onnx.frontend.graph import Graph, attr, check_attrs, ints
from lrp_onnx.frontend.layers import Layer, fmt_tuple, window_args
from lrp_onnx.rules.core import Z_RULES, Rule, ZeroRule, rule_eps


def _window_summary(graph: Graph, layer: Layer) -> str:
    node = layer.primary
    kernel = list(attr(node, "kernel_shape", graph.opset, []))
    parts = [fmt_tuple(kernel)] + window_args(graph, node, kernel, default_stride=kernel)
    return f"{node.op}({', '.join(parts)})"


def _reduce_summary(graph: Graph, layer: Layer) -> str:
    node = layer.primary
    axes = attr(node, "axes", graph.opset, None)
    if axes is None:
        value = graph.optional_const(node, 1)
        axes = [] if value is None else [int(a) for a in np.ravel(value)]
    return f"{node.op}(axes={fmt_tuple(list(axes or []))})"


_POOL: dict[str, Any] = {"kind": Kind.POOLING, "rules": Z_RULES, "sign": Sign.PRESERVES}
_MAX: dict[str, Any] = {"groups": ("MaxPoolLayer", "PoolingLayer"),
                        "support": Support.MAX_POOL, **_POOL}
_MEAN: dict[str, Any] = {"groups": ("MeanPoolLayer", "PoolingLayer"),
                         "support": Support.PROPORTIONAL, **_POOL}
declare("ReduceMax", "ReduceSum", kind=Kind.POOLING, sign=Sign.PRESERVES,
        summary=_reduce_summary)


@emitter("MaxPool", summary=_window_summary, **_MAX)
def max_pool(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """Winner-take-all: ``R_j = sum_{i: argmax(i) = j} R_i`` (ZeroRule) or
    ``x_j * sum_{i: argmax(i) = j} R_i / stab(y_i)`` (EpsilonRule)."""
    node, g = layer.primary, b.graph
    check_attrs(node, g.opset, {"auto_pad": None, "ceil_mode": None, "dilations": None,
                                "kernel_shape": None, "pads": None, "strides": None,
                                "storage_order": (0,)})
    x, y = layer.inputs[0], node.outputs[0]
    if len(node.outputs) > 1 and node.outputs[1].name:
        indices = node.outputs[1]
    else:  # let the forward node also return its argmax indices (same computation)
        indices = gs.Variable(b.name("indices"), dtype=np.int64)
        node.outputs.append(indices)
    exact = isinstance(rule, ZeroRule)
    s = r_out if exact else divide(b, r_out, y, rule_eps(rule))
    xf = b.op("Reshape", x, b.ints([-1]), tag="x_flat")
    zeros = b.zeros_like(xf)
    routed = b.op("ScatterElements", zeros, b.op("Reshape", indices, b.ints([-1]), tag="idx"),
                  b.op("Reshape", s, b.ints([-1]), tag="s_flat"), tag="scatter", axis=0,
                  reduction="add")
    if exact:
        return [b.reshape_like(routed, x, tag="R")]
    return [b.op("Mul", x, b.reshape_like(routed, x, tag="routed"), tag="R")]


def _counts(in_size: int, out_size: int, k: int, s: int, d: int, pb: int, pe: int,
            include_pad: bool) -> np.ndarray:
    """Divisor of each output position of AveragePool along one axis (as ONNX Runtime computes)."""
    lo, hi = (-pb, in_size + pe) if include_pad else (0, in_size)
    counts = []
    for o in range(out_size):
        start = o * s - pb
        taps = [start + t * d for t in range(k)]
        counts.append(sum(1 for p in taps if lo <= p < hi))
    return np.maximum(np.asarray(counts, dtype=np.float64), 1.0)


@emitter("AveragePool", summary=_window_summary, **_MEAN)
def average_pool(b: Builder, layer: Layer, rule: Rule,
                 r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """``R_j = x_j * sum_{i: j in win(i)} R_i / (cnt_i * stab(y_i))`` (pads, ceil_mode honoured)."""
    node, g = layer.primary, b.graph
    check_attrs(node, g.opset, {"auto_pad": None, "ceil_mode": None, "count_include_pad": None,
                                "dilations": None, "kernel_shape": None, "pads": None,
                                "strides": None})
    x, y = layer.inputs[0], node.outputs[0]
    in_shape, out_shape = g.shape(x, node)[1:], g.shape(y, node)[1:]
    channels, in_sp, out_sp = in_shape[0], in_shape[1:], out_shape[1:]
    label = node_label(node.name, node.op, g.opset)
    if channels is None:
        raise UnsupportedModel(f"{g.label}: node {label}: the channel count of '{x.name}' is "
                               "not known before run time")
    kernel = ints(attr(node, "kernel_shape", g.opset, None))
    nd = len(kernel)
    strides = ints(attr(node, "strides", g.opset, None)) or [1] * nd
    dilations = ints(attr(node, "dilations", g.opset, None)) or [1] * nd
    include = bool(attr(node, "count_include_pad", g.opset, 0))
    dynamic = any(d is None for d in (*in_sp, *out_sp))
    if dynamic and bool(attr(node, "ceil_mode", g.opset, 0)):
        raise UnsupportedAttribute(f"node {label}: ceil_mode=1 on a spatial axis whose size is "
                                   "not known before run time (its window counts depend on the "
                                   "size); re-export with a fixed input size")
    pads = explicit_pads(node, g.opset, in_sp, kernel, strides, dilations)
    try:
        t_pads, out_pad, extra = transpose_geometry(in_sp, out_sp, kernel, strides,
                                                          dilations, pads)
    except ValueError as exc:
        raise UnsupportedAttribute(f"node {label}: {exc}") from None
    s = divide(b, r_out, y, rule_eps(rule))
    s = b.op("Mul", s, _inverse_counts(b, node, x, in_sp, out_sp, kernel, strides, dilations,
                                       pads, include), tag="s/count")
    ones = b.const(np.ones([channels, 1, *kernel]), "window")
    back = b.op("ConvTranspose", s, ones, tag="convT", kernel_shape=kernel, strides=strides,
                pads=t_pads, dilations=dilations, group=channels, output_padding=out_pad)
    if extra is not None:  # output_padding depends on a size known only at run time
        back = fit_like(b, back, x, extra, tag="convT/fit",
                        begin=[p - t for p, t in zip(pads[:nd], t_pads[:nd])])
    return [b.op("Mul", x, back, tag="R")]


def _inverse_counts(b: Builder, node: gs.Node, x: gs.Tensor, in_sp: list[int | None],
                    out_sp: list[int | None], kernel: list[int], strides: list[int],
                    dilations: list[int], pads: list[int], include: bool) -> gs.Tensor:
    """``1 / count`` of each output window of an AveragePool (no ceil-mode overhang where a
    size is unknown). Static sizes: a constant. Unknown sizes: the constant ``1 / prod(kernel)``
    when every window has all its taps counted (no pads, or pads counted), else the counts at
    run time: a ``Conv`` of ones over the input's spatial extent with the pool's geometry."""
    nd = len(kernel)
    if all(d is not None for d in (*in_sp, *out_sp)):
        cnt = np.ones([1, 1, *(int(d) for d in out_sp if d is not None)])
        for i in range(nd):
            c = _counts(int(in_sp[i]), int(out_sp[i]), kernel[i], strides[i],  # type: ignore[arg-type]
                        dilations[i], pads[i], pads[i + nd], include)
            shape = [1] * (nd + 2)
            shape[2 + i] = int(out_sp[i])  # type: ignore[arg-type]
            cnt = cnt * c.reshape(shape)
        return b.const(1.0 / cnt, "inv_count")
    if include or not any(pads):
        return b.const(np.full([1] * (nd + 2), 1.0 / float(np.prod(kernel))), "inv_count")
    one = b.op("Slice", x, b.ints([0, 0]), b.ints([1, 1]), b.ints([0, 1]), tag="count/x1")
    ones = b.filled_like(one, b.scalar(1.0), tag="count/ones")
    taps = b.op("Conv", ones, b.const(np.ones([1, 1, *kernel]), "count/window"),
                tag="count/conv", kernel_shape=kernel, strides=strides, pads=pads,
                dilations=dilations)
    return b.op("Reciprocal", taps, tag="inv_count")


def _mean_back(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor, axes: list[int],
               keepdims: bool) -> gs.Tensor:
    x, node = layer.inputs[0], layer.primary
    dims = b.graph.shape(x, node)
    s = divide(b, r_out, layer.primary.outputs[0], rule_eps(rule))
    if not keepdims:
        s = b.op("Unsqueeze", s, b.ints(axes), tag="s/unsqueeze")
    if any(dims[a] is None for a in axes):  # the count n from the input's shape at run time
        sizes = b.op("Cast", b.op("Shape", x, tag="n/shape"), tag="n/sizes",
                     to=int(_onnx_dtype(b.dtype)))
        n = b.op("ReduceProd", b.op("Gather", sizes, b.ints(axes), tag="n/axes", axis=0),
                 tag="n", keepdims=0)
        inv = b.op("Reciprocal", n, tag="inv_n")
    else:
        count = 1
        for a in axes:
            count *= int(dims[a])  # type: ignore[arg-type]
        inv = b.scalar(1.0 / count)
    return b.op("Mul", x, b.op("Mul", s, inv, tag="s/mean"), tag="R")


@emitter("GlobalAveragePool", **_MEAN)
def global_average_pool(b: Builder, layer: Layer, rule: Rule,
                        r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """``R_j = x_j * R_c / (HW * stab(mean_c))`` (Zennit's ``Norm`` on AdaptiveAvgPool)."""
    rank = len(b.graph.shape(layer.inputs[0], layer.primary))
    return [_mean_back(b, layer, rule, r_out, list(range(2, rank)), True)]


@emitter("ReduceMean", summary=_reduce_summary, **_MEAN)
def reduce_mean(b: Builder, layer: Layer, rule: Rule,
                r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """``R_j = x_j * R_i / (n * stab(mean_i))`` over the reduced axes (dynamo's global pool)."""
    node, g = layer.primary, b.graph
    check_attrs(node, g.opset, {"axes": None, "keepdims": None,
                                "noop_with_empty_axes": (0,)})
    rank = len(g.shape(layer.inputs[0], node))
    axes = attr(node, "axes", g.opset, None)
    if axes is None:
        axes = g.const_ints(node, 1, "axes")
    axes = sorted(int(a) % rank for a in (axes if axes is not None else range(rank)))
    if 0 in axes:
        raise UnsupportedAttribute(f"node {node_label(node.name, node.op, g.opset)}: reducing "
                                   "over the batch axis is not supported")
    keepdims = bool(attr(node, "keepdims", g.opset, 1))
    return [_mean_back(b, layer, rule, r_out, axes, keepdims)]


@emitter("GlobalMaxPool", **_MAX)
def global_max_pool(b: Builder, layer: Layer, rule: Rule,
                    r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """Winner-take-all per channel; ties share equally (as the gradient of ``amax``). ZeroRule
    routes ``R`` unchanged (see the module docstring), EpsilonRule keeps ``y / stab(y)``."""
    x, y = layer.inputs[0], layer.primary.outputs[0]
    rank = len(b.graph.shape(x, layer.primary))
    mask = b.op("Cast", b.op("Equal", x, y, tag="is_max"), tag="mask",
                to=int(_onnx_dtype(b.dtype)))
    count = b.op("ReduceSum", mask, b.ints(list(range(2, rank))), tag="ties", keepdims=1)
    if isinstance(rule, ZeroRule):
        return [b.op("Mul", mask, b.op("Div", r_out, count, tag="R/ties"), tag="R")]
    s = divide(b, r_out, y, rule_eps(rule))
    share = b.op("Div", s, count, tag="s/ties")
    return [b.op("Mul", b.op("Mul", x, mask, tag="x_max"), share, tag="R")]


def _onnx_dtype(dtype: np.dtype) -> int:
    from onnx import helper

    return int(helper.np_dtype_to_tensor_dtype(dtype))
