"""The layer view: the model's relevance path as an ordered list of layers.

A layer is a matched op pattern with one output, e.g. ``Conv [+ BatchNormalization] [+ Relu]``,
``MatMul + Add(const) [+ activation]``, ``MaxPool``, ``Flatten``. Rules are assigned per layer, the
way RelevancePropagation.jl assigns them per Flux layer: an activation that directly follows a
Conv/Gemm/MatMul belongs to that layer (``Conv((3, 3), 3 => 8, relu, pad=1)``) and its relevance
passes through it unchanged (the rule acts on the pre-activation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from lrp_onnx.emit.registry import Kind, is_kind, spec_of
from lrp_onnx.frontend.graph import Graph, attr
from lrp_onnx.frontend.patterns import match_layer_norm, match_rms_norm
from lrp_onnx.frontend.patterns import only_into as _only_into


@dataclass(eq=False)
class Layer:
    """One layer of the flattened model.

    Attributes:
        index: 0-based position in the flat layer list (displayed 1-based, as on the seed page).
        kind: op type of the primary node (``"Conv"``, ``"Gemm"``, ``"MaxPool"``, ...).
        primary: the node the layer is named after.
        nodes: every node the layer covers, primary first.
        inputs: data inputs of the layer (relevance is returned for these).
        output: the layer's output value (relevance arrives here).
        pre_activation: the value before a folded activation (``output`` when there is none).
        bias_add: a folded ``Add(const)`` after MatMul/Gemm/Conv, if any.
        batchnorm: a folded ``BatchNormalization``, if any.
        activation: the last node of a folded activation, if any.
        act_name: display name of the activation (folded or standalone), e.g. ``relu``.
        outputs: every output of a multi-output layer (``Split``); else ``(output,)``.
        scope: module path recorded by the exporter (``()`` if none).
    """

    index: int
    kind: str
    primary: gs.Node
    nodes: tuple[gs.Node, ...]
    inputs: tuple[gs.Tensor, ...]
    output: gs.Tensor
    pre_activation: gs.Tensor
    bias_add: gs.Node | None = None
    batchnorm: gs.Node | None = None
    activation: gs.Node | None = None
    scope: tuple[str, ...] = ()
    summary: str = field(default="")
    act_name: str | None = None
    outputs: tuple[gs.Tensor, ...] = ()

    @property
    def name(self) -> str:
        """Name of the primary node (unique in the model)."""
        return str(self.primary.name)

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(str(n.name) for n in self.nodes)

    def __repr__(self) -> str:
        return f"Layer({self.index + 1}, {self.summary}, nodes={list(self.node_names)})"


def _sole_consumer(graph: Graph, t: gs.Tensor) -> gs.Node | None:
    cons = graph.consumers(t)
    if len(cons) != 1 or graph.is_graph_output(t) or t.name == graph.logits.name:
        return None
    return cons[0]


def _is_const_bias_add(graph: Graph, node: gs.Node, value: gs.Tensor) -> bool:
    if node.op != "Add" or len(node.inputs) != 2:
        return False
    other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
    const = graph.const_value(other)
    if const is None:
        return False
    out_shape = graph.shape(value)
    if const.ndim > len(out_shape):
        return False
    # The constant may vary along the feature axis only (last for dense, 1 for conv).
    feat_axis = 1 if len(out_shape) > 2 and _conv_like(graph, value) else len(out_shape) - 1
    lead = len(out_shape) - const.ndim
    for i, d in enumerate(const.shape):
        axis = lead + i
        if d != 1 and axis != feat_axis:
            return False
    return True


def _conv_like(graph: Graph, value: gs.Tensor) -> bool:
    producer = graph.producer(value)
    return producer is not None and producer.op == "Conv"


def _is_inference_bn(graph: Graph, node: gs.Node) -> bool:
    if node.op != "BatchNormalization" or len(node.outputs) != 1:
        return False
    if int(attr(node, "training_mode", graph.opset, 0) or 0) != 0:
        return False
    return all(graph.is_const(t) for t in node.inputs[1:5])


@dataclass(frozen=True)
class Activation:
    """A matched activation: its nodes, output value and display name (``relu``, ``silu``)."""

    nodes: tuple[gs.Node, ...]
    output: gs.Tensor
    kind: str
    name: str


def _near(value: np.ndarray | None, target: float) -> bool:
    return value is not None and value.size == 1 and abs(float(value.ravel()[0]) - target) < 1e-4


def _const_other(graph: Graph, node: gs.Node, value: gs.Tensor) -> np.ndarray | None:
    """The constant operand of a two-input node whose other operand is ``value``."""
    if len(node.inputs) != 2 or value not in node.inputs:
        return None
    other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
    return graph.const_value(other)


def _silu(graph: Graph, x: gs.Tensor) -> Activation | None:
    """``Mul(x, Sigmoid(x))`` (torch exports SiLU/Swish so)."""
    for sig in graph.consumers(x):
        if sig.op != "Sigmoid":
            continue
        mul = _only_into(graph, sig.outputs[0], "Mul")
        if mul is not None and {t.name for t in mul.inputs} == {x.name, sig.outputs[0].name}:
            return Activation((sig, mul), mul.outputs[0], "SiLU", "silu")
    return None


def _gelu_tail(graph: Graph, x: gs.Tensor, head: tuple[gs.Node, ...],
               one_plus: gs.Tensor) -> Activation | None:
    """The end of a GELU, ``0.5 * x * one_plus`` in any multiplication order, after ``head``
    (the nodes computing ``one_plus = 1 + erf(...)`` or ``1 + tanh(...)`` from ``x``)."""
    mul = _only_into(graph, one_plus, "Mul")
    if mul is None:
        return None
    product: gs.Tensor = mul.outputs[0]
    other = mul.inputs[1] if mul.inputs[0] is one_plus else mul.inputs[0]
    if _near(graph.const_value(other), 0.5):  # x * (0.5 * one_plus) (dynamo, opset 18)
        last = _only_into(graph, product, "Mul")
        if last is not None and x in last.inputs:
            return Activation((*head, mul, last), last.outputs[0], "Gelu", "gelu")
        return None
    if other is x:  # (x * one_plus) * 0.5
        half = _only_into(graph, product, "Mul")
        if half is not None and _near(_const_other(graph, half, product), 0.5):
            return Activation((*head, mul, half), half.outputs[0], "Gelu", "gelu")
        return None
    half2 = graph.producer(other)  # (x * 0.5) * one_plus
    if half2 is not None and half2.op == "Mul" and x in half2.inputs and \
            _near(_const_other(graph, half2, x), 0.5) and _only_into(graph, other, "Mul") is mul:
        return Activation((*head, half2, mul), product, "Gelu", "gelu")
    return None


def _one_plus(graph: Graph, node: gs.Node | None) -> gs.Node | None:
    """The ``Add(·, 1)`` that is the only reader of ``node``'s output."""
    if node is None:
        return None
    add = _only_into(graph, node.outputs[0], "Add")
    if add is None or not _near(_const_other(graph, add, node.outputs[0]), 1.0):
        return None
    return add


