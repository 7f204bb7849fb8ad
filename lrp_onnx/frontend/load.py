"""Load and validate an ONNX model: a path or ``ModelProto`` in, a private checked copy out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from lrp_onnx.dtypes import FLOAT_ITEMSIZE
from lrp_onnx.errors import ModelLoadError
from lrp_onnx.io import read_model


def default_opset(model: onnx.ModelProto) -> int:
    """The model's ``ai.onnx`` opset version (0 if it imports none)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def _check_external_locations(model: onnx.ModelProto, base: Path, label: str) -> None:
    """Refuse external-data locations that are absolute or leave the model's folder."""
    root = base.resolve()
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location or "\x00" in location or os.path.isabs(location) \
                or Path(location).drive:
            raise ModelLoadError(
                f"{label}: tensor '{tensor.name}' has external data at an absolute or empty "
                f"location {location!r}; only paths inside the model's folder are read"
            )
        target = (root / location).resolve()
        if root not in target.parents and target != root:
            raise ModelLoadError(
                f"{label}: tensor '{tensor.name}' has external data at {location!r}, "
                "which resolves outside the model's folder"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"{label}: tensor '{tensor.name}' needs external data file {location!r}, "
                "which does not exist"
            )


def uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether any tensor of ``model`` refers to an external data file."""
    return any(external_data_helper.uses_external_data(t)
               for t in external_data_helper._get_all_tensors(model))


def load_model(model: str | os.PathLike[str] | onnx.ModelProto,
               info: dict[str, Any] | None = None) -> tuple[onnx.ModelProto, str]:
    """Read ``model`` into a private ``ModelProto`` and validate it.

    Args:
        model: a path to an ``.onnx`` file (external data is read from beside it) or a
            ``ModelProto`` (copied: the caller's object is never modified).
        info: if given, ``info["external_data"]`` says whether the file stored its weights
            as external data.

    Returns:
        ``(proto, label)`` where ``label`` names the source in error messages.

    Raises:
        ModelLoadError: unreadable file, not protobuf, fails ``onnx.checker``, or has nodes
            from a domain ONNX Runtime does not implement. Old opsets are accepted here and
            upgraded by :func:`lrp_onnx.frontend.passes.upgrade_opset`.
    """
    if isinstance(model, onnx.ModelProto):
        label = model.graph.name or "<ModelProto>"
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        label = str(path)
        if not path.is_file():
            raise ModelLoadError(f"{label}: no such file")
        try:
            if path.stat().st_size == 0:
                raise ModelLoadError(f"{label}: file is empty, not an ONNX model")
            with path.open("rb") as fh:
                proto = read_model(fh)
        except OSError as exc:
            raise ModelLoadError(f"{label}: cannot read file ({exc.strerror})") from None
        except (DecodeError, RuntimeError, ValueError, EOFError, MemoryError):
            raise ModelLoadError(f"{label}: not an ONNX model (protobuf parse failed)") from None
        if not proto.HasField("graph"):
            raise ModelLoadError(f"{label}: not an ONNX model (no graph)")
        _check_external_locations(proto, path.parent, label)
        if info is not None:
            info["external_data"] = uses_external_data(proto)
        try:
            external_data_helper.load_external_data_for_model(proto, str(path.parent))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{label}: cannot read external data ({exc})") from None
    else:
        raise TypeError(f"model must be a path or onnx.ModelProto, not {type(model).__name__}")

    validate(proto, label)
    return proto, label


#: Largest input sample (elements, batch dimension excluded) a model may declare.
MAX_SAMPLE_ELEMENTS = 2**31
#: Op domains the compiler reads (the ONNX standard ops).
STANDARD_DOMAINS = ("", "ai.onnx")
#: Other op domains ONNX Runtime implements: their nodes run as they are off the relevance
#: path (a scikit-learn converter's ``ArrayFeatureExtractor`` computing the label output);
#: on it they are refused (:meth:`lrp_onnx.frontend.graph.Graph`), as they have no rule.
RUNTIME_DOMAINS = ("ai.onnx.ml", "com.microsoft")


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line (whitespace collapsed), at most ``limit`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


#: Types stored two to a byte, or with no fixed size: no raw-size check.
_NOT_BYTEWISE = frozenset({onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING,
                           onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
                           getattr(onnx.TensorProto, "FLOAT4E2M1", -1)})


def _raw_itemsize(data_type: int) -> int | None:
    """Bytes per element of a tensor type stored raw (float8 types included), ``None`` where
    elements are not whole bytes or the type is unknown."""
    if data_type in FLOAT_ITEMSIZE:
        return FLOAT_ITEMSIZE[data_type]
    if data_type in _NOT_BYTEWISE:
        return None
    try:
        return int(onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize)
    except (KeyError, ValueError, TypeError):
        return None


def _node_ref(node: onnx.NodeProto) -> str:
    return f"'{node.name}' ({node.op_type})" if node.name else f"a {node.op_type} node"


def check_structure(proto: onnx.ModelProto, label: str) -> None:
    """Inputs, outputs, undefined values, cycles and op domains, with one-line errors; a graph
    whose nodes are acyclic but out of order is sorted (the private copy)."""
    graph = proto.graph
    inits = {t.name for t in graph.initializer}
    if not [i for i in graph.input if i.name not in inits]:
        raise ModelLoadError(f"{label}: the graph has no inputs")
    if len(graph.output) == 0:
        raise ModelLoadError(f"{label}: the graph has no outputs")
    try:
        names = [n.name for n in graph.node] + [n.op_type for n in graph.node] + [
            v for n in graph.node for v in (*n.input, *n.output)] + [
            v.name for v in (*graph.input, *graph.output, *graph.initializer)] + [
            proto.producer_name, proto.producer_version, proto.domain, proto.doc_string,
            graph.name, graph.doc_string] + [
            t for p in proto.metadata_props for t in (p.key, p.value)] + [
            n.domain for n in graph.node] + [n.doc_string for n in graph.node]
    except UnicodeDecodeError:
        names = [b""]
    if any(not isinstance(v, str) for v in names):
        raise ModelLoadError(f"{label}: a name or text field is not valid UTF-8")
    for vi in graph.input:
        dims = vi.type.tensor_type.shape.dim
        if any(d.HasField("dim_value") and d.dim_value <= 0 for d in dims):
            raise ModelLoadError(f"{label}: input '{vi.name}' has a dimension of size 0")
        sample = 1
        for d in list(dims)[1:]:
            sample *= d.dim_value if d.HasField("dim_value") else 1
        if sample > MAX_SAMPLE_ELEMENTS:
            raise ModelLoadError(f"{label}: input '{vi.name}' has {sample} elements per sample "
                                 f"(more than {MAX_SAMPLE_ELEMENTS} is refused)")
    for kind, values in (("input", graph.input), ("output", graph.output)):
        seen: set[str] = set()
        for v in values:
            if v.name in seen:
                raise ModelLoadError(f"{label}: graph {kind} '{v.name}' is listed twice")
            seen.add(v.name)
    if proto.functions:
        raise ModelLoadError(f"{label}: model-local functions are not supported "
                             f"({', '.join(f.name for f in proto.functions)[:100]})")
    for t in graph.initializer:
        size = _raw_itemsize(t.data_type)
        if t.HasField("raw_data") and size is not None:
            count = 1
            for d in t.dims:
                count *= d
            # larger float tensors are checked with the checker (run_onnx_checker), without
            # reading their bytes here
            if count <= 64 or t.data_type not in FLOAT_ITEMSIZE:
                if len(t.raw_data) != count * size:
                    raise ModelLoadError(
                        f"{label}: initializer '{t.name}' holds {len(t.raw_data)} bytes, its "
                        f"shape {list(t.dims)} needs {count * size}")
    for n in graph.node:
        for a in n.attribute:
            if a.name == "group" and a.type == onnx.AttributeProto.INT and a.i < 1:
                raise ModelLoadError(f"{label}: node {_node_ref(n)} has group={a.i}")
    foreign = [n for n in graph.node if n.domain not in STANDARD_DOMAINS + RUNTIME_DOMAINS]
    if foreign:
        listed = ", ".join(f"{_node_ref(n)} from domain '{n.domain}'" for n in foreign[:5])
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise ModelLoadError(f"{label}: ops outside the ONNX standard domain and the domains "
                             f"ONNX Runtime implements ({', '.join(RUNTIME_DOMAINS)}) are not "
                             f"supported: {listed}{more}")
    producer: dict[str, int] = {}
    for k, node in enumerate(graph.node):
        for out in node.output:
            if out:
                producer[out] = k
    available = {i.name for i in graph.input} | inits
    for node in graph.node:
        for name in node.input:
            if name and name not in available and name not in producer:
                raise ModelLoadError(
                    f"{label}: node {_node_ref(node)} reads '{name}', which no node, graph "
                    "input or initializer defines (a dangling name or a missing initializer)")
    for out in graph.output:
        if out.name not in available and out.name not in producer:
            raise ModelLoadError(f"{label}: graph output '{out.name}' is not computed by any node")
    # Kahn's algorithm over node indices: the order, or the nodes left on a cycle.
    deps = [{producer[i] for i in node.input if i in producer and i not in available}
            for node in graph.node]
    users: dict[int, list[int]] = {}
    for k, d in enumerate(deps):
        for p in d:
            users.setdefault(p, []).append(k)
    missing = [len(d) for d in deps]
    ready = [k for k, m in enumerate(missing) if m == 0]
    order: list[int] = []
    while ready:
        k = ready.pop()
        order.append(k)
        for u in users.get(k, []):
            missing[u] -= 1
            if missing[u] == 0:
                ready.append(u)
    if len(order) < len(graph.node):
        stuck = [graph.node[k] for k, m in enumerate(missing) if m > 0]
        cycle = ", ".join(_node_ref(n) for n in stuck[:4]) + (" ..." if len(stuck) > 4 else "")
        raise ModelLoadError(f"{label}: the graph has a cycle through {cycle}")
    if any(p > k for k, d in enumerate(deps) for p in d):  # acyclic, but out of order
        nodes = [graph.node[k] for k in _topological(graph, deps)]
        copies = [onnx.NodeProto() for _ in nodes]
        for c, n in zip(copies, nodes):
            c.CopyFrom(n)
        del graph.node[:]
        graph.node.extend(copies)


def _topological(graph: onnx.GraphProto, deps: list[set[int]]) -> list[int]:
    """A topological order that keeps the file's order where it is already valid."""
    done: set[int] = set()
    out: list[int] = []

    def visit(k: int) -> None:
        stack = [(k, iter(sorted(deps[k])))]
        while stack:
            node, it = stack[-1]
            nxt = next((d for d in it if d not in done), None)
            if nxt is None:
                stack.pop()
                if node not in done:
                    done.add(node)
                    out.append(node)
            else:
                stack.append((nxt, iter(sorted(deps[nxt]))))

    for k in range(len(graph.node)):
        if k not in done:
            visit(k)
    return out


def shape_inference_error(model: onnx.ModelProto) -> str | None:
    """The first error strict ONNX shape inference reports on ``model`` (one line), or None."""
    import re

    try:
        onnx.shape_inference.infer_shapes(skeleton(model), strict_mode=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types with long texts
        text = str(exc)
        errors = re.findall(r"\((op_type:[^)]*)\): (\[\w+\] [^\n]*)", text)
        first = [e for e in errors if "expected to have type but instead is null" not in e[1]]
        if first or errors:
            where, what = (first or errors)[0]
            return one_line(f"{where}: {what}")
        return one_line(text) or type(exc).__name__
    return None


def validate(proto: onnx.ModelProto, label: str) -> None:
    """Structural checks with one-line errors (``onnx.checker`` plus what the compiler needs)."""
    if len(proto.graph.node) == 0:
        raise ModelLoadError(f"{label}: the graph has no nodes")
    check_structure(proto, label)
    try:
        run_onnx_checker(proto)
    except (onnx.checker.ValidationError, ValueError) as exc:
        text = str(exc).strip() or type(exc).__name__
        raise ModelLoadError(f"{label}: invalid ONNX model: {one_line(text)}") from None


def _stored_elements(t: onnx.TensorProto) -> int:
    """How many elements a float tensor's data holds (raw bytes or the typed field)."""
    if t.HasField("raw_data"):
        return len(t.raw_data) // onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    if t.data_type == onnx.TensorProto.FLOAT:
        return len(t.float_data)
    if t.data_type == onnx.TensorProto.DOUBLE:
        return len(t.double_data)
    return len(t.int32_data)  # FLOAT16 / BFLOAT16


def run_onnx_checker(model: onnx.ModelProto) -> None:
    """``onnx.checker.check_model`` without serializing the weights.

    The checker copies the whole model into C++; here large float initializers are replaced by
    one-element stand-ins after their stored size is checked against their dims (what the
    checker would verify for them). Raises ``onnx.checker.ValidationError`` as the checker does.
    """
    skel = skeleton(model, data=True)
    onnx.checker.check_model(skel, full_check=False)


def skeleton(model: onnx.ModelProto, data: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` whose large float initializers carry dims but no data (for shape
    inference), or, with ``data=True``, one element and no dims (for the checker, after
    their stored size is checked)."""
    skel = onnx.ModelProto()
    skel.ir_version = model.ir_version
    skel.opset_import.extend(model.opset_import)
    graph = skel.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    for t in model.graph.initializer:
        count = 1
        for d in t.dims:
            count *= d
        if t.data_type not in FLOAT_ITEMSIZE or count <= 64 \
                or t.data_location == onnx.TensorProto.EXTERNAL:
            graph.initializer.append(t)
            continue
        stub = graph.initializer.add()
        stub.name = t.name
        stub.data_type = t.data_type
        if not data:
            stub.dims.extend(t.dims)
            continue
        stored = _stored_elements(t)
        if stored != count:
            raise onnx.checker.ValidationError(
                f"initializer '{t.name}' holds {stored} values but its shape "
                f"{list(t.dims)} needs {count}")
        stub.dims.append(1)
        stub.raw_data = bytes(onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize)
    return skel
