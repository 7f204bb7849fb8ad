"""The user-facing API: ``LRP(model, rules_or_composite)``, ``compile``, ``Explanation``."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import onnx

from lrp_onnx.emit.compiler import compile_layers
from lrp_onnx.emit.contract import PER_LAYER_PREFIX, class_axis
from lrp_onnx.emit.optimizations import Optimizations
from lrp_onnx.errors import (
    LRPError,
    RuleAssignmentError,
    RuntimeFailure,
    UnsupportedModel,
)
from lrp_onnx.frontend.graph import Graph
from lrp_onnx.frontend.layers import Layer, build_layers
from lrp_onnx.frontend.load import default_opset, load_model, one_line
from lrp_onnx.frontend.passes import run_passes, upgrade_note
from lrp_onnx.frontend.structure import (
    ChainTuple,
    Container,
    _RuleTuple,
    build_tree,
    nested_indices,
    zip_rules,
)
from lrp_onnx.io import save_model
from lrp_onnx.rules.composites import Composite, layer_infos
from lrp_onnx.rules.core import Rule, ZeroRule
from lrp_onnx.runtime import Explanation, ort_errors, run_compiled


@dataclass
class Prepared:
    """A loaded, canonicalised model with its layer view (single use: compiling consumes it)."""

    label: str
    graph: Graph
    layers: list[Layer]
    tree: Container
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


def prepare(model: Any, output: str | None = None, opset: int | None = None,
            input: str | None = None) -> Prepared:
    """Load, canonicalise and build the layer view of ``model`` (a path, a ``ModelProto`` or a
    :class:`FlatModel`, whose layers form one flat chain); ``opset`` converts it first;
    ``input`` names the float input to explain (needed where there are several)."""
    flat = isinstance(model, FlatModel)
    if flat:
        model = model.source
    info: dict[str, Any] = {}
    proto, label = load_model(model, info)
    upgraded, note = upgrade_note(default_opset(proto), proto.ir_version)
    with labelled(label):
        proto = run_passes(proto, label, opset=opset)
        meta = _meta_only(proto)
        graph = Graph(proto, label, output, input)
        graph.upgraded_from = upgraded
        if note:  # the command line prints it on stderr; the API stays silent
            logging.getLogger("lrp_onnx").info("%s: %s", label, note)
        del proto
        try:
            graph.check_weights()
            layers = build_layers(graph)
        except LRPError:
            # the layer view could not be built: where ops of other domains are on the path,
            # they are why (they have no rule, and often no inferred shape): name them
            graph.check_domains()
            raise
        tree = Container("chain", list(layers)) if flat else build_tree(layers)
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


def flatten_model(model: Any, *, input: str | None = None) -> FlatModel:
    """The model's layers as one flat chain (RelevancePropagation.jl's ``flatten_model``).

    ``LRP``, ``lrp_rules`` and ``show_layer_indices`` accept the result; positions then count
    along the flat chain. ``input``: the explained input, as for :class:`LRP` (pass it to
    ``LRP`` too).
    """
    prep = prepare(model, input=input)
    return FlatModel(model.source if isinstance(model, FlatModel) else model, prep.layers)


def show_layer_indices(model: Any, *, input: str | None = None) -> _RuleTuple:
    """The nested index of every layer, in the model's structure (``ChainTuple((1, 1), ...)``);
    ``input``: the explained input, as for :class:`LRP`."""
    prep = prepare(model, input=input)
    return prep.tree.map(lambda layer: prep.indices[layer.index])


def lrp_rules(model: Any, composite: Composite, *, input: str | None = None) -> _RuleTuple:
    """The rule ``composite`` assigns to each layer, in the model's structure, without compiling;
    ``input``: the explained input, as for :class:`LRP`."""
    prep = prepare(model, input=input)
    rules = assign_rules(prep, composite)
    return prep.tree.map(lambda layer: rules[layer.index])


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
            It is about the one-hot ``target`` seed: with ``output_relevance=True`` the given
            seed is used as it is, and ``False`` is refused.
        output: name of the graph output to explain (default: the first).
        output_relevance: seed with an explicit tensor instead of the one-hot ``target``: the
            compiled model takes a float input ``output_relevance`` shaped like the explained
            output (its dtype, dynamic dims kept) and has no ``target`` input. Any output rank
            (a region of a segmentation map, +1/-1 for a contrastive explanation). Where a
            trailing Softmax/LogSoftmax is stripped, the seed is applied at its input (the
            logits, same shape).
        input: name of the graph input to explain: a float input, or token ids (an integer
            input read by an embedding lookup, explained at the lookup's output); required
            when the model has several candidates (the others stay inputs of the compiled
            model and receive no relevance). Without it, token ids are chosen over float
            inputs (a float attention mask is never explained).
        embedding_relevance: for token ids, also output ``relevance_embedding`` ``[N, T, D]``
            (``relevance`` is its sum over the hidden axis, one value per token).
        optimizations: :class:`Optimizations` (all on by default; they never change the
            relevance, only how it is computed).
        per_layer: also output the relevance each layer sends to its inputs
            (``relevance_in_<i>``, see :attr:`per_layer_outputs`).
        opset: convert the model to this default-domain opset (16 or newer) before compiling;
            ``None`` keeps the model's (models below 16 are upgraded to 17 with
            ``onnx.version_converter``; see :attr:`upgraded_from_opset`).

    Attributes:
        model: the compiled ``onnx.ModelProto`` (inputs + ``target`` or ``output_relevance``,
            outputs + ``relevance``).
        input_name, output_name: the explained input and output.
        upgraded_from_opset: the opset a model below opset 13 was read at before it was
            upgraded to 17 (also in the compiled model's record, ``upgraded_from_opset``; the
            command line says so on stderr); ``None`` otherwise.
        layers: the layer view; ``rules``: the rule of each layer.
        per_layer_outputs: ``(output name, 1-based layer index, layer summary)`` of each
            per-layer relevance output (empty unless ``per_layer``).
    """

    def __init__(self, model: str | os.PathLike[str] | onnx.ModelProto,
                 rules_or_composite: Any = None, flatten: bool = True, *,
                 normalize_output_relevance: bool = True, output: str | None = None,
                 optimizations: Optimizations | None = None, per_layer: bool = False,
                 opset: int | None = None, output_relevance: bool = False,
                 input: str | None = None, embedding_relevance: bool = False,
                 _audit: bool = False) -> None:
        if isinstance(model, FlatModel):
            flatten = True
        prep = prepare(model, output, opset, input)
        self.label = prep.label
        self.output_relevance = output_relevance
        with labelled(prep.label):
            try:
                self._build(prep, rules_or_composite, flatten, normalize_output_relevance,
                            optimizations, per_layer, _audit, embedding_relevance)
            except MemoryError:
                raise UnsupportedModel(
                    f"{prep.label}: out of memory while compiling (shapes: input "
                    f"{prep.graph.fed_input.shape})") from None

    def _build(self, prep: Prepared, rules_or_composite: Any, flatten: bool,
               normalize_output_relevance: bool, optimizations: Optimizations | None,
               per_layer: bool, _audit: bool, embedding_relevance: bool = False) -> None:
        self.rules: list[Rule] = assign_rules(prep, rules_or_composite, flatten)
        self.flatten = flatten
        self.tree = prep.tree
        self.layers: list[Layer] = prep.layers
        self.indices = prep.indices
        self.input_name = prep.graph.fed_input.name
        self.upgraded_from_opset: int | None = prep.graph.upgraded_from.get("upgraded_from_opset")
        self.output_name = prep.graph.explained.name
        shape = prep.graph.shape(prep.graph.logits)
        self.num_classes = int(shape[class_axis(shape)] or 0)
        #: The source file kept its weights as external data (so does ``save``).
        self.external_data = prep.external_data
        self.model: onnx.ModelProto = compile_layers(
            prep.graph, prep.layers, self.rules,
            normalize_output_relevance=normalize_output_relevance, model_meta=prep.meta,
            optimizations=optimizations, per_layer=per_layer, audit=_audit,
            output_relevance=self.output_relevance, embedding_relevance=embedding_relevance)
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
        from lrp_onnx.runtime import make_session

        if self._session is None or self._device != device:
            try:
                self._session = make_session(self.model, device=device)
            except ort_errors() as exc:
                raise RuntimeFailure(f"{self.label}: ONNX Runtime cannot load the compiled "
                                     f"model: {one_line(str(exc))}") from None
            self._device = device
        return self._session

    def analyze(self, x: np.ndarray, target: int | Sequence[int] | np.ndarray | None = None, *,
                output_relevance: np.ndarray | None = None,
                inputs: dict[str, np.ndarray] | None = None,
                position: int | Sequence[int] | np.ndarray | None = None,
                device: str = "auto") -> Explanation:
        """Explain ``x`` (with batch dimension; token ids for a text model) for ``target``
        (None / -1: the top class), or, for a model compiled with ``output_relevance=True``,
        for the seed ``output_relevance`` (shaped like the explained output; ``target`` is
        then refused). ``inputs``: the values of the model's other inputs by name (an
        attention mask). ``position``: for a sequence output ``[N, T, V]``, the position
        explained per sample (None / -1: the last)."""
        session = self.session(device)
        with labelled(self.label):
            return run_compiled(session, x, target, self.input_name, self.output_name,
                                self.num_classes, output_relevance=output_relevance,
                                inputs=inputs, position=position)


def compile(model: str | os.PathLike[str] | onnx.ModelProto,  # noqa: A001 (API name)
            rules_or_composite: Any = None, *, flatten: bool = True,
            normalize_output_relevance: bool = True, output: str | None = None,
            optimizations: Optimizations | None = None, per_layer: bool = False,
            opset: int | None = None, output_relevance: bool = False,
            input: str | None = None, embedding_relevance: bool = False) -> onnx.ModelProto:
    """Compile ``model``; returns the compiled ``ModelProto`` (arguments as :class:`LRP`)."""
    return LRP(model, rules_or_composite, flatten,
               normalize_output_relevance=normalize_output_relevance, output=output,
               optimizations=optimizations, per_layer=per_layer, opset=opset,
               output_relevance=output_relevance, input=input,
               embedding_relevance=embedding_relevance).model
