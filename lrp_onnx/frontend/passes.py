"""Canonicalisation passes: make exporter spellings uniform without changing the forward result.

Each pass works on the pipeline's private copy of the model (``load_model`` made it) and
transforms it in place: copying a 500 MB model once per pass would dominate compile time and
memory. None of these passes changes a computed value; they rename, alias and annotate:

* ``name_nodes``: every node gets a unique, stable name (errors and emitted names use it);
* ``fold_constant_nodes``: ``Constant`` nodes become initializers and ``Identity`` of an
  initializer (the legacy exporter's weight de-duplication) becomes an alias of it;
* ``lower_attention``: the fused ``Attention`` op (opset 23+) becomes its unfused computation
  (:mod:`lrp_onnx.frontend.lowering`; the one pass that changes how a value is computed);
* ``upgrade_opset``: models below opset 16 are converted to 17 (``ScatterElements`` needs
  ``reduction``);
* ``infer_shapes``: static shapes and dtypes for every value.

Where ONNX shape inference leaves a dim unknown that is fixed in fact (a Reshape target computed
at run time from the batch size, ``Shape -> Gather -> Unsqueeze -> Concat``, or through ``Mod``
of constants), :func:`lrp_onnx.frontend.shapes.resolve` recovers it on a weight-free skeleton
(constant shape arithmetic folded, then ONNX Runtime's symbolic shape inference and ONNX's data
propagation); the graph view reads those facts in its shape lookups. They are not written into
the model (its value_info stays the one ``infer_shapes`` wrote), so a model whose shapes were
already known compiles to the same bytes, and a model without gaps runs nothing more.

Folding BatchNormalization into the preceding Conv/Gemm and fusing MatMul+Add happen in the
layer view (:mod:`lrp_onnx.frontend.layers`): the forward nodes stay as exported, so the original
outputs are bit-for-bit those of the input model, and only the relevance pass uses the folded
weights.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import onnx
from onnx import numpy_helper, version_converter

from lrp_onnx.errors import CanonizerError
from lrp_onnx.frontend.load import default_opset, skeleton
from lrp_onnx.frontend.lowering import lower_attention

#: Opset the model is upgraded to when below ``UPGRADE_BELOW``.
TARGET_OPSET = 17
UPGRADE_BELOW = 16
#: Lowest opset a compiled model may be converted to (``opset=``).
MIN_TARGET_OPSET = UPGRADE_BELOW


@dataclass(frozen=True)
class Pass:
    """One canonicalisation step. ``run`` takes the private model and returns it (or a new one)."""

    name: str
    run: Callable[[onnx.ModelProto, str], onnx.ModelProto]
    doc: str


def name_nodes(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    """Give unnamed nodes ``<op_type>_<n>`` and make repeated names unique with a ``__k`` suffix."""
    seen: Counter[str] = Counter()
    taken = {n.name for n in model.graph.node if n.name}
    per_op: Counter[str] = Counter()
    for node in model.graph.node:
        if not node.name:
            while True:
                candidate = f"{node.op_type}_{per_op[node.op_type]}"
                per_op[node.op_type] += 1
                if candidate not in taken:
                    break
            node.name = candidate
            taken.add(candidate)
        seen[node.name] += 1
        if seen[node.name] > 1:
            k = seen[node.name] - 1
            while f"{node.name}__{k}" in taken:
                k += 1
            node.name = f"{node.name}__{k}"
            taken.add(node.name)
    return model


def fold_constant_nodes(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    """Turn ``Constant`` nodes into initializers and alias ``Identity(initializer)`` outputs."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = node.attribute[0] if len(node.attribute) == 1 else None
            if attr is not None and attr.name == "value" and node.output[0] not in graph_outputs:
                tensor = onnx.TensorProto()
                tensor.CopyFrom(attr.t)
                tensor.name = node.output[0]
                graph.initializer.append(tensor)
                inits.add(tensor.name)
                continue
            if attr is not None and attr.name in ("value_float", "value_int", "value_floats",
                                                   "value_ints") \
                    and node.output[0] not in graph_outputs:
                value = onnx.helper.get_attribute_value(attr)
                dtype = "float32" if "float" in attr.name else "int64"
                import numpy as np

                tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), node.output[0])
                graph.initializer.append(tensor)
                inits.add(tensor.name)
                continue
        if (node.op_type == "Identity" and node.domain in ("", "ai.onnx")
                and alias.get(node.input[0], node.input[0]) in inits
                and node.output[0] not in graph_outputs):
            alias[node.output[0]] = alias.get(node.input[0], node.input[0])
            continue
        keep.append(node)
    if len(keep) != len(graph.node) or alias:
        for node in keep:
            for i, name in enumerate(node.input):
                if name in alias:
                    node.input[i] = alias[name]
        del graph.node[:]
        graph.node.extend(keep)
    return model


