"""What a model may have explained: the default output, tensor outputs only, the head that
relevance starts under (an old opset's Softmax over axis 1 as the version converter spells it),
and ops of the ONNX standard domain on the relevance path (other domains run as they are off
it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lrp_onnx.dtypes import FLOAT_ITEMSIZE
from lrp_onnx.emit.registry import Kind, is_kind
from lrp_onnx.errors import UnsupportedModel, UnsupportedOp, node_label
from lrp_onnx.frontend.load import STANDARD_DOMAINS

if TYPE_CHECKING:
    from lrp_onnx.frontend.graph import Graph


def is_standard(node: gs.Node) -> bool:
    """Whether ``node`` is from the ONNX standard domain (the ops that have rules)."""
    return (node.domain or "") in STANDARD_DOMAINS


def default_output(model: onnx.ModelProto, outputs: Sequence[gs.Variable]) -> gs.Variable:
    """The first output, unless it is declared as what cannot be explained (an integer tensor:
    a scikit-learn classifier lists its int64 ``label`` first; or not a tensor): then the first
    float tensor output, else the first that is not a tensor (refused, saying why)."""
    kinds = {}
    for vi in model.graph.output:
        which = vi.type.WhichOneof("value")
        elem = vi.type.tensor_type.elem_type
        # an untyped output or an undeclared element type counts as explainable
        kinds[vi.name] = "other" if which not in (None, "tensor_type") else \
            "int" if which and elem != onnx.TensorProto.UNDEFINED \
            and elem not in FLOAT_ITEMSIZE else "float"
    if kinds.get(outputs[0].name) == "float":
        return outputs[0]
    return next((o for o in outputs if kinds.get(o.name) == "float"),
                next((o for o in outputs if kinds.get(o.name) == "other"), outputs[0]))


def check_tensor_output(model: onnx.ModelProto, explained: gs.Variable, label: str) -> None:
    """The explained output must be a tensor (skl2onnx's default ``ZipMap`` makes a
    classifier's probabilities a sequence of maps)."""
    vi = next(o for o in model.graph.output if o.name == explained.name)
    kind = vi.type.WhichOneof("value")
    if kind in (None, "tensor_type"):  # untyped: left to the checks that follow
        return
    head = explained.inputs[0] if explained.inputs else None
    hint = ("; skl2onnx's ZipMap makes it: convert the classifier with "
            "to_onnx(clf, X, options={id(clf): {'zipmap': False}}) to get a probabilities "
            "tensor" if head is not None and head.op == "ZipMap"
            else "; choose a tensor output with output=NAME (--output-name NAME)")
    raise UnsupportedModel(f"{label}: output '{vi.name}' is a {kind.replace('_type', '')}, "
                           f"not a tensor{hint}")


def check_domains(path: Sequence[gs.Node], label: str, start: str, end: str) -> None:
    """Nodes of other domains (``ai.onnx.ml``, ``com.microsoft``) run as they are off the
    relevance path (``path``, from value ``start`` to ``end``); on it they have no rule: refused,
    all named at once."""
    foreign = [n for n in path if not is_standard(n)]
    if not foreign:
        return
    listed = ", ".join(f"{node_label(n.name, n.op)} from domain '{n.domain}'"
                       for n in foreign[:5])
    more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
    raise UnsupportedOp(
        f"{label}: {len(foreign)} node(s) outside the ONNX standard domain are on the relevance "
        f"path from '{start}' to '{end}' and have no LRP rule: {listed}{more}; explain an output "
        "computed by standard ops (output=NAME, --output-name NAME) or re-export these ops as "
        "standard ONNX ops")


def wrapped_head(graph: Graph, reshape: gs.Node) -> gs.Tensor | None:
    """``v`` where ``reshape`` is ``Reshape(Softmax(Flatten(v, axis=1)), Shape(v))`` (or
    LogSoftmax; or the shape as a constant), the spelling of an opset < 13 Softmax over axis
    1 of an ``[N, K, 1, 1]`` value that ``onnx.version_converter`` writes; else ``None``."""
    if reshape.op != "Reshape" or len(graph.data_inputs(reshape)) != 1 or \
            reshape.inputs[0].name not in graph.data:
        return None
    head = graph.producer(reshape.inputs[0])
    if head is None or not is_kind(head.op, Kind.OUTPUT) or len(graph.data_inputs(head)) != 1:
        return None
    flat = graph.producer(graph.data_inputs(head)[0])
    if flat is None or flat.op != "Flatten" or int(flat.attrs.get("axis", 1)) != 1 or \
            int(head.attrs.get("axis", -1)) not in (1, -1):
        return None
    v = flat.inputs[0]
    if v.name not in graph.data or len(reshape.inputs) < 2:
        return None
    shape_of = graph.producer(reshape.inputs[1])
    if shape_of is not None and shape_of.op == "Shape" and shape_of.inputs[0] is v and \
            not shape_of.attrs:
        return v
    # or a constant shape: v's static dims, the batch dim given as itself, 0 (copied) or -1
    fixed = graph.const_value(reshape.inputs[1])
    dims = graph.shape(v) if v.shape is not None or v.name in graph.facts else None
    if fixed is None or dims is None or None in dims[1:] or len(np.ravel(fixed)) != len(dims):
        return None
    first, *rest = (int(d) for d in np.ravel(fixed))
    batch_ok = first in (0, -1) and not reshape.attrs.get("allowzero", 0) or first == dims[0]
    return v if batch_ok and rest == dims[1:] else None
