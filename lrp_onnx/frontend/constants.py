"""Values computed from constants alone: which they are, and their value as ONNX Runtime
computes it.

Exporters and quantizers often write a weight as a small constant sub-graph instead of one
initializer: ``Transpose(W)`` (tf2onnx), ``Cast(W_fp16)``, ``Reshape(W, shape)``, a bias made
by ``ConstantOfShape``, ``DequantizeLinear(W_int8, scale, zero_point)`` (ONNX Runtime's QDQ
quantizer). :func:`constant_nodes` finds every node whose inputs are all constants (initializers
or outputs of such nodes), :func:`boundary` the values among their outputs that a
data-dependent node reads, and :func:`evaluate` computes values with ONNX Runtime's CPU kernels
on just the constant sub-graph (every optimisation off), so a folded value holds the bits the
deployed model computes (ONNX Runtime folds the same sub-graph with the same kernels when it
creates a session).

Two users: the canonicalisation pass :func:`fold_constant_weights` (run by
:mod:`lrp_onnx.frontend.passes`; float chains become initializers in the model) and
:meth:`lrp_onnx.frontend.graph.Graph.constant` (quantized weights keep their
``DequantizeLinear`` in the forward pass; the relevance pass gets a float copy).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from lrp_onnx.emit.registry import Kind, is_kind, spec_of


def _foldable(node: onnx.NodeProto) -> bool:
    if node.domain not in ("", "ai.onnx") or \
            any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for a in node.attribute):
        return False
    spec = spec_of(node.op_type)
    return spec is None or not spec.random  # the registry's ``random`` fact


def quantized(nodes: Iterable[onnx.NodeProto]) -> bool:
    """Whether any of ``nodes`` converts to or from a quantized form (the registry's
    ``quantizes`` fact: ``DequantizeLinear``, ``QuantizeLinear``)."""
    for node in nodes:
        spec = spec_of(node.op_type)
        if spec is not None and spec.quantizes:
            return True
    return False


def constant_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes of ``graph`` (topologically ordered, as ONNX requires) whose inputs are all
    constants: initializers, or outputs of earlier such nodes. Graph inputs that are not
    initializers are data."""
    known = {t.name for t in graph.initializer}
    found = []
    for node in graph.node:
        if _foldable(node) and all(i in known for i in node.input if i):
            known.update(o for o in node.output if o)
            found.append(node)
    return found


def boundary(graph: onnx.GraphProto, consts: list[onnx.NodeProto]) -> list[str]:
    """Outputs of the constant nodes ``consts`` read by a node that is not constant (in the
    order those readers appear)."""
    computed = {o for n in consts for o in n.output if o}
    constant = {id(n) for n in consts}
    found: dict[str, None] = {}
    for node in graph.node:
        if id(node) in constant:
            continue
        for name in node.input:
            if name in computed:
                found[name] = None
    return list(found)


def cone(consts: list[onnx.NodeProto], outputs: Iterable[str]) -> list[onnx.NodeProto]:
    """The constant nodes needed to compute ``outputs``, in topological order."""
    producer = {o: n for n in consts for o in n.output if o}
    needed: set[int] = set()
    stack = [producer[o] for o in outputs if o in producer]
    while stack:
        node = stack.pop()
        if id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(producer[i] for i in node.input if i in producer)
    return [n for n in consts if id(n) in needed]


