"""What a model may have explained: the default output, tensor outputs only, and ops of the
ONNX standard domain on the relevance path (other domains run as they are off it)."""

from __future__ import annotations

from collections.abc import Sequence

import onnx
import onnx_graphsurgeon as gs

from lrp_onnx.dtypes import FLOAT_ITEMSIZE
from lrp_onnx.errors import UnsupportedModel, UnsupportedOp, node_label
from lrp_onnx.frontend.load import STANDARD_DOMAINS


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