def _gelu_erf(graph: Graph, x: gs.Tensor) -> Activation | None:
    """``0.5 * x * (1 + Erf(x / sqrt(2)))`` in any multiplication order (legacy and dynamo
    opset-18 exports)."""
    for scale in graph.consumers(x):
        c = _const_other(graph, scale, x)
        if not ((scale.op == "Div" and scale.inputs[0] is x and _near(c, 2 ** 0.5)) or
                (scale.op == "Mul" and _near(c, 2 ** -0.5))):
            continue
        erf = _only_into(graph, scale.outputs[0], "Erf")
        add = _one_plus(graph, erf)
        if erf is not None and add is not None:
            act = _gelu_tail(graph, x, (scale, erf, add), add.outputs[0])
            if act is not None:
                return act
    return None


def _cube(graph: Graph, x: gs.Tensor, node: gs.Node) -> tuple[gs.Node, ...]:
    """The nodes computing ``x**3`` from ``node`` (``Pow(x, 3)`` or ``x * (x * x)``), or ()."""
    if node.op == "Pow" and node.inputs[0] is x and _near(graph.const_value(node.inputs[1]), 3.0):
        return (node,)
    if node.op == "Mul" and node.inputs[0] is x and node.inputs[1] is x:
        m2 = _only_into(graph, node.outputs[0], "Mul")
        if m2 is not None and x in m2.inputs:
            return (node, m2)
    return ()