def evaluate(model: onnx.ModelProto, nodes: list[onnx.NodeProto],
             outputs: list[str]) -> dict[str, np.ndarray] | None:
    """``outputs`` of the constant sub-graph ``nodes`` of ``model``, computed by ONNX Runtime's
    CPU kernels with graph optimisations off; ``None`` when it cannot run them."""
    import onnxruntime as ort

    read = {i for n in nodes for i in n.input if i}
    inits = [t for t in model.graph.initializer if t.name in read]
    sub = onnx.helper.make_model(
        onnx.helper.make_graph(list(nodes), "constants", [],
                               [onnx.helper.make_empty_tensor_value_info(o) for o in outputs],
                               inits),
        opset_imports=list(model.opset_import), ir_version=model.ir_version)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(sub.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        values = session.run(outputs, {})
    except Exception:  # noqa: BLE001 - a sub-graph ORT cannot run stays as it is
        return None
    return {o: np.asarray(v) for o, v in zip(outputs, values)}


def is_float(value: np.ndarray) -> bool:
    """Whether ``value`` has a floating-point dtype."""
    return bool(np.issubdtype(value.dtype, np.floating))


def _parameter_slots(g: onnx.GraphProto) -> set[str]:
    """Values read as a parameter: an input after the first of a linear op (Conv's weight and
    bias, Gemm's B and C, MatMul's W, BatchNormalization's statistics), or the other summand
    of an ``Add`` of a linear op's output (a bias). Only these are folded: values read
    elsewhere (a mask, a scale) compile as they are, and stay byte for byte as they were."""
    linear_out = {o for n in g.node if is_kind(n.op_type, Kind.LINEAR) for o in n.output}
    slots: set[str] = set()
    for node in g.node:
        if is_kind(node.op_type, Kind.LINEAR):
            slots.update(node.input[1:])
        elif node.op_type == "Add" and len(node.input) == 2:
            a, b = node.input
            slots.update(x for x, other in ((a, b), (b, a)) if other in linear_out)
    return slots


def fold_constant_weights(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    """Replace each float value that default-domain nodes compute from initializers alone and
    that a data-dependent node reads as a weight or bias (:func:`_parameter_slots`) by an
    initializer of its value, as ONNX Runtime computes
    it (:func:`lrp_onnx.frontend.evaluate`: the same kernels ONNX Runtime folds the
    sub-graph with when it creates a session, so no bit changes). The constant nodes and the
    initializers that only they read are dropped, so a weight is stored once. Left as they are:
    integer values (shape arithmetic), values whose sub-graph holds a quantized weight
    (``DequantizeLinear``: the forward pass keeps it as deployed, the graph view folds it for
    the relevance pass only), values of a node with several outputs, and graph outputs. A model
    without such values is returned untouched."""
    g = model.graph
    consts = constant_nodes(g)
    if not consts:
        return model
    producer = {o: n for n in consts for o in n.output if o}
    outputs = {o.name for o in g.output}
    slots = _parameter_slots(g)
    wanted = [v for v in boundary(g, consts)
              if v in slots and v not in outputs
              and len([o for o in producer[v].output if o]) == 1
              and not quantized(cone(consts, [v]))]
    if not wanted:
        return model
    values = evaluate(model, cone(consts, wanted), wanted)
    folded = {v: a for v, a in (values or {}).items() if is_float(a)}
    if not folded:
        return model
    chain = cone(consts, folded)
    dropped = {id(producer[v]) for v in folded}
    read: Counter[str] = Counter(i for n in g.node if id(n) not in dropped for i in n.input if i)
    for node in reversed(chain):  # readers before producers: a chain empties from the top
        if id(node) not in dropped and not any(read[o] or o in outputs for o in node.output if o):
            dropped.add(id(node))
            read.subtract(i for i in node.input if i)
    orphans = {i for n in chain if id(n) in dropped for i in n.input if i} - \
        {i for i, k in read.items() if k > 0} - outputs
    kept = [t for t in g.initializer if t.name not in orphans]
    kept += [numpy_helper.from_array(a, v) for v, a in folded.items()]
    del g.initializer[:]
    g.initializer.extend(kept)
    inputs = [vi for vi in g.input if vi.name not in orphans]  # IR < 4 lists them as inputs
    if len(inputs) != len(g.input):
        del g.input[:]
        g.input.extend(inputs)
    nodes = [n for n in g.node if id(n) not in dropped]
    del g.node[:]
    g.node.extend(nodes)
    return model
