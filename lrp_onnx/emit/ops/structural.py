"""Layers that only move values: reshapes, transposes, concatenation, slicing, padding, dropout
and identity. Relevance is routed as the gradient routes it (no ops for identity-like layers);
ZeroRule/EpsilonRule on them equal PassRule (RelevancePropagation.jl's fast path)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lrp_onnx.dtypes import float_dtype
from lrp_onnx.emit.builder import Builder
from lrp_onnx.emit.ops.merge import unbroadcast
from lrp_onnx.emit.registry import Kind, Sign, Support, emitter
from lrp_onnx.errors import UnsupportedAttribute, node_label
from lrp_onnx.frontend.graph import Graph, attr, ints
from lrp_onnx.frontend.layers import Layer, fmt_tuple
from lrp_onnx.rules.core import ROUTING_RULES, Rule

#: Facts shared by every op that moves values without changing them.
_MOVES: dict[str, Any] = {"kind": Kind.RESHAPING, "rules": ROUTING_RULES, "sign": Sign.PRESERVES,
          "support": Support.ROUTING, "routes": True}


def _flatten_summary(graph: Graph, layer: Layer) -> str:
    axis = int(attr(layer.primary, "axis", graph.opset, 1))
    return "Flatten()" if axis == 1 else f"Flatten(axis={axis})"


def _reshape_summary(graph: Graph, layer: Layer) -> str:
    return f"Reshape({fmt_tuple(graph.shape(layer.output)[1:])})"


def _dropout_summary(graph: Graph, layer: Layer) -> str:
    ratio = graph.optional_const(layer.primary, 1)
    return f"Dropout({float(ratio) if ratio is not None else 0.5:g})"


def _concat_summary(graph: Graph, layer: Layer) -> str:
    return f"Concat(axis={int(attr(layer.primary, 'axis', graph.opset, 1))})"


@emitter("Flatten", summary=_flatten_summary, groups=("ReshapingLayer",), keeps_order=True,
         **_MOVES)
@emitter("Reshape", summary=_reshape_summary, groups=("ReshapingLayer",), keeps_order=True,
         **_MOVES)
@emitter("Squeeze", "Unsqueeze", groups=("ReshapingLayer",), keeps_order=True, **_MOVES)
def reshape(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """``R = reshape(R', shape(x))``."""
    x = layer.inputs[0]
    if layer.primary.inputs[0] is not x:
        raise UnsupportedAttribute(f"node {node_label(layer.name, layer.kind)}: the shape "
                                   "input depends on the data")
    return [b.reshape_like(r_out, x, tag="R")]


@emitter("Transpose", groups=("ReshapingLayer",), **_MOVES)
def transpose(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """``R = Transpose(R', inverse(perm))``."""
    rank = len(b.graph.shape(layer.inputs[0], layer.primary))
    perm = ints(attr(layer.primary, "perm", b.graph.opset, None)) or list(range(rank))[::-1]
    inverse = [0] * rank
    for i, p in enumerate(perm):
        inverse[p] = i
    return [b.op("Transpose", r_out, tag="R", perm=inverse)]


@emitter("Identity", kind=Kind.IDENTITY, rules=ROUTING_RULES, sign=Sign.PRESERVES,
         support=Support.ROUTING, head=True, routes=True, keeps_order=True,
         summary=lambda graph, layer: "identity")
def identity(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """``R = R'``: the identity passes relevance unchanged (Zennit's Pass)."""
    return [r_out]


@emitter("Dropout", kind=Kind.IDENTITY, rules=ROUTING_RULES, sign=Sign.PRESERVES,
         support=Support.ROUTING, routes=True, groups=("DropoutLayer",), summary=_dropout_summary)
def dropout(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """``R = R'`` for inference-mode Dropout; a ``training_mode`` that may be true is refused."""
    node, g = layer.primary, b.graph
    if g.optional_input(node, 2) is not None:
        mode = g.optional_const(node, 2)
        if mode is None or bool(mode):
            raise UnsupportedAttribute(f"node {node_label(node.name, node.op, g.opset)}: "
                                       "Dropout in training mode is random; export in eval mode")
    return [r_out]


@emitter("Concat", merges=True, sign_condition=Graph.constant_operands_nonneg,
         summary=_concat_summary, **_MOVES)
def concat(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """Each input gets back the slice of ``R'`` it produced (constant inputs absorb theirs)."""
    node, g = layer.primary, b.graph
    rank = len(g.shape(node.outputs[0], node))
    axis = int(attr(node, "axis", g.opset, 0)) % rank
    sizes = [g.shape(t, node)[axis] for t in node.inputs]
    if any(s is None for s in sizes):  # sizes known at run time only: read them then
        split = b.op("Concat", *(b.op("Slice", b.op("Shape", t, tag=f"size{i}/shape"),
                                       b.ints([axis]), b.ints([axis + 1]), tag=f"size{i}")
                                 for i, t in enumerate(node.inputs)), tag="sizes", axis=0)
    else:
        split = b.ints([int(s) for s in sizes])  # type: ignore[arg-type]
    parts = b.op("Split", r_out, split, tag="R", outputs=len(sizes), axis=axis)
    parts = parts if isinstance(parts, list) else [parts]
    return [p for t, p in zip(node.inputs, parts) if t.name in g.data]


def _pad_value_nonneg(graph: Graph, node: gs.Node) -> bool:
    """A constant pad value that is ``>= 0`` (0 when absent) keeps a non-negative input so."""
    if graph.optional_input(node, 2) is None:
        return True
    value = graph.optional_const(node, 2)
    return value is not None and bool(np.all(value >= 0))


@emitter("Pad", sign_condition=_pad_value_nonneg, **_MOVES)
def pad(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """Constant padding: each input element gets its own output's relevance (the padding's
    relevance is dropped, as the gradient drops it)."""
    node, g = layer.primary, b.graph
    mode = attr(node, "mode", g.opset, "constant")
    if mode != "constant":
        raise UnsupportedAttribute(f"node {node_label(node.name, node.op, g.opset)}: "
                                   f"mode={mode!r} (only 'constant' is supported)")
    x = layer.inputs[0]
    rank = len(g.shape(x, node))
    pads = g.const_ints(node, 1, "pads") or ints(attr(node, "pads", g.opset, None))
    axes = g.const_ints(node, 3, "axes") or list(range(rank))
    axes = [a % rank for a in axes]
    begins, ends = pads[:len(axes)], pads[len(axes):]
    if any(p < 0 for p in pads):
        raise UnsupportedAttribute(f"node {node_label(node.name, node.op, g.opset)}: negative "
                                   "pads (cropping) are not supported")
    dims = g.shape(node.outputs[0], node)
    starts = [begins[i] for i in range(len(axes))]
    stops = []
    for i, a in enumerate(axes):
        size = dims[a]
        stops.append(size - ends[i] if size is not None else (-ends[i] if ends[i] else 2**62))
    return [b.op("Slice", r_out, b.ints(starts), b.ints(stops), b.ints(axes), tag="R")]


@emitter("Slice", **_MOVES)
def slice_(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """Each input element that was sliced out gets its relevance back; the others get none."""
    node, g = layer.primary, b.graph
    x = layer.inputs[0]
    shape = g.shape(x, node)
    rank = len(shape)
    starts = g.const_ints(node, 1, "starts") or []
    stops = g.const_ints(node, 2, "ends") or []
    axes = g.const_ints(node, 3, "axes") or list(range(len(starts)))
    steps = g.const_ints(node, 4, "steps") or [1] * len(starts)
    if any(s != 1 for s in steps):
        raise UnsupportedAttribute(f"node {node_label(node.name, node.op, g.opset)}: steps "
                                   f"{steps} (only 1 is supported)")
    bounds = {axis % rank: (start, stop) for start, stop, axis in zip(starts, stops, axes)}
    return [b.op("Pad", r_out, _pads(b, x, node, bounds), tag="R", mode="constant")]


def _pads(b: Builder, x: gs.Tensor, node: gs.Node,
          bounds: dict[int, tuple[int, int]]) -> gs.Tensor:
    """The ``Pad`` pads that put back ``x[lo:hi]`` (ONNX Slice bounds: negative counts from the
    end, clamped to the axis) per axis of ``bounds``; computed at run time from ``Shape(x)``
    for an axis whose size is known only then."""
    shape = b.graph.shape(x, node)
    rank = len(shape)
    before: list[Any] = [0] * rank
    after: list[Any] = [0] * rank
    for axis, (start, stop) in bounds.items():
        size = shape[axis]
        if size is not None:
            lo = min(max(start + size if start < 0 else start, 0), size)
            hi = min(max(stop + size if stop < 0 else stop, 0), size)
            before[axis], after[axis] = lo, size - max(hi, lo)
            continue
        n = b.op("Slice", b.op("Shape", x, tag=f"n{axis}/shape"), b.ints([axis]),
                 b.ints([axis + 1]), tag=f"n{axis}")

        def clamp(v: int, tag: str, n: gs.Tensor = n) -> gs.Tensor:
            at = b.op("Add", n, b.ints([v]), tag=f"{tag}/from_end") if v < 0 else b.ints([v])
            return b.op("Min", b.op("Max", at, b.ints([0]), tag=f"{tag}/max"), n, tag=tag)

        lo_t = clamp(start, f"lo{axis}")
        hi_t = b.op("Max", clamp(stop, f"hi{axis}"), lo_t, tag=f"hi{axis}/ordered")
        before[axis], after[axis] = lo_t, b.op("Sub", n, hi_t, tag=f"after{axis}")
    if all(isinstance(v, int) for v in before + after):
        return b.ints(before + after)
    parts = [b.ints([v]) if isinstance(v, int) else v for v in before + after]
    return b.op("Concat", *parts, tag="pads", axis=0)


@emitter("Split", multi_output=True, **_MOVES)
def split(b: Builder, layer: Layer, rule: Rule, r_out: Any) -> list[gs.Tensor | None]:
    """The input gets the concatenated relevance of the parts (zeros for parts no relevance
    reached)."""
    node, g = layer.primary, b.graph
    rank = len(g.shape(layer.inputs[0], node))
    axis = int(attr(node, "axis", g.opset, 0)) % rank
    parts = [r if r is not None else b.zeros_like(out, tag=f"zeros{i}")
             for i, (r, out) in enumerate(zip(r_out, layer.outputs))]
    return [b.op("Concat", *parts, tag="R", axis=axis)]



def _gather_summary(graph: Graph, layer: Layer) -> str:
    node = layer.primary
    idx = graph.const_value(node.inputs[1])
    shown = "?" if idx is None else (str(int(idx)) if idx.ndim == 0 else fmt_tuple(
        [int(i) for i in idx.ravel()[:4]]) if idx.size <= 4 else f"{idx.size} indices")
    return f"Gather(axis={int(attr(node, 'axis', graph.opset, 0))}, {shown})"


@emitter("Gather", summary=_gather_summary, groups=("ReshapingLayer",), **_MOVES)
def gather(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """Constant indices: each selected element gets its output's relevance back (summed where
    an index repeats), the others none: ``Pad`` for one index or a contiguous range, else a
    ``MatMul`` with the one-hot matrix of the indices."""
    node, g = layer.primary, b.graph
    x = layer.inputs[0]
    idx = g.const_value(node.inputs[1])
    label = node_label(node.name, node.op, g.opset)
    if node.inputs[0] is not x or idx is None:
        raise UnsupportedAttribute(f"node {label}: Gather of activations needs constant "
                                   "indices (the data input is the one gathered from)")
    shape = g.shape(x, node)
    rank = len(shape)
    axis = int(attr(node, "axis", g.opset, 0)) % rank
    n = shape[axis]
    if idx.ndim > 1:
        raise UnsupportedAttribute(f"node {label}: Gather with indices of rank > 1")
    raw = [int(i) for i in idx.ravel()]
    r = r_out if idx.ndim == 1 else b.op("Unsqueeze", r_out, b.ints([axis]), tag="R/unsqueeze")
    if n is None:  # one index or a run of them, all counted from the same end ([CLS], [-1])
        first = raw[0] if raw else 0
        if raw and raw == list(range(first, first + len(raw))) and \
                (first >= 0 or first + len(raw) <= 0):
            stop = first + len(raw) if first >= 0 or first + len(raw) < 0 else 2**62
            pads = _pads(b, x, node, {axis: (first, stop)})
            return [b.op("Pad", r, pads, tag="R", mode="constant")]
        raise UnsupportedAttribute(f"node {label}: Gather along an axis of run-time size of "
                                   "indices other than one run counted from one end")
    flat = [i % n for i in raw]
    first = flat[0] if flat else 0
    if flat == list(range(first, first + len(flat))):
        pads = _pads(b, x, node, {axis: (first, first + len(flat))})
        return [b.op("Pad", r, pads, tag="R", mode="constant")]
    onehot = np.zeros((len(flat), n))
    for j, i in enumerate(flat):
        onehot[j, i] += 1.0
    perm = [a for a in range(rank) if a != axis] + [axis]
    back = [perm.index(a) for a in range(rank)]
    moved = b.op("Transpose", r, tag="R/last", perm=perm)
    spread = b.op("MatMul", moved, b.const(onehot, "onehot"), tag="R/spread")
    return [b.op("Transpose", spread, tag="R", perm=back)]


@emitter("Cast", kind=Kind.IDENTITY, rules=ROUTING_RULES, sign=Sign.PRESERVES,
         support=Support.ROUTING, routes=True, keeps_order=True,
         summary=lambda graph, layer: "cast")
def cast(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """A float-to-float ``Cast``: ``R = Cast(R', the input's type)`` (a float input cast to an
    integer or boolean type carries no relevance on and is refused)."""
    node, g = layer.primary, b.graph
    x, y = layer.inputs[0], node.outputs[0]
    if not (float_dtype(x) and float_dtype(y)):
        raise UnsupportedAttribute(f"node {node_label(node.name, node.op, g.opset)}: a Cast of "
                                   f"an activation from {x.dtype} to {y.dtype} (only between "
                                   "floating-point types)")
    if np.dtype(x.dtype) == np.dtype(y.dtype):
        return [r_out]
    return [b.op("Cast", r_out, tag="R", to=int(onnx.helper.np_dtype_to_tensor_dtype(
        np.dtype(x.dtype))))]


@emitter("Where", kind=Kind.RESHAPING, rules=ROUTING_RULES, sign=Sign.PRESERVES,
         sign_condition=Graph.constant_operands_nonneg, support=Support.ROUTING, routes=True,
         groups=("ReshapingLayer",), summary=lambda graph, layer: "Where()")
def where(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """``Where(c, a, d)`` with a condition that does not depend on the data (a mask): each
    data branch gets the relevance of the positions it was chosen at, a constant branch
    absorbs its share."""
    node, g = layer.primary, b.graph
    cond = node.inputs[0]
    if cond.name in g.data:
        raise UnsupportedAttribute(f"node {node_label(node.name, node.op, g.opset)}: a Where "
                                   "whose condition depends on the explained input")
    out_shape = g.shape(node.outputs[0], node)
    zero = b.scalar(0.0)
    result: list[gs.Tensor | None] = []
    for i, branch in ((1, node.inputs[1]), (2, node.inputs[2])):
        if branch.name not in g.data:
            continue
        picked = b.op("Where", cond, r_out, zero, tag=f"R{i}") if i == 1 else \
            b.op("Where", cond, zero, r_out, tag=f"R{i}")
        result.append(unbroadcast(b, picked, branch, out_shape, tag=f"R{i}"))
    return result


@emitter("Neg", kind=Kind.IDENTITY, rules=ROUTING_RULES, support=Support.ROUTING,
         summary=lambda graph, layer: "neg")
def neg(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """``R_x = R'``: ``y = −x`` has ``x ∂y/∂x = y``, so gradient × input passes relevance
    unchanged (recorded as ``x * (−g)`` where ``R' = y * g``)."""
    x, y = layer.inputs[0], layer.output
    if not b.has_factor(r_out, y):
        return [r_out]
    r = b.op("Identity", r_out, tag="R")
    return [b.factored(r, x, b.later(lambda: b.op("Neg", b.factor(r_out, y), tag="g")))]


def _shape_input_constant_or_free(b: Builder, layer: Layer) -> None:
    node = layer.primary
    if node.inputs[0] is not layer.inputs[0] or len(layer.inputs) != 1:
        raise UnsupportedAttribute(f"node {node_label(node.name, node.op, b.graph.opset)}: the "
                                   f"{'shape' if node.op == 'Expand' else 'repeats'} input "
                                   "depends on the data")


@emitter("Expand", groups=("ReshapingLayer",), **_MOVES)
def expand(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """``R = Σ R'`` over the broadcast axes (each input element gets the relevance of all its
    copies: grouped-query attention's repeated keys and values)."""
    _shape_input_constant_or_free(b, layer)
    node = layer.primary
    out_shape = b.graph.shape(node.outputs[0], node)
    return [unbroadcast(b, r_out, layer.inputs[0], out_shape, tag="R")]


@emitter("Tile", groups=("ReshapingLayer",), **_MOVES)
def tile(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """``R = Σ R'`` over the tiles (``R'`` reshaped to ``[.., repeats_i, d_i, ..]`` and summed
    over the repeats)."""
    _shape_input_constant_or_free(b, layer)
    node, g = layer.primary, b.graph
    x = layer.inputs[0]
    repeats = g.const_ints(node, 1, "repeats") or []
    shape = g.shape(x, node)
    dims: list[int] = []
    for d, r in zip(shape, repeats):
        if d is None and r != 1:
            raise UnsupportedAttribute(f"node {node_label(node.name, node.op, g.opset)}: tiles "
                                       "an axis whose size is known only at run time")
        dims += [r, -1 if d is None else d]
    if dims.count(-1) > 1:
        raise UnsupportedAttribute(f"node {node_label(node.name, node.op, g.opset)}: more than "
                                   "one axis of run-time size")
    split = b.op("Reshape", r_out, b.ints(dims), tag="R/split")
    return [b.op("ReduceSum", split, b.ints(list(range(0, 2 * len(shape), 2))), tag="R",
                 keepdims=0)]
