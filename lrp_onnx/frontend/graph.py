"""Read-only view over the canonical model: topological nodes, data dependence, shapes, scopes.

Built on onnx-graphsurgeon (the user's graph library): ``gs.import_onnx`` keeps initializers
lazy, so a 500 MB model is not copied into numpy until a weight is really read.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from lrp_onnx.dtypes import float_dtype
from lrp_onnx.emit.registry import Kind, Sign, is_kind, spec_of
from lrp_onnx.errors import UnsupportedAttribute, UnsupportedModel, node_label
from lrp_onnx.frontend.explained import (
    check_domains,
    check_tensor_output,
    default_output,
    is_standard,
    wrapped_head,
)
from lrp_onnx.frontend.load import default_opset, shape_inference_error
from lrp_onnx.frontend.shapes import resolve
from lrp_onnx.frontend.tokens import TOKEN_IDS, Embedding, find_embeddings


def scope_of(node: onnx.NodeProto) -> tuple[str, ...]:
    """Module path of ``node`` as recorded by the exporter (``()`` when it recorded none).

    * torch dynamo: metadata ``pkg.torch.onnx.name_scopes`` (a list) or ``namespace``
      (``": Seq/0: Seq/0.0: Conv2d/conv2d: aten.conv2d"``); the last entry is the op itself.
    * torch legacy: the node name ``/0/0.0/Conv`` or ``/layer1/layer1.0/conv1/Conv``.

    Both spellings give the module path ``("0", "0")`` for the first conv of
    ``Sequential(Sequential(...))`` and ``("layer2", "0", "downsample", "0")`` for a ResNet
    shortcut conv.
    """
    meta = {p.key: p.value for p in node.metadata_props}
    parts: list[str] = []
    if "pkg.torch.onnx.name_scopes" in meta:
        try:
            raw = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
            parts = [str(p) for p in raw][:-1]
        except (ValueError, SyntaxError):
            parts = []
    elif "namespace" in meta:
        entries = meta["namespace"].split("/")
        parts = [e.split(":", 1)[0].strip() for e in entries][:-1]
    elif node.name.startswith("/"):
        parts = node.name.split("/")[1:-1]
    path: list[str] = []
    prev = ""
    for part in parts:
        if not part:
            continue
        # legacy names repeat the parent's name ("0" then "0.0", "downsample" then
        # "downsample.0"); dynamo gives full qualified names ("layer1", "layer1.0"): in both a
        # component that extends the previous one adds only its suffix.
        rel = part[len(prev) + 1:] if prev and part.startswith(prev + ".") else part
        path += rel.split(".")
        prev = part
    return tuple(path)


class Graph:
    """The canonical model as a graphsurgeon graph plus the facts every emitter needs.

    Attributes:
        gs: the graphsurgeon graph (topologically sorted); emitted nodes are appended to it.
        label: the source file or model name, for messages.
        opset: the default-domain opset.
        data_input: the float value that relevance is computed for: the graph input
            ``input``, or the only float input, or, for a model reading token ids, the output
            of their embedding lookup (``embedding``); other inputs are constants to the
            relevance pass: data dependence starts from this value alone.
        embedding: the token input and its embedding lookup, or ``None`` for a model explained
            at a float graph input.
        explained: the graph output whose target entry is explained.
        logits: the value relevance starts from (``explained`` or the input of a trailing
            Softmax/LogSoftmax).
        nodes: data-dependent nodes on the path from ``data_input`` to ``logits``, in
            topological order (shape-only and constant subgraphs are not among them).
    """

    def __init__(self, model: onnx.ModelProto, label: str, output: str | None = None,
                 input: str | None = None) -> None:
        self.label = label
        #: record fields of an old model's upgrade (:func:`lrp_onnx.frontend.passes.
        #: upgrade_note`), set by :func:`lrp_onnx.api.prepare`, which saw the model as read
        self.upgraded_from: dict[str, int] = {}
        #: the pipeline's private model; the compiled model is built in it (weights stay put)
        self.proto = model
        self.opset = default_opset(model)
        self.scopes = {n.name: scope_of(n) for n in model.graph.node}
        self.node_meta = {n.name: list(n.metadata_props) for n in model.graph.node
                          if len(n.metadata_props)}
        #: dims ONNX shape inference left unknown that run-time shape arithmetic fixes
        #: (:mod:`lrp_onnx.frontend.shapes`); read by :meth:`shape`, never exported
        self.facts = resolve(model)
        #: float copies of values computed from constants (:meth:`constant`), by value name
        self._folded: dict[str, gs.Constant | None] = {}
        #: the nodes computing values from constants alone, found on the first such value
        self._constant_nodes: list[onnx.NodeProto] | None = None
        try:
            # graphsurgeon warns on stderr about what it keeps as it is (a non-tensor output
            # such as skl2onnx's ZipMap, which is refused below in one line of ours)
            with G_LOGGER.suppress(G_LOGGER.ERROR):
                self.gs = gs.import_onnx(model)
            self.gs.toposort()
        except (KeyError, ValueError, TypeError, IndexError, RecursionError) as exc:
            # e.g. an unknown dtype, raw data that does not fit its shape, a subgraph cycle
            raise UnsupportedModel(f"{label}: the graph cannot be imported "
                                   f"({type(exc).__name__}: {str(exc)[:200]})") from None
        self.tensors: dict[str, gs.Tensor] = self.gs.tensors()

        self.embedding: Embedding | None = None
        self.data_input: gs.Variable = self._choose_input(input)
        shape = self.fed_input.shape
        if shape is None or len(shape) < (1 if self.embedding else 2):
            raise UnsupportedModel(
                f"{label}: input '{self.fed_input.name}' has shape {shape}; a batch dimension "
                "followed by the sample dimensions is required"
            )
        outs = {o.name: o for o in self.gs.outputs}
        if output is None:
            self.explained = default_output(model, self.gs.outputs)
        elif output in outs:
            self.explained = outs[output]
        else:
            raise UnsupportedModel(
                f"{label}: no graph output '{output}' (outputs: {', '.join(outs)})"
            )

        check_tensor_output(self.proto, self.explained, label)
        self.data: set[str] = self._data_dependent()
        if self.explained.name not in self.data:
            raise UnsupportedModel(
                f"{label}: output '{self.explained.name}' does not depend on input "
                f"'{self.data_input.name}'"
            )
        logits = self.explained
        head = self.producer(logits)
        while head is not None:
            if _is_head(head.op) and is_standard(head) and len(self.data_inputs(head)) == 1:
                logits = self.data_inputs(head)[0]
            else:
                wrapped = wrapped_head(self, head)
                if wrapped is None:
                    break
                logits = wrapped
            head = self.producer(logits)
        self.logits: gs.Variable = logits
        self.nodes: list[gs.Node] = self._relevance_path()
        self.nonneg: set[str] = self._nonneg()

    def check_domains(self) -> None:
        """Refuse, naming them all, nodes outside the ONNX standard domain on the relevance
        path (where the layer view cannot be built; else they are listed with every other node
        that has no relevance rule, :func:`lrp_onnx.emit.registry.resolve_entries`)."""
        check_domains(self.nodes, self.label, self.data_input.name, self.logits.name)

    @property
    def fed_input(self) -> gs.Variable:
        """The graph input the user feeds for the explained value: the token ids of a text
        model, else the explained float input itself."""
        return self.embedding.ids if self.embedding is not None else self.data_input

    def _choose_input(self, name: str | None) -> gs.Variable:
        """The value to explain: input ``name``; without a name the only token input (an
        integer input read by an embedding lookup; several: the one named ``input_ids``), else
        the only float input. Several candidates without ``name`` are refused (a mask must
        never be explained by accident)."""
        floats = [t for t in self.gs.inputs if float_dtype(t)]
        tokens = find_embeddings(self.gs.inputs)
        #: names of every float graph input (the compiled record names the explained one
        #: where there are several)
        self.float_inputs = [t.name for t in floats]
        listed = ", ".join([f"'{t.name}'" for t in floats] +
                           [f"'{t}' (token ids)" for t in tokens])
        if name is not None:
            if name in tokens:
                self.embedding = tokens[name]
                return self.embedding.output
            chosen = [t for t in floats if t.name == name]
            if not chosen:
                other = any(t.name == name for t in self.gs.inputs)
                why = "is neither a floating-point input nor token ids read by an embedding " \
                    "lookup" if other else "is no graph input"
                raise UnsupportedModel(f"{self.label}: '{name}' {why} (inputs to explain: "
                                       f"{listed or 'none'})")
            return chosen[0]
        if tokens:
            if len(tokens) == 1 or TOKEN_IDS in tokens:
                self.embedding = tokens.get(TOKEN_IDS) or next(iter(tokens.values()))
                return self.embedding.output
            raise UnsupportedModel(
                f"{self.label}: {len(tokens)} token inputs ({listed}); choose the one to "
                "explain with input=NAME (--input NAME)")
        if not floats:
            names = ", ".join(f"'{t.name}' ({t.dtype})" for t in self.gs.inputs) or "none"
            raise UnsupportedModel(
                f"{self.label}: no floating-point model input and no token ids read by an "
                f"embedding lookup to explain (inputs: {names})"
            )
        if len(floats) > 1:
            raise UnsupportedModel(
                f"{self.label}: {len(floats)} floating-point inputs ({listed}); choose the one "
                "to explain with input=NAME (--input NAME)"
            )
        return floats[0]

    # -- structure -------------------------------------------------------------------------
    def _data_dependent(self) -> set[str]:
        data = {self.data_input.name}
        for node in self.gs.nodes:
            if is_kind(node.op, Kind.SHAPE):  # reads shapes only: carries no relevance
                continue
            if any(t.name in data for t in node.inputs):
                data.update(t.name for t in node.outputs)
        return data

    def _relevance_path(self) -> list[gs.Node]:
        needed = {self.logits.name}
        path: list[gs.Node] = []
        for node in reversed(self.gs.nodes):
            if is_kind(node.op, Kind.SHAPE) or not self.data_inputs(node):
                continue  # shape reads, and the embedding lookup that makes the data input
            if any(t.name in needed for t in node.outputs):
                path.append(node)
                needed.update(t.name for t in node.inputs if t.name in self.data)
        path.reverse()
        return path

    def _nonneg(self) -> set[str]:
        """Values provably ``>= 0``, from each op's sign fact (:class:`~lrp_onnx.emit.registry.
        Sign`) in topological order."""
        nonneg: set[str] = set()
        for node in self.nodes:
            spec = spec_of(node.op)
            if spec is None or spec.sign is Sign.UNKNOWN:
                continue
            if spec.sign is Sign.PRESERVES:
                ins = self.data_inputs(node)
                if not ins or not all(t.name in nonneg for t in ins):
                    continue
            if spec.sign_condition is None or spec.sign_condition(self, node):
                nonneg.update(t.name for t in node.outputs)
        return nonneg

    def constant_operands_nonneg(self, node: gs.Node) -> bool:
        """Every operand of ``node`` that is not data is a constant ``>= 0`` (a sign condition:
        ``Add(x, c)`` of a non-negative ``x`` stays non-negative when ``c >= 0``)."""
        consts = [self.const_value(t) for t in node.inputs if t.name and t.name not in self.data]
        return all(c is not None and bool(np.all(c >= 0)) for c in consts)

    def producer(self, t: gs.Tensor) -> gs.Node | None:
        """The node producing ``t`` (``None`` for inputs and initializers)."""
        return t.inputs[0] if t.inputs else None

    def consumers(self, t: gs.Tensor) -> list[gs.Node]:
        """Nodes reading ``t``."""
        return list(t.outputs)

    def is_graph_output(self, t: gs.Tensor) -> bool:
        return any(o.name == t.name for o in self.gs.outputs)

    def data_inputs(self, node: gs.Node) -> list[gs.Tensor]:
        """Inputs of ``node`` that depend on the data input (relevance flows into these)."""
        return [t for t in node.inputs if t.name and t.name in self.data]

    def is_nonneg(self, t: gs.Tensor) -> bool:
        """True when ``t`` is provably ``>= 0`` (after Relu, pooling of Relu, ...)."""
        return t.name in self.nonneg

    # -- values ----------------------------------------------------------------------------
    @staticmethod
    def is_const(t: gs.Tensor) -> bool:
        """Whether ``t`` is an initializer (without loading its value)."""
        return isinstance(t, gs.Constant)

    @staticmethod
    def const_value(t: gs.Tensor) -> np.ndarray | None:
        """The value of a constant tensor (initializer), or ``None`` for runtime values."""
        if isinstance(t, gs.Constant):
            return np.asarray(t.values)
        return None

    def constant(self, t: gs.Tensor) -> gs.Constant | None:
        """``t`` as a constant: the initializer itself, or, for a float value that nodes
        compute from initializers alone (a quantized weight's ``DequantizeLinear``; float
        chains were folded by :func:`lrp_onnx.frontend.constants.fold_constant_weights`), a float
        copy of its value as ONNX Runtime computes it, for the relevance pass (the forward nodes
        stay as they are); ``None`` for values that depend on the data."""
        if isinstance(t, gs.Constant):
            return t
        if not t.name or t.name in self.data:
            return None
        if t.name not in self._folded:
            from lrp_onnx.frontend import constants

            if self._constant_nodes is None:
                self._constant_nodes = constants.constant_nodes(self.proto.graph)
            nodes = constants.cone(self._constant_nodes, [t.name])
            value = constants.evaluate(self.proto, nodes, [t.name]) if nodes else None
            found = None if value is None else value[t.name]
            name = f"lrp/folded/{t.name}"
            while name in self.tensors:
                name += "_"
            self._folded[t.name] = gs.Constant(name, found) if found is not None and \
                constants.is_float(found) else None
        return self._folded[t.name]

    @staticmethod
    def optional_input(node: gs.Node, index: int) -> gs.Tensor | None:
        """Input ``index`` of ``node``, or ``None`` when it is absent (missing or empty name)."""
        if len(node.inputs) <= index or not node.inputs[index].name:
            return None
        return node.inputs[index]

    def const_ints(self, node: gs.Node, index: int, what: str) -> list[int] | None:
        """The integers of the optional input ``index`` (axes, pads, starts...); ``None`` when
        it is absent; ``UnsupportedAttribute`` naming the node when it is computed at run
        time."""
        t = self.optional_input(node, index)
        if t is None:
            return None
        value = self.const_value(t)
        if value is None:
            raise UnsupportedAttribute(f"node {node_label(node.name, node.op, self.opset)}: "
                                       f"{what} must be a constant")
        return [int(v) for v in np.ravel(value)]

    def optional_const(self, node: gs.Node, index: int) -> np.ndarray | None:
        """The value of the optional input ``index`` of ``node``; ``None`` when it is absent or
        not a constant."""
        t = self.optional_input(node, index)
        return None if t is None else self.const_value(t)

    def shape(self, t: gs.Tensor, node: gs.Node | None = None) -> list[int | None]:
        """Static shape of ``t``; dynamic dims are ``None``. Raises if the rank is unknown.

        Dims ONNX shape inference left unknown are filled from the run-time shape facts
        (``self.facts``) where those fix them."""
        if isinstance(t, gs.Constant):
            return list(t.shape)
        fact = self.facts.get(t.name)
        if t.shape is None:
            if fact is not None:
                return list(fact)
            where = f" at node {node_label(node.name, node.op)}" if node is not None else ""
            raise UnsupportedModel(
                f"{self.label}: shape of '{t.name}' is unknown{where}; shape inference could "
                f"not derive it{self._shape_inference_reason()}"
            )
        dims = [d if isinstance(d, int) and d >= 0 else None for d in t.shape]
        if fact is not None and len(fact) == len(dims):
            dims = [f if d is None else d for d, f in zip(dims, fact)]
        return dims

    def check_weights(self) -> None:
        """Weights have the rank their op requires (its ``weight_rank`` fact; a scalar or
        vector ``Constant`` as a Conv/Gemm weight is valid protobuf that no emitter can
        transpose)."""
        for node in self.gs.nodes:
            spec = spec_of(node.op)
            if spec is None or spec.weight_rank is None or len(node.inputs) < 2:
                continue
            w, x = node.inputs[1], node.inputs[0]
            if not isinstance(w, gs.Constant):
                continue
            want = spec.weight_rank if isinstance(spec.weight_rank, int) else \
                (len(x.shape) if x.shape else None)
            if want is not None and len(w.shape) != want:
                raise UnsupportedModel(
                    f"{self.label}: node {node_label(node.name, node.op)} has a weight of rank "
                    f"{len(w.shape)} (shape {list(w.shape)}); {node.op} needs rank {want}")

    def _shape_inference_reason(self) -> str:
        """The first error strict shape inference reports on the model (error path only)."""
        error = shape_inference_error(self.proto)
        return f" (first error: {error})" if error else ""

    def sample_shape(self, t: gs.Tensor, node: gs.Node) -> list[int]:
        """Shape of ``t`` without its batch dim; raises (one line, naming the node) when any of
        those dims is known only at run time: for emitters that need every size as a number."""
        dims = self.shape(t, node)
        rest = dims[1:]
        if any(d is None for d in rest):
            raise UnsupportedModel(
                f"{self.label}: value '{t.name}' at node {node_label(node.name, node.op)} has "
                f"dynamic non-batch dims {t.shape}, whose sizes this node needs before run time"
            )
        return [int(d) for d in rest]  # type: ignore[arg-type]

    def dtype(self, t: gs.Tensor) -> np.dtype[Any]:
        dt: np.dtype[Any] = np.dtype(t.dtype)
        return dt


def _is_head(op: str) -> bool:
    spec = spec_of(op)
    return spec is not None and spec.head


def _schema_default(op: str, name: str, opset: int, domain: str = "") -> Any:
    try:
        schema = onnx.defs.get_schema(op, opset, domain)
    except onnx.defs.SchemaError:
        return None
    attr = schema.attributes.get(name)
    if attr is None or not attr.default_value.name:
        return None
    return onnx.helper.get_attribute_value(attr.default_value)


def attr(node: gs.Node, name: str, opset: int, default: Any = None) -> Any:
    """Attribute ``name`` of ``node``, falling back to the schema default, then ``default``."""
    if name in node.attrs:
        value = node.attrs[name]
        return value.decode() if isinstance(value, bytes) else value
    value = _schema_default(node.op, name, opset)
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else value


def check_attrs(node: gs.Node, opset: int, allowed: dict[str, Iterable[Any] | None]) -> None:
    """Raise ``UnsupportedAttribute`` for attributes outside ``allowed``.

    ``allowed`` maps an attribute name to the values the emitter handles (``None``: any value).
    Attributes not listed at all are unsupported.
    """
    for key, value in node.attrs.items():
        if key not in allowed:
            raise UnsupportedAttribute(
                f"node {node_label(node.name, node.op, opset)}: attribute '{key}' is not supported"
            )
        values = allowed[key]
        if values is None:
            continue
        v = value.decode() if isinstance(value, bytes) else value
        if isinstance(v, (list, tuple)):
            v = tuple(v)
        if v not in tuple(values):
            raise UnsupportedAttribute(
                f"node {node_label(node.name, node.op, opset)}: {key}={v!r} is not supported "
                f"(supported: {', '.join(repr(x) for x in values)})"
            )


def ints(values: Sequence[int] | None) -> list[int]:
    return [int(v) for v in values] if values is not None else []
