"""The user-facing API: ``LRP(model, rules_or_composite)``, ``compile``, ``Explanation``."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx

from .canonize import run_passes
from .compiler import PER_LAYER_PREFIX, RELEVANCE, TARGET, compile_layers
from .composites import Composite, layer_infos
from .errors import (
    InvalidInput,
    LRPError,
    RuleAssignmentError,
    RuntimeFailure,
    UnsupportedModel,
)
from .graph import Graph
from .layers import Layer, build_layers
from .load import load_model, one_line
from .options import Optimizations
from .rules import Rule, ZeroRule
from .runtime import ort_errors
from .tree import ChainTuple, Node, _RuleTuple, build_tree, nested_indices, zip_rules


@dataclass
class Prepared:
    """A loaded, canonicalised model with its layer view (single use: compiling consumes it)."""

    label: str
    graph: Graph
    layers: list[Layer]
    tree: Node
    indices: dict[int, tuple[int, ...]]
    meta: onnx.ModelProto
    external_data: bool = False

    def infos(self) -> list[Any]:
        return layer_infos(self.layers, self.indices, self.graph.data_input.name,
                           self.graph.logits.name)


def _meta_only(model: onnx.ModelProto) -> onnx.ModelProto:
    meta = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version",
                  "doc_string"):
        setattr(meta, field, getattr(model, field))
    meta.opset_import.extend(model.opset_import)
    meta.metadata_props.extend(model.metadata_props)
    return meta


def prepare(model: Any, output: str | None = None, opset: int | None = None) -> Prepared:
    """Load, canonicalise and build the layer view of ``model`` (a path, a ``ModelProto`` or a
    :class:`FlatModel`, whose layers form one flat chain); ``opset`` converts it first."""
    flat = isinstance(model, FlatModel)
    if flat:
        model = model.source
    info: dict[str, Any] = {}
    proto, label = load_model(model, info)
    with labelled(label):
        proto = run_passes(proto, label, opset=opset)
        meta = _meta_only(proto)
        graph = Graph(proto, label, output)
        graph.check_weights()
        del proto
        layers = build_layers(graph)
        tree = Node("chain", list(layers)) if flat else build_tree(layers)
    return Prepared(label, graph, layers, tree, nested_indices(tree), meta,
                    bool(info.get("external_data")))


@contextlib.contextmanager
def labelled(label: str) -> Iterator[None]:
    """Re-raise an :class:`LRPError` whose message does not name the model with its label
    first (every message names the file)."""
    try:
        yield
    except LRPError as exc:
        text = str(exc)
        if text.startswith(f"{label}: ") or text.startswith(f"{label} "):
            raise
        raise type(exc)(f"{label}: {text}") from None


def assign_rules(prep: Prepared, rules: Any, flatten: bool = True) -> list[Rule]:
    """One rule per layer from ``None`` (ZeroRule), a ``Composite``, a flat list of rules or a
    nested ``ChainTuple`` matching :func:`show_layer_indices` (with ``flatten=False``)."""
    n = len(prep.layers)
    if rules is None:
        return [ZeroRule()] * n
    if isinstance(rules, Composite):
        return [rules.rule_for(info) for info in prep.infos()]
    if isinstance(rules, Rule):
        raise RuleAssignmentError(
            f"got a single rule {rules!r}; pass a list with one rule per layer or "
            f"Composite({rules!r}) to apply it everywhere"
        )
    if isinstance(rules, _RuleTuple) and not flatten:
        try:
            pairs = zip_rules(prep.tree, rules)
        except (TypeError, ValueError) as exc:
            raise RuleAssignmentError(f"{prep.label}: rules do not match the model's structure "
                                      f"{exc}; see show_layer_indices(model)") from None
        by_index = {layer.index: rule for layer, rule in pairs}
        flat = [by_index[i] for i in range(n)]
    elif isinstance(rules, Sequence) and not isinstance(rules, str):
        flat = list(rules.leaves()) if isinstance(rules, _RuleTuple) else list(rules)
        if len(flat) != n:
            raise RuleAssignmentError(
                f"{prep.label}: expected {n} rules (one per layer of the flattened model), "
                f"got {len(flat)}; see show_layer_indices(model)"
            )
    else:
        raise RuleAssignmentError(f"rules must be None, a Composite or a list of rules, not "
                                  f"{type(rules).__name__}")
    for i, r in enumerate(flat):
        if not isinstance(r, Rule):
            raise RuleAssignmentError(f"rule {i + 1} is {r!r}, not a rule")
    return flat


class FlatModel(ChainTuple):
    """The flattened layer list of a model (``flatten_model``); ``LRP`` accepts it as a model."""

    source: Any

    def __new__(cls, source: Any, layers: Sequence[Layer]) -> FlatModel:
        obj = cast(FlatModel, super().__new__(cls, *layers))
        obj.source = source
        return obj

    def __getnewargs__(self) -> tuple[Any, ...]:
        return (self.source, tuple(self))

    def lines(self, item: Any = None) -> list[str]:
        return ["Chain(", *super().lines(item)[1:]]


def flatten_model(model: Any) -> FlatModel:
    """The model's layers as one flat chain (RelevancePropagation.jl's ``flatten_model``).

    ``LRP``, ``lrp_rules`` and ``show_layer_indices`` accept the result; positions then count
    along the flat chain.
    """
    prep = prepare(model)
    return FlatModel(model.source if isinstance(model, FlatModel) else model, prep.layers)


def show_layer_indices(model: Any) -> _RuleTuple:
    """The nested index of every layer, in the model's structure (``ChainTuple((1, 1), ...)``)."""
    prep = prepare(model)
    return prep.tree.map(lambda layer: prep.indices[layer.index])


