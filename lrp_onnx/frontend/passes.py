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
  ``reduction``), and IR < 4 models' initializers listed as graph inputs stop being inputs;
* ``fold_constant_weights``: a float value computed from initializers alone (``Transpose(W)``,
  ``Cast(W_fp16)``, a ``ConstantOfShape`` bias) and read as a linear layer's weight or bias
  becomes an initializer holding the value ONNX Runtime computes for it, and the nodes and
  initializers only it read are dropped (the weight is stored once); quantized weights
  (``DequantizeLinear``) stay as deployed (:mod:`lrp_onnx.frontend.constants`);
* ``infer_shapes``: static shapes and dtypes for every value;
* ``static_slice_bounds``: ``Slice`` bounds computed at run time from dims that shape inference
  fixed (legacy Llama's rotate_half slices at ``Shape(q)[3] / 2``) become constants (the one
  other pass that changes how a value is computed: a shape read becomes the number it always
  is).

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

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

from lrp_onnx.errors import CanonizerError
from lrp_onnx.frontend.constants import fold_constant_weights
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


#: Lowest IR version whose graph inputs need not list the initializers (IR 3 lists every
#: initializer as a graph input too).
CONSTANTS_NOT_INPUTS_IR = 4


def drop_initializer_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """For IR < 4, remove the graph inputs that are initializers (IR 3 lists every weight as an
    input: they are the model's constants, not inputs to explain or to keep as inputs of the
    compiled model) and raise the IR to 4, where that listing is not required; newer models
    are returned untouched."""
    if model.ir_version >= CONSTANTS_NOT_INPUTS_IR:
        return model
    inits = {t.name for t in model.graph.initializer}
    keep = [vi for vi in model.graph.input if vi.name not in inits]
    if len(keep) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(keep)
    model.ir_version = CONSTANTS_NOT_INPUTS_IR
    return model


def _converter_blockers(model: onnx.ModelProto, message: str) -> str:
    """The nodes a version-converter message points at (an op type or an attribute name it
    quotes), as `` at 'name' (Op), ...``; empty when it names neither."""
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", message))
    hits = [n for n in model.graph.node if n.op_type in words] or \
        [n for n in model.graph.node if any(a.name in words for a in n.attribute)]
    if not hits:
        return ""
    listed = ", ".join(f"'{n.name}' ({n.op_type})" for n in hits[:5])
    return f" at {listed}" + (f" and {len(hits) - 5} more" if len(hits) > 5 else "")


#: Models below this opset (or IR 4) get a note in the compiled model's record and on the
#: command line's stderr when upgraded; opsets 13-15 were upgraded silently before old opsets
#: were accepted and stay so (their compiled bytes do not change).
NOTE_BELOW = 13


def upgrade_note(opset: int, ir_version: int) -> tuple[dict[str, int], str]:
    """What :func:`upgrade_opset` does to a model read at ``opset`` and ``ir_version``: the
    record fields (``upgraded_from_opset``, ``upgraded_from_ir``; empty for a model it leaves
    as it was, or upgrades from opset 13-15) and one line saying so (empty then)."""
    fields: dict[str, int] = {}
    done = []
    if opset < NOTE_BELOW:
        fields["upgraded_from_opset"] = opset
        done.append(f"upgraded from opset {opset} to {TARGET_OPSET} with onnx.version_converter")
    if ir_version < CONSTANTS_NOT_INPUTS_IR:
        fields["upgraded_from_ir"] = ir_version
        done.append(f"IR {ir_version}: the initializers it lists as graph inputs are read as "
                    "constants, not inputs")
    return fields, "; ".join(done)