def upgrade_opset(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    """Convert models below opset 16 to opset 17 with ``onnx.version_converter``."""
    opset = default_opset(model)
    if opset >= UPGRADE_BELOW:
        return model
    try:
        converted = version_converter.convert_version(model, TARGET_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeError/ValueError/IndexError
        raise CanonizerError(
            f"{label}: cannot upgrade opset {opset} to {TARGET_OPSET}: {str(exc).splitlines()[0]}"
        ) from None
    return converted


def convert_opset(model: onnx.ModelProto, label: str, opset: int) -> onnx.ModelProto:
    """Convert ``model`` to default-domain ``opset`` (the compiled model's opset, ``--opset``).

    Allowed: 16 (``ScatterElements`` with ``reduction``) up to the installed onnx's newest.
    """
    newest = onnx.defs.onnx_opset_version()
    if not MIN_TARGET_OPSET <= opset <= newest:
        raise CanonizerError(f"{label}: opset {opset} is outside the supported "
                             f"{MIN_TARGET_OPSET}..{newest}")
    current = default_opset(model)
    if current == opset:
        return model
    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises bare RuntimeError/ValueError/IndexError
        raise CanonizerError(
            f"{label}: cannot convert opset {current} to {opset}: {str(exc).splitlines()[0]}"
        ) from None


def infer_shapes(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    """Run ONNX shape inference (with data propagation) without copying the weights."""
    skel = skeleton(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(skel, strict_mode=False, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError / RuntimeError with long texts
        raise CanonizerError(
            f"{label}: shape inference failed: {str(exc).strip().splitlines()[0]}"
        ) from None
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    # Shape inference may refine the declared graph outputs' shapes; keep the model's own.
    return model


DEFAULT_PASSES: tuple[Pass, ...] = (
    Pass("name_nodes", name_nodes, "unique node names"),
    Pass("fold_constant_nodes", fold_constant_nodes, "Constant -> initializer, Identity aliasing"),
    Pass("lower_attention", lower_attention, "fused Attention -> MatMul, Softmax, MatMul"),
    Pass("upgrade_opset", upgrade_opset, "opset < 16 -> 17"),
    Pass("infer_shapes", infer_shapes, "static shapes and dtypes"),
)


def run_passes(model: onnx.ModelProto, label: str,
               passes: tuple[Pass, ...] = DEFAULT_PASSES, *,
               opset: int | None = None) -> onnx.ModelProto:
    """Apply ``passes`` in order to the private ``model`` and return the result; ``opset``
    converts the model to that opset before shape inference."""
    if opset is not None:
        target = opset
        at = next(i for i, p in enumerate(passes) if p.name == "infer_shapes")
        step = Pass(f"convert_opset_{opset}",
                    lambda m, lab: convert_opset(m, lab, target), f"opset -> {opset}")
        passes = (*passes[:at], step, *passes[at:])
    for p in passes:
        model = p.run(model, label)
    return model