def _gelu_tanh(graph: Graph, x: gs.Tensor) -> Activation | None:
    """``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x**3)))`` (GELU's tanh
    approximation) as the legacy and dynamo opset-18 exporters spell it."""
    for first in graph.consumers(x):
        cube = _cube(graph, x, first)
        if not cube:
            continue
        c1 = _only_into(graph, cube[-1].outputs[0], "Mul")
        if c1 is None or not _near(_const_other(graph, c1, cube[-1].outputs[0]), 0.044715):
            continue
        add = _only_into(graph, c1.outputs[0], "Add")
        if add is None or x not in add.inputs:
            continue
        c2 = _only_into(graph, add.outputs[0], "Mul")
        if c2 is None or not _near(_const_other(graph, c2, add.outputs[0]),
                                   (2 / np.pi) ** 0.5):
            continue
        tanh = _only_into(graph, c2.outputs[0], "Tanh")
        one = _one_plus(graph, tanh)
        if tanh is not None and one is not None:
            act = _gelu_tail(graph, x, (*cube, c1, add, c2, tanh, one), one.outputs[0])
            if act is not None:
                return act
    return None


def match_activation(graph: Graph, x: gs.Tensor, *, exclusive: bool) -> Activation | None:
    """An activation applied to ``x``: one node of an op of kind ``ACTIVATION`` (see
    :class:`lrp_onnx.emit.registry.Kind`) or a SiLU / Erf-GELU / tanh-GELU decomposition. With
    ``exclusive``, ``x`` must feed nothing else (to fold it into a layer)."""
    if graph.is_graph_output(x) or x.name == graph.logits.name:
        return None
    cons = graph.consumers(x)
    for pattern in (_silu, _gelu_erf, _gelu_tanh):
        act = pattern(graph, x)
        if act is not None and (not exclusive or all(c in act.nodes for c in cons)):
            return act
    for node in cons:
        if is_kind(node.op, Kind.ACTIVATION) and graph.data_inputs(node) == [x] and \
                (not exclusive or len(cons) == 1):
            return Activation((node,), node.outputs[0], node.op, act_name(graph, node) or "")
    return None


def build_layers(graph: Graph) -> list[Layer]:
    """Group ``graph.nodes`` (the relevance path) into layers, in topological order."""
    taken: set[str] = set()
    layers: list[Layer] = []
    for node in graph.nodes:
        if node.name in taken:
            continue
        nodes = [node]
        kind = node.op
        spec = spec_of(node.op)
        absorbs = spec.absorbs if spec is not None else frozenset()
        bias_add = bn = None
        act: Activation | None = None
        out = node.outputs[0]
        data_in = graph.data_inputs(node)
        if spec is not None and spec.product_kind and len(data_in) == len(node.inputs) > 1:
            kind = spec.product_kind  # a product of activations (attention), not a weight
        elif spec is not None and spec.reciprocal_kind and len(node.inputs) > 1 and \
                node.inputs[0].name not in graph.data and data_in:
            kind = spec.reciprocal_kind  # c / x: no rule (refused with the other such nodes)
        standalone = match_activation(graph, data_in[0], exclusive=False) if data_in else None
        norm = match_layer_norm(graph, node) if node.op == "ReduceMean" else None
        rms = match_rms_norm(graph, node) if norm is None else None
        # QDQ models: QuantizeLinear -> DequantizeLinear is one float-to-float layer
        dq = _only_into(graph, out, "DequantizeLinear") if node.op == "QuantizeLinear" else None
        if dq is not None and dq.name not in taken:
            nodes, kind, out, pre = [node, dq], "QuantizeDequantize", dq.outputs[0], dq.outputs[0]
        elif norm is not None and not any(n.name in taken for n in norm.nodes):
            nodes, kind, out, pre = list(norm.nodes), "DecomposedLayerNorm", norm.output, \
                norm.output
        elif rms is not None and not any(n.name in taken for n in rms.nodes):
            nodes, kind, out, pre = list(rms.nodes), "RMSNorm", rms.output, rms.output
            data_in = [rms.x]  # its first node may be Mul(x, x): x is one input
        elif standalone is not None and node in standalone.nodes and \
                not any(n.name in taken for n in standalone.nodes):
            # a multi-node activation (SiLU, Erf-GELU) is one layer of its own
            nodes, kind, out = list(standalone.nodes), standalone.kind, standalone.output
            act = standalone
            pre = out
        elif "bias" in absorbs and len(node.inputs) > 1 and node.inputs[0].name in graph.data \
                and graph.constant(node.inputs[1]) is not None:  # dequantized weights too
            nxt = _sole_consumer(graph, out)
            if nxt is not None and _is_const_bias_add(graph, nxt, out):
                bias_add, out = nxt, nxt.outputs[0]
                nodes.append(nxt)
                nxt = _sole_consumer(graph, out)
            if nxt is not None and "batchnorm" in absorbs and _is_inference_bn(graph, nxt) and \
                    nxt.inputs[0] is out:
                bn, out = nxt, nxt.outputs[0]
                nodes.append(nxt)
            pre = out
            act = match_activation(graph, out, exclusive=True)
        elif _is_inference_bn(graph, node):
            # a standalone BatchNormalization (e.g. DenseNet's pre-activation BN): an affine
            # layer that, like Flux's BatchNorm(C, relu), owns a directly following activation
            pre = out
            act = match_activation(graph, out, exclusive=True)
        else:
            pre = out
        if act is not None and kind == node.op and not is_kind(node.op, Kind.ACTIVATION):
            nodes += [n for n in act.nodes if n not in nodes]
            out = act.output
        outputs = (out,)
        data_outs = [t for t in node.outputs if t.name in graph.data]
        if len(data_outs) > 1 and node.op != "MaxPool":
            if len(nodes) > 1:  # pragma: no cover - no multi-output op starts a pattern
                raise AssertionError(node.name)
            outputs = tuple(data_outs)
        taken.update(n.name for n in nodes)
        layer = Layer(
            index=len(layers), kind=kind, primary=node, nodes=tuple(nodes),
            inputs=tuple(data_in), output=out, pre_activation=pre,
            bias_add=bias_add, batchnorm=bn,
            activation=act.nodes[-1] if act is not None and kind == node.op else None,
            act_name=act.name if act is not None else None,
            scope=graph.scopes.get(node.name, ()), outputs=outputs,
        )
        layer.summary = summarize(graph, layer)
        layers.append(layer)
    return layers