def lrp_rules(model: Any, composite: Composite) -> _RuleTuple:
    """The rule ``composite`` assigns to each layer, in the model's structure, without compiling."""
    prep = prepare(model)
    rules = assign_rules(prep, composite)
    return prep.tree.map(lambda layer: rules[layer.index])


@dataclass
class Explanation:
    """Result of :meth:`LRP.analyze`.

    Attributes:
        relevance: input relevance, same shape and dtype as the input.
        output: the explained model output (e.g. logits or probabilities).
        target: the class explained for each sample (argmax where ``-1`` was asked).
        provider: the ONNX Runtime execution provider that ran the model.
    """

    relevance: np.ndarray
    output: np.ndarray
    target: np.ndarray
    provider: str


#: Bytes per element of the float tensors written raw by :func:`write_model`.
_RAW_ITEMSIZE = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.DOUBLE: 8,
                 onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _shell(msg: Any, skip: str) -> Any:
    """A copy of ``msg`` without its field ``skip`` (the other fields are small)."""
    shell = type(msg)()
    for fd, value in msg.ListFields():
        if fd.name == skip:
            continue
        if fd.is_repeated:
            getattr(shell, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(shell, fd.name).CopyFrom(value)
        else:
            setattr(shell, fd.name, value)
    return shell


#: Above this many bytes of weights a compiled model is saved with external data
#: (protobuf cannot parse a file over 2 GiB).
EXTERNAL_DATA_ABOVE = 2**31 - 2**26
#: Initializers at least this large go to the external data file.
EXTERNAL_MIN_BYTES = 1024


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the float initializers stored raw (from their shapes: no data is copied)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_type in _RAW_ITEMSIZE:
            total += int(np.prod(t.dims, dtype=np.int64)) * _RAW_ITEMSIZE[t.data_type]
    return total


def write_model(model: onnx.ModelProto, fh: Any, external: tuple[Any, str] | None = None) -> None:
    """Serialize ``model`` to the binary file ``fh`` one initializer at a time.

    The bytes are exactly those of a protobuf serialization with the graph's initializers last
    (field order is free in the wire format), but no serialized copy of the whole model is
    ever held in memory: saving VGG16 peaks at the model plus its largest tensor.

    ``external=(data_fh, location)`` writes every raw float initializer of at least
    ``EXTERNAL_MIN_BYTES`` to ``data_fh`` instead (ONNX external data, ``location`` relative to
    the model's folder); ``model`` itself is not modified.
    """
    graph_no, init_no = (onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number,
                         onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number)
    graph = model.graph
    graph_shell = _shell(graph, "initializer")
    raw_key = _varint(onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number << 3 | 2)
    # (shell, raw length) of each initializer whose weight bytes are written as they are; the
    # raw length comes from the shape (checked against the data when the model was loaded):
    # ``ByteSize()`` and ``raw_data`` each copy the tensor.
    parts: list[tuple[Any, int]] = []
    sizes = []
    offset = 0
    for t in graph.initializer:
        if t.HasField("raw_data") and t.data_type in _RAW_ITEMSIZE:
            shell = _shell(t, "raw_data")
            n_raw = int(np.prod(t.dims, dtype=np.int64)) * _RAW_ITEMSIZE[t.data_type]
            if external is not None and n_raw >= EXTERNAL_MIN_BYTES:
                shell.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", external[1]), ("offset", str(offset)),
                                   ("length", str(n_raw))):
                    entry = shell.external_data.add()
                    entry.key, entry.value = key, value
                offset += n_raw
                parts.append((shell, -n_raw))  # negative: the bytes go to the data file
                sizes.append(shell.ByteSize())
                continue
            parts.append((shell, n_raw))
            sizes.append(shell.ByteSize() + len(raw_key) + len(_varint(n_raw)) + n_raw)
        else:
            parts.append((None, 0))
            sizes.append(t.ByteSize())
    init_key = _varint(init_no << 3 | 2)
    total = graph_shell.ByteSize() + sum(len(init_key) + len(_varint(n)) + n for n in sizes)
    fh.write(_shell(model, "graph").SerializeToString())
    fh.write(_varint(graph_no << 3 | 2) + _varint(total))
    fh.write(graph_shell.SerializeToString())
    for t, n, (shell, n_raw) in zip(graph.initializer, sizes, parts):
        fh.write(init_key + _varint(n))
        if shell is None:
            fh.write(t.SerializeToString())
            continue
        raw = t.raw_data
        if len(raw) != abs(n_raw):
            raise ValueError(f"initializer '{t.name}' holds {len(raw)} bytes, its shape needs "
                             f"{abs(n_raw)}")
        fh.write(shell.SerializeToString())
        if n_raw < 0 and external is not None:
            external[0].write(raw)
        else:
            fh.write(raw_key + _varint(n_raw))
            fh.write(raw)
        del raw


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str],
               external_data: bool | None = None) -> None:
    """Write ``model`` atomically: temporary files in the same folder, then renames.

    ``external_data``: ``True`` writes the weights to ``<name>.data`` beside the model (ONNX
    external data), ``False`` into the one file, ``None`` (default) external when the weights
    exceed ``EXTERNAL_DATA_ABOVE`` (a protobuf file cannot exceed 2 GiB).
    """
    dest = Path(path)
    folder = dest.parent if str(dest.parent) else Path(".")
    if external_data is None:
        external_data = weight_bytes(model) > EXTERNAL_DATA_ABOVE
    temps: list[str] = []
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
        temps.append(tmp)
        data_dest = dest.with_name(dest.name + ".data")
        with os.fdopen(fd, "wb") as fh:
            if external_data:
                dfd, dtmp = tempfile.mkstemp(prefix=f".{data_dest.name}.", suffix=".tmp",
                                             dir=folder)
                temps.append(dtmp)
                with os.fdopen(dfd, "wb") as dfh:
                    write_model(model, fh, (dfh, data_dest.name))
            else:
                write_model(model, fh)
        if external_data:
            os.replace(temps[1], data_dest)
        os.replace(tmp, dest)
    except BaseException:
        for t in temps:
            Path(t).unlink(missing_ok=True)
        raise