def upgrade_opset(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    """Bring an old model to the compiler's floor: initializers listed as inputs (IR < 4) are
    dropped from the inputs (:func:`drop_initializer_inputs`), and models below opset 16 are
    converted to opset 17 with ``onnx.version_converter`` (its new ``Constant`` nodes become
    initializers, as ``fold_constant_nodes`` does for the exporter's); for a model that was
    at IR < 4, the IR is raised to the least the new opsets need (ONNX Runtime runs it)."""
    old_ir = model.ir_version
    model = drop_initializer_inputs(model)
    opset = default_opset(model)
    if opset >= UPGRADE_BELOW:
        return _least_ir(model) if old_ir < CONSTANTS_NOT_INPUTS_IR else model
    try:
        converted = version_converter.convert_version(model, TARGET_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeError/ValueError/IndexError
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        why = first.split(" failed: ", 1)[-1]  # drop the converter's source location
        raise CanonizerError(
            f"{label}: onnx.version_converter cannot upgrade opset {opset} to {TARGET_OPSET}"
            f"{_converter_blockers(model, why)}: {why}; convert or re-export the model at "
            f"opset {TARGET_OPSET} yourself"
        ) from None
    if old_ir < CONSTANTS_NOT_INPUTS_IR:
        converted = _least_ir(converted)
    return fold_constant_nodes(converted, label)


def _least_ir(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its IR raised to the least its opsets need (onnx's version table)."""
    model.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(
        list(model.opset_import), ignore_unknown=True))
    return model


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


#: Elements of the largest initializer read as shape arithmetic by ``static_slice_bounds``.
_SMALL = 4096
_INT_TYPES = frozenset({onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL})


def _static_dims(vi: onnx.ValueInfoProto) -> list[int | None] | None:
    t = vi.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim]


class _ShapeArithmetic:
    """Evaluates data-free integer values of a model from its constants and the dims shape
    inference fixed: ``Shape(v)`` (or ``Gather`` of entries of it) where the dims read are
    static, then any default-domain node with integer or boolean outputs whose inputs all have
    values (ONNX's reference evaluator, one node at a time)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.model = model
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.inits = {t.name: t for t in g.initializer}
        self.dims = {vi.name: _static_dims(vi) for vi in (*g.input, *g.value_info, *g.output)}
        self.types = {vi.name: vi.type.tensor_type.elem_type
                      for vi in (*g.input, *g.value_info, *g.output)}
        self.memo: dict[str, object] = {}

    def shape_of(self, name: str) -> list[int | None] | None:
        if name in self.inits:
            return [int(d) for d in self.inits[name].dims]
        return self.dims.get(name)

    def value(self, name: str, depth: int = 0) -> np.ndarray | None:
        if name not in self.memo:
            self.memo[name] = self._value(name, depth)
        found = self.memo[name]
        return found if isinstance(found, np.ndarray) else None

    def _shape_entries(self, node: onnx.NodeProto) -> list[int | None] | None:
        dims = self.shape_of(node.input[0])
        if dims is None:
            return None
        at = {a.name: a.i for a in node.attribute}
        rank = len(dims)
        start, end = at.get("start", 0), at.get("end", rank)
        return dims[slice(start, end)]

    def _value(self, name: str, depth: int) -> np.ndarray | None:
        t = self.inits.get(name)
        if t is not None:
            size = int(np.prod(t.dims)) if len(t.dims) else 1
            small = size <= _SMALL and t.data_location != onnx.TensorProto.EXTERNAL
            return numpy_helper.to_array(t) if small else None
        node = self.producer.get(name)
        if node is None or depth > 64 or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Shape":
            dims = self._shape_entries(node)
            if dims is None or any(d is None for d in dims):
                return None
            return np.asarray(dims, dtype=np.int64)
        if node.op_type == "Gather" and node.input[0] in self.producer and \
                self.producer[node.input[0]].op_type == "Shape":
            dims = self._shape_entries(self.producer[node.input[0]])
            idx = self.value(node.input[1], depth + 1)
            if dims is None or idx is None:
                return None
            picked = [dims[int(i)] for i in np.ravel(idx) if -len(dims) <= int(i) < len(dims)]
            if len(picked) != idx.size or any(d is None for d in picked):
                return None
            return np.asarray(picked, dtype=np.int64).reshape(idx.shape)
        if any(self.types.get(o, onnx.TensorProto.UNDEFINED) not in _INT_TYPES
               for o in node.output if o) or \
                any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                    for a in node.attribute):
            return None
        ins = [n for n in node.input if n]
        found = {n: self.value(n, depth + 1) for n in dict.fromkeys(ins)}
        feeds = {n: v for n, v in found.items() if v is not None}
        if not ins or len(feeds) != len(found):
            return None
        from onnx.reference import ReferenceEvaluator

        try:
            one = onnx.helper.make_model(
                onnx.helper.make_graph(
                    [node], "fold",
                    [onnx.helper.make_tensor_value_info(
                        n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
                     for n, v in feeds.items()],
                    [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o]),
                opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
            values = list(ReferenceEvaluator(one).run(None, feeds))
        except Exception:  # noqa: BLE001 - a node the evaluator cannot run stays as it is
            return None
        outs = [o for o in node.output if o]
        for o, v in zip(outs, values):
            if o != name:
                self.memo[o] = np.asarray(v)
        return np.asarray(values[outs.index(name)])


def static_slice_bounds(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    """Replace each ``Slice`` bound (starts, ends, axes, steps) that is computed at run time
    but from static dims and constants only by an initializer of its value, and re-run shape
    inference if any was replaced. The nodes that computed it stay (other nodes may read
    them); the model computes what it computed before for every input shape it accepts."""
    arith: _ShapeArithmetic | None = None
    inits = {t.name for t in model.graph.initializer}
    replaced = 0
    for node in model.graph.node:
        if node.op_type != "Slice" or node.domain not in ("", "ai.onnx"):
            continue
        for i in range(1, len(node.input)):
            name = node.input[i]
            if not name or name in inits:
                continue
            arith = arith or _ShapeArithmetic(model)
            value = arith.value(name)
            if value is None:
                continue
            new = f"{name}/static"
            if new not in inits:
                model.graph.initializer.append(numpy_helper.from_array(value, new))
                inits.add(new)
            node.input[i] = new
            replaced += 1
    return infer_shapes(model, label) if replaced else model


DEFAULT_PASSES: tuple[Pass, ...] = (
    Pass("name_nodes", name_nodes, "unique node names"),
    Pass("fold_constant_nodes", fold_constant_nodes, "Constant -> initializer, Identity aliasing"),
    Pass("lower_attention", lower_attention, "fused Attention -> MatMul, Softmax, MatMul"),
    Pass("upgrade_opset", upgrade_opset, "opset < 16 -> 17"),
    Pass("fold_constant_weights", fold_constant_weights, "float constant sub-graph -> initializer"),
    Pass("infer_shapes", infer_shapes, "static shapes and dtypes"),
    Pass("static_slice_bounds", static_slice_bounds, "Slice bounds from static dims -> constant"),
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
