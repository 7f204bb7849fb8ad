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

Two users: the canonicalisation pass :func:`lrp_onnx.frontend.passes.fold_constant_weights`
(float chains become initializers in the model) and :meth:`lrp_onnx.frontend.graph.Graph.constant`
(quantized weights keep their ``DequantizeLinear`` in the forward pass; the relevance pass gets a
float copy).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx

from lrp_onnx.emit.registry import spec_of


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