class LRP:
    """An LRP analyzer compiled into an ONNX model (RelevancePropagation.jl's ``LRP``).

    Args:
        model: path to an ``.onnx`` file or an ``onnx.ModelProto`` (never modified).
        rules_or_composite: ``None`` (ZeroRule everywhere), a :class:`Composite`, a list with one
            rule per layer of the flattened model, or a nested ``ChainTuple`` of rules matching
            :func:`show_layer_indices` (with ``flatten=False``).
        flatten: ``True``: the analyzer (and a rule list) is the flat layer list; ``False``: it
            keeps the model's nesting (printing, nested rules).
        normalize_output_relevance: seed relevance 1 at the target (True, the default as in
            RelevancePropagation.jl and Zennit's usual use) or the target's logit (False).
        output: name of the graph output to explain (default: the first).
        optimizations: :class:`Optimizations` (all on by default; they never change the
            relevance, only how it is computed).
        per_layer: also output the relevance each layer sends to its inputs
            (``relevance_in_<i>``, see :attr:`per_layer_outputs`).
        opset: convert the model to this default-domain opset (16 or newer) before compiling;
            ``None`` keeps the model's (models below 16 are upgraded to 17).

    Attributes:
        model: the compiled ``onnx.ModelProto`` (inputs + ``target``, outputs + ``relevance``).
        layers: the layer view; ``rules``: the rule of each layer.
        per_layer_outputs: ``(output name, 1-based layer index, layer summary)`` of each
            per-layer relevance output (empty unless ``per_layer``).
    """

    def __init__(self, model: str | os.PathLike[str] | onnx.ModelProto,
                 rules_or_composite: Any = None, flatten: bool = True, *,
                 normalize_output_relevance: bool = True, output: str | None = None,
                 optimizations: Optimizations | None = None, per_layer: bool = False,
                 opset: int | None = None, _audit: bool = False) -> None:
        if isinstance(model, FlatModel):
            flatten = True
        prep = prepare(model, output, opset)
        self.label = prep.label
        with labelled(prep.label):
            try:
                self._build(prep, rules_or_composite, flatten, normalize_output_relevance,
                            optimizations, per_layer, _audit)
            except MemoryError:
                raise UnsupportedModel(
                    f"{prep.label}: out of memory while compiling (shapes: input "
                    f"{prep.graph.data_input.shape})") from None

    def _build(self, prep: Prepared, rules_or_composite: Any, flatten: bool,
               normalize_output_relevance: bool, optimizations: Optimizations | None,
               per_layer: bool, _audit: bool) -> None:
        self.rules: list[Rule] = assign_rules(prep, rules_or_composite, flatten)
        self.flatten = flatten
        self.tree = prep.tree
        self.layers: list[Layer] = prep.layers
        self.indices = prep.indices
        self.input_name = prep.graph.data_input.name
        self.output_name = prep.graph.explained.name
        self.num_classes = int(prep.graph.shape(prep.graph.logits)[-1] or 0)
        #: The source file kept its weights as external data (so does ``save``).
        self.external_data = prep.external_data
        self.model: onnx.ModelProto = compile_layers(
            prep.graph, prep.layers, self.rules,
            normalize_output_relevance=normalize_output_relevance, model_meta=prep.meta,
            optimizations=optimizations, per_layer=per_layer, audit=_audit)
        by_index = {la.index + 1: la.summary for la in self.layers}
        self.per_layer_outputs: list[tuple[str, int, str]] = []
        for o in self.model.graph.output:
            if o.name.startswith(PER_LAYER_PREFIX) and (per_layer or _audit):
                index = int(o.name[len(PER_LAYER_PREFIX):].split("_")[0])
                self.per_layer_outputs.append((o.name, index, by_index[index]))
        self._session: Any = None
        self._device: str | None = None

    def __repr__(self) -> str:
        lines = ["LRP("]
        if self.flatten:
            lines += [f"  {la.summary} => {r!r}," for la, r in zip(self.layers, self.rules)]
        else:
            nested = self.tree.map(lambda la: la).lines(
                lambda la: f"{la.summary} => {self.rules[la.index]!r}")
            lines += nested[1:-1]
        lines.append(")")
        return "\n".join(lines)

    def save(self, path: str | os.PathLike[str], external_data: bool | None = None) -> None:
        """Write the compiled model to ``path`` (atomically). ``external_data``: ``None``
        (default) keeps the weights external (``<name>.data`` beside the model) when the source
        model had them external or when they exceed 2 GiB; ``True``/``False`` force it."""
        if external_data is None and self.external_data:
            external_data = True
        save_model(self.model, path, external_data)

    def session(self, device: str = "auto") -> Any:
        """The cached ONNX Runtime session for ``device`` (``"auto"``, ``"cuda"``, ``"cpu"``)."""
        from .runtime import make_session

        if self._session is None or self._device != device:
            try:
                self._session = make_session(self.model, device=device)
            except ort_errors() as exc:
                raise RuntimeFailure(f"{self.label}: ONNX Runtime cannot load the compiled "
                                     f"model: {one_line(str(exc))}") from None
            self._device = device
        return self._session

    def analyze(self, x: np.ndarray, target: int | Sequence[int] | np.ndarray | None = None, *,
                device: str = "auto") -> Explanation:
        """Explain ``x`` (with batch dimension) for ``target`` (None / -1: the top class)."""
        session = self.session(device)
        with labelled(self.label):
            return run_compiled(session, x, target, self.input_name, self.output_name,
                                self.num_classes)