# -- summaries (Flux-style, as on the seed page) --------------------------------------------------
def fmt_tuple(values: list[int] | list[int | None]) -> str:
    """Julia's tuple spelling: ``(3, 3)``, ``(2,)``; a size known only at run time is ``?``."""
    shown = ["?" if v is None else str(v) for v in values]
    return "(" + ", ".join(shown) + ("," if len(values) == 1 else "") + ")"


def act_name(graph: Graph, node: gs.Node | None) -> str | None:
    """The display name of an activation node (its op's ``display`` fact, else the op in lower
    case): ``relu``, ``relu6``, ``sigmoid``."""
    if node is None:
        return None
    spec = spec_of(str(node.op))
    display = spec.display if spec is not None else None
    if callable(display):
        return display(graph, node)
    return display or str(node.op).lower()


def window_args(graph: Graph, node: gs.Node, kernel: list[int],
                default_stride: list[int]) -> list[str]:
    """``pad=...``, ``stride=...``, ``dilation=...`` of a windowed op where they differ from
    the defaults (``default_stride``: ``1`` for convolutions, the kernel for pools)."""
    args = []
    auto_pad = attr(node, "auto_pad", graph.opset, "NOTSET")
    pads = list(attr(node, "pads", graph.opset, None) or [])
    strides = list(attr(node, "strides", graph.opset, None) or [])
    dilations = list(attr(node, "dilations", graph.opset, None) or [])
    if auto_pad not in ("NOTSET", "VALID"):
        args.append(f"pad={auto_pad}")
    elif pads and any(pads):
        half = len(pads) // 2
        if len(set(pads)) == 1:
            args.append(f"pad={pads[0]}")
        elif pads[:half] == pads[half:]:
            args.append(f"pad={fmt_tuple(pads[:half])}")
        else:
            args.append(f"pad={fmt_tuple(pads)}")
    if strides and strides != default_stride:
        args.append(f"stride={strides[0] if len(set(strides)) == 1 else fmt_tuple(strides)}")
    if dilations and any(d != 1 for d in dilations):
        args.append(
            f"dilation={dilations[0] if len(set(dilations)) == 1 else fmt_tuple(dilations)}")
    return args


def summarize(graph: Graph, layer: Layer) -> str:
    """A one-line description in Flux's style (``Conv((3, 3), 3 => 8, relu, pad=1)``) from the
    op's ``summary`` fact; ``Op()`` for ops without one."""
    node = layer.primary
    spec = spec_of(layer.kind)
    if layer.kind != node.op and (spec is None or spec.summary is None or layer.act_name):
        return layer.act_name or layer.kind.lower()  # a multi-node activation (SiLU, Erf-GELU)
    if spec is not None and spec.summary is not None:
        try:
            return spec.summary(graph, layer)
        except (TypeError, IndexError, ValueError):
            pass
    return f"{node.op}()"
