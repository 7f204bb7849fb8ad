"""Run-time shape facts: dims that are fixed although ONNX shape inference leaves them unknown.

A legacy torch export computes Reshape targets at run time from the batch size
(``x.view(x.size(0), -1)``: ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``; a channel
shuffle; a ViT head whose target passes through ``Mod`` of constants). ONNX shape inference
(:func:`lrp_onnx.frontend.passes.infer_shapes`) then leaves the later dims unknown (``unk__0``)
or the whole shape unknown, although every dim except the batch is fixed.

:func:`resolve` recovers them with ONNX Runtime's symbolic shape inference (sympy arithmetic
on the shape sub-graphs, the batch a symbol), run on a weight-free skeleton of the model, and
only when ONNX shape inference left a gap: a model whose shapes are all known costs nothing.
The facts are *not* written into the model: the compiled file keeps the value_info of ONNX
shape inference, so a model that compiled before compiles to the same bytes; the graph view
(:meth:`lrp_onnx.frontend.graph.Graph.shape`) fills its unknown dims from them. A dim symbolic
inference cannot fix either (it depends on data) stays unknown, and an emitter that needs it
as a number refuses the node.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from lrp_onnx.frontend.load import skeleton

#: Largest constant (elements) folded into the skeleton: shape arithmetic, not weights.
FOLD_LIMIT = 4096

#: value name -> dims (an int where fixed, ``None`` where symbolic: the batch, or data-dependent)
Facts = dict[str, list[int | None]]


def _dims(vi: onnx.ValueInfoProto) -> list[onnx.TensorShapeProto.Dimension] | None:
    t = vi.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    return list(t.tensor_type.shape.dim)


def _symbols(model: onnx.ModelProto) -> set[str]:
    """The dim names the graph inputs declare (the batch ``N``): real symbols, not gaps."""
    names: set[str] = set()
    for vi in model.graph.input:
        for d in _dims(vi) or []:
            if d.HasField("dim_param"):
                names.add(d.dim_param)
    return names


def has_gaps(model: onnx.ModelProto) -> bool:
    """Whether shape inference left a node output without a shape, or a dim that is neither a
    number nor a symbol the graph inputs declare."""
    g = model.graph
    symbols = _symbols(model)
    shapes = {vi.name: _dims(vi) for vi in (*g.value_info, *g.output, *g.input)}
    for node in g.node:
        for name in node.output:
            if not name:
                continue
            dims = shapes.get(name)
            if dims is None:
                return True
            if any(not d.HasField("dim_value") and d.dim_param not in symbols for d in dims):
                return True
    return False


def _small(t: onnx.TensorProto) -> bool:
    count = 1
    for d in t.dims:
        count *= d
    return count <= FOLD_LIMIT and t.data_location != onnx.TensorProto.EXTERNAL \
        and (len(t.raw_data) > 0 or count == 0 or _has_typed_data(t))


def _has_typed_data(t: onnx.TensorProto) -> bool:
    return any(len(getattr(t, f)) for f in ("float_data", "int32_data", "int64_data",
                                            "double_data", "uint64_data", "string_data"))


def fold_constants(skel: onnx.ModelProto) -> int:
    """Replace each default-domain node of ``skel`` whose inputs are all small constants
    (initializers of at most ``FOLD_LIMIT`` elements with their data: shape arithmetic such as
    ``Mod`` of two constants, which symbolic shape inference does not evaluate) by initializers
    of its outputs, evaluated with ONNX's reference evaluator. ``skel`` is a private skeleton
    (:func:`lrp_onnx.frontend.load.skeleton`), never the model; returns the nodes folded."""
    from onnx.reference import ReferenceEvaluator

    g = skel.graph
    consts = {t.name: t for t in g.initializer if _small(t)}
    outputs = {o.name for o in g.output}
    keep: list[onnx.NodeProto] = []
    folded = 0
    for node in g.node:
        ins = [n for n in node.input if n]
        if (node.domain not in ("", "ai.onnx") or not ins or any(n not in consts for n in ins)
                or any(o in outputs for o in node.output)
                or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                       for a in node.attribute)):
            keep.append(node)
            continue
        try:
            feeds = {n: numpy_helper.to_array(consts[n]) for n in ins}
            one = onnx.helper.make_model(
                onnx.helper.make_graph(
                    [node], "fold",
                    [onnx.helper.make_tensor_value_info(n, consts[n].data_type,
                                                        list(consts[n].dims))
                     for n in dict.fromkeys(ins)],
                    [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o]),
                opset_imports=list(skel.opset_import), ir_version=skel.ir_version)
            values = ReferenceEvaluator(one).run(None, feeds)
        except Exception:  # noqa: BLE001 - a node the evaluator cannot run stays a node
            keep.append(node)
            continue
        names = [o for o in node.output if o]
        arrays = [np.asarray(v) for v in values]
        if len(arrays) != len(names) or any(a.size > FOLD_LIMIT for a in arrays):
            keep.append(node)
            continue
        for name, value in zip(names, arrays):
            tensor = numpy_helper.from_array(value, name)
            g.initializer.append(tensor)
            consts[name] = tensor
        folded += 1
    if folded:
        del g.node[:]
        g.node.extend(keep)
    return folded


def _collect(inferred: onnx.ModelProto | None, facts: Facts) -> None:
    """Add the fixed dims of ``inferred``'s values to ``facts`` (a dim another source fixed
    stays as it is)."""
    if inferred is None:
        return
    g = inferred.graph
    for vi in (*g.value_info, *g.output):
        dims = _dims(vi)
        if dims is None:
            continue
        new = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
               for d in dims]
        old = facts.get(vi.name)
        if old is None or len(old) != len(new):
            facts.setdefault(vi.name, new)
        else:
            facts[vi.name] = [a if a is not None else b for a, b in zip(old, new)]


_LOADED: dict[str, Any] = {}


def _symbolic_shape_infer() -> Any:
    """ONNX Runtime's ``tools/symbolic_shape_infer.py``, loaded by its file path: importing it as
    ``onnxruntime.tools.symbolic_shape_infer`` runs ``onnxruntime/tools/__init__.py``, which
    imports torch wherever torch is installed (about 1 s and 0.6 GB of memory at compile time
    for nothing the inference uses)."""
    if "module" not in _LOADED:
        _LOADED["module"] = None
        found = importlib.util.find_spec("onnxruntime")
        if found is not None and found.submodule_search_locations:
            path = Path(list(found.submodule_search_locations)[0]) / "tools" / \
                "symbolic_shape_infer.py"
            spec = importlib.util.spec_from_file_location("_lrp_onnx_symbolic_shape_infer", path)
            if path.is_file() and spec is not None and spec.loader is not None:
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                _LOADED["module"] = module
    return _LOADED["module"]


def _symbolic(skel: onnx.ModelProto) -> onnx.ModelProto | None:
    """ONNX Runtime's symbolic shape inference (sympy arithmetic on shape sub-graphs), or
    ``None`` where it fails."""
    module = _symbolic_shape_infer()
    if module is None:  # pragma: no cover - onnxruntime ships it
        return None
    SymbolicShapeInference = module.SymbolicShapeInference  # noqa: N806 (ORT's class)
    log = logging.getLogger(module.__name__)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        # ``SymbolicShapeInference.infer_shapes`` itself would, where inference is incomplete,
        # save the model as ``sym_shape_infer_temp.onnx`` in the working directory before it
        # raises: its loop is run here instead, and an incomplete result is dropped.
        sym = SymbolicShapeInference(2**31 - 1, False, False, 0)
        sym._preprocess(skel)
        complete = False
        while sym.run_:
            complete = sym._infer_impl()
        sym._update_output_from_vi()
        inferred: onnx.ModelProto = sym.out_mp_
        return inferred if complete else None
    except Exception:  # noqa: BLE001 - any failure of the optional step leaves the gaps
        return None
    finally:
        log.setLevel(level)


def _data_prop(skel: onnx.ModelProto) -> onnx.ModelProto | None:
    """ONNX shape inference with data propagation on the folded skeleton (it keeps partial
    targets such as ``[N, 2, ?]`` that symbolic inference drops), or ``None`` where it fails."""
    try:
        return onnx.shape_inference.infer_shapes(skel, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - onnx raises several types
        return None


def resolve(model: onnx.ModelProto) -> Facts:
    """Fixed dims of the values of ``model``, from its skeleton with the constant shape
    arithmetic folded (:func:`fold_constants`), by ONNX Runtime's symbolic shape inference and
    by ONNX shape inference with data propagation (each fills what the other cannot). ``{}``
    when ONNX shape inference left no gap in the model (nothing is run then). ``model`` is
    read, never changed."""
    if not has_gaps(model):
        return {}
    skel = skeleton(model)
    fold_constants(skel)
    facts: Facts = {}
    _collect(_symbolic(skel), facts)
    _collect(_data_prop(skel), facts)
    return facts