def run_compiled(session: Any, x: np.ndarray, target: Any, input_name: str, output_name: str,
                 num_classes: int) -> Explanation:
    """Run a compiled model's session on ``x`` and ``target``; validates the target."""
    x = np.asarray(x)
    n = x.shape[0] if x.ndim else 0
    if target is None:
        t = np.full((n,), -1, dtype=np.int64)
    else:
        t = np.asarray(target, dtype=np.int64)
        if t.ndim == 0:
            t = np.full((n,), int(t), dtype=np.int64)
    if t.shape != (n,):
        raise UnsupportedModel(f"target has shape {t.shape}; expected ({n},) for a batch of {n}")
    bad = (t < -1) | (t >= num_classes)
    if bad.any():
        raise UnsupportedModel(f"target {int(t[bad][0])} is outside [-1, {num_classes - 1}]")
    _check_input(session, input_name, x)
    # IO binding: the input is read from this numpy buffer where it is (CPU EP) or copied to
    # the GPU once (CUDA EP); outputs are written into CPU buffers ORT allocates, once.
    binding = session.io_binding()
    binding.bind_cpu_input(input_name, np.ascontiguousarray(x))
    binding.bind_cpu_input(TARGET, t)
    binding.bind_output(output_name)
    binding.bind_output(RELEVANCE)
    failures: tuple[type[BaseException], ...] = (RuntimeError, *ort_errors())
    import onnxruntime as ort

    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failed run is raised as one line, not also logged
    try:
        session.run_with_iobinding(binding, quiet)
    except failures as exc:  # IO binding raises a plain RuntimeError
        raise RuntimeFailure(f"ONNX Runtime failed to run the model: {one_line(str(exc))}") \
            from None
    out, rel = binding.copy_outputs_to_cpu()
    logits_like = np.asarray(out)
    chosen = np.where(t < 0, logits_like.reshape(n, -1).argmax(axis=1), t)
    return Explanation(relevance=rel, output=out, target=chosen.astype(np.int64),
                       provider=session.get_providers()[0])


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
              "tensor(float16)": np.float16}


def _check_input(session: Any, input_name: str, x: np.ndarray) -> None:
    """A one-line :class:`InvalidInput` where ONNX Runtime would fail deep in its run."""
    spec = next((i for i in session.get_inputs() if i.name == input_name), None)
    if spec is None:
        return
    want = _ORT_TYPES.get(spec.type)
    if want is not None and x.dtype != want:
        raise InvalidInput(f"input '{input_name}' must be {np.dtype(want).name}, got "
                           f"{x.dtype.name} (convert with x.astype(np.{np.dtype(want).name}))")
    shape = list(spec.shape)
    if x.ndim != len(shape) or any(isinstance(d, int) and d != a for d, a in zip(shape, x.shape)):
        dims = ["N" if not isinstance(d, int) else d for d in shape]
        raise InvalidInput(f"input '{input_name}' has shape {list(x.shape)}; the model takes "
                           f"{dims}")


def compile(model: str | os.PathLike[str] | onnx.ModelProto,  # noqa: A001 (API name)
            rules_or_composite: Any = None, *, flatten: bool = True,
            normalize_output_relevance: bool = True, output: str | None = None,
            optimizations: Optimizations | None = None, per_layer: bool = False,
            opset: int | None = None) -> onnx.ModelProto:
    """Compile ``model``; returns the compiled ``ModelProto`` (arguments as :class:`LRP`)."""
    return LRP(model, rules_or_composite, flatten,
               normalize_output_relevance=normalize_output_relevance, output=output,
               optimizations=optimizations, per_layer=per_layer, opset=opset).model
