"""The op registry: one :class:`OpSpec` per ONNX op type, holding every fact about the op.

An op's facts live with its registration, next to its emitter (JAX keeps a primitive's rules in
one block): the emitter and the rules it accepts, its :class:`Kind`, the composite layer groups
it belongs to, what is known about the sign of its output (:class:`Sign`), how the relevance it
sends back relates to its input's zeros (:class:`Support`), whether it conserves relevance
under a rule, and its printed summary. Every analysis (the graph's sign analysis, the layer view,
the nested structure, the composites' type groups, conservation checks, where relevance
vanishes) asks this registry; no other module keeps a list of op-type names.

Registration::

    @emitter("Concat", kind=Kind.RESHAPING, rules=ROUTING_RULES, support=Support.ROUTING)
    def concat(b, layer, rule, r_out): ...

    declare("Shape", "Size", kind=Kind.SHAPE)     # facts only: no relevance passes through

The table refuses duplicates. It is complete once :mod:`lrp_onnx.emit.ops` has been imported
(the compiler imports it); reading it earlier raises instead of answering from a partial table.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lrp_onnx.errors import RuleNotApplicable, UnsupportedOp, node_label
from lrp_onnx.frontend.load import STANDARD_DOMAINS
from lrp_onnx.rules.core import GradientRule, PassRule, Rule

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from lrp_onnx.emit.builder import Builder
    from lrp_onnx.frontend.graph import Graph
    from lrp_onnx.frontend.layers import Layer

#: ``emit(b, layer, rule, r_out) -> one relevance (or None) per layer.inputs``.
Emitter = Callable[["Builder", "Layer", Rule, Any], Sequence["gs.Tensor | None"]]


class Kind(enum.Enum):
    """What an op does, as the layer view and the docs group ops."""

    LINEAR = "linear"                #: an affine map with constant parameters (Conv, Gemm, BN)
    ACTIVATION = "activation"        #: an elementwise activation (folded into a linear layer)
    POOLING = "pooling"              #: max and average pools, means over axes
    RESHAPING = "reshaping"          #: moves values: reshapes, transposes, slices, concatenation
    MERGE = "merge"                  #: combines data values elementwise (Add, Sum, Mul)
    NORMALIZATION = "normalization"  #: normalizes by statistics of its input (LayerNorm)
    IDENTITY = "identity"            #: passes its input on (Identity, inference Dropout)
    SHAPE = "shape"                  #: reads only its input's shape: never carries relevance
    OUTPUT = "output"                #: a normalising output head (Softmax): explained through
    ELEMENTWISE = "elementwise"      #: other elementwise or reducing ops (no emitter)


class Sign(enum.Enum):
    """What is known about the sign of the op's output (the graph's sign analysis)."""

    UNKNOWN = "unknown"
    NONNEG = "nonneg"            #: ``>= 0`` whatever the input (under ``sign_condition``)
    PRESERVES = "preserves"      #: ``>= 0`` when every data input is (and ``sign_condition``)


class Support(enum.Enum):
    """Where the relevance an op sends to an input is zero (:mod:`.relevance_support`)."""

    NONE = "none"                  #: nothing known
    PROPORTIONAL = "proportional"  #: the z-rules send ``x * (...)``: zero where ``x`` is
    ROUTING = "routing"            #: relevance follows the values: a zero input feeds only zeros
    LINEAR = "linear"              #: decided by the linear rule's terms (they read x, x⁺, x⁻?)
    MAX_POOL = "max_pool"          #: ZeroRule routes to the winner, EpsilonRule multiplies by x


def conserves_default(layer: Layer, rule: Rule) -> bool:
    """Non-linear layers pass on all they receive (up to the stabilizer) under every rule but
    the gradient."""
    return not isinstance(rule, GradientRule)


@dataclass(frozen=True)
class OpSpec:
    """Every fact about one ONNX op type.

    Attributes:
        op_type: the ONNX op type (or a multi-node pattern's name: ``SiLU``).
        kind: what the op does.
        emit: the relevance emitter, or ``None`` for an op known only by its facts (relevance
            cannot pass it unless ``PassRule`` is forced onto a shape-preserving node).
        rules: the rule classes the emitter accepts.
        multi_output: the emitter receives one relevance (or None) per layer output.
        groups: the composite layer groups (``ConvLayer``, ...) the op belongs to.
        sign: the sign fact of its output.
        sign_condition: ``(graph, node) -> bool``, a further condition for ``sign`` (constant
            operands non-negative, a Clip's lower bound ``>= 0``).
        support: where the relevance it sends back is zero.
        conserves: ``(layer, rule) -> bool``: the rule passes on all relevance the layer gets.
        summary: ``(graph, layer) -> str``, the Flux-style one-line summary.
        absorbs: what a layer started by this op folds in: ``bias`` (a following Add of a
            constant), ``batchnorm``, ``activation``.
        display: an activation's display name (``relu``), or ``(graph, node) -> str``.
        gate: the output lies in [0, 1] (a ``Mul`` by it is a gate, not a product of data).
        merges: a node of it with several data inputs merges branches (nested structure).
        head: a trailing node of it is stripped before relevance starts (its input is
            explained).
        weight_rank: the rank input 1 (the weight) must have: an int, or ``"input"`` for the
            rank of input 0.
        product_kind: the layer kind of a node of this op whose operands are all activations
            (``MatMul`` -> ``BilinearMatMul``, a product of two activations, not a dense layer).
        reciprocal_kind: the layer kind of a node of this op whose first operand is not data
            and whose second is (``Div(1, x)``: a reciprocal of an activation, not a scaling).
        routes: the op only moves values (each output element is an input element or a
            constant) and its emitter only moves relevance back, so applied to ``g`` where the
            relevance is ``y * g`` it gives the ``g`` of each input (the gradient form).
        keeps_order: the output holds the input's elements in their order, only the shape
            differs (reshapes, identities): token ids may pass it on their way to the
            embedding lookup (:mod:`lrp_onnx.frontend.tokens`).
        random: its output is random (``RandomNormal``): never a constant, whatever its
            inputs (:mod:`lrp_onnx.frontend.constants`).
        quantizes: it converts between a quantized (integer) and a float form
            (``DequantizeLinear``): a weight computed through it is kept as deployed in the
            forward pass, not folded into a float initializer.
        reads_input: a layer of it that reads the model input hands the input on as the layers
            after it read it (a QDQ model's input quantization): those still count as first
            layers for the composites' first-layer rules.
    """

    op_type: str
    kind: Kind
    emit: Emitter | None = None
    rules: tuple[type[Rule], ...] = ()
    multi_output: bool = False
    groups: tuple[str, ...] = ()
    sign: Sign = Sign.UNKNOWN
    sign_condition: Callable[[Graph, gs.Node], bool] | None = None
    support: Support = Support.NONE
    conserves: Callable[[Layer, Rule], bool] = conserves_default
    summary: Callable[[Graph, Layer], str] | None = None
    absorbs: frozenset[str] = field(default_factory=frozenset)
    display: str | Callable[[Graph, gs.Node], str] | None = None
    gate: bool = False
    merges: bool = False
    head: bool = False
    weight_rank: int | str | None = None
    routes: bool = False
    product_kind: str | None = None
    reciprocal_kind: str | None = None
    keeps_order: bool = False
    reads_input: bool = False
    random: bool = False
    quantizes: bool = False

    @property
    def doc(self) -> str:
        """The first line of the emitter's docstring (its formula)."""
        if self.emit is None or not self.emit.__doc__:
            return ""
        return self.emit.__doc__.strip().splitlines()[0]


#: Every registered op type's spec. Filled by the modules of :mod:`lrp_onnx.emit.ops`.
OP_SPECS: dict[str, OpSpec] = {}
_sealed: list[bool] = [False]
_ABSORBABLE = frozenset({"bias", "batchnorm", "activation"})


def _register(spec: OpSpec) -> None:
    if spec.op_type in OP_SPECS:
        raise ValueError(f"op {spec.op_type!r} registered twice")
    if spec.groups and spec.emit is None:
        raise ValueError(f"op {spec.op_type!r}: only ops with an emitter join layer groups "
                         f"({', '.join(spec.groups)})")
    if spec.emit is not None and not spec.rules:
        raise ValueError(f"op {spec.op_type!r}: an emitter must name the rules it accepts")
    if not spec.absorbs <= _ABSORBABLE:
        raise ValueError(f"op {spec.op_type!r}: absorbs {sorted(spec.absorbs)}")
    OP_SPECS[spec.op_type] = spec


def emitter(*op_types: str, kind: Kind, rules: tuple[type[Rule], ...],
            **facts: Any) -> Callable[[Emitter], Emitter]:
    """Register the decorated function as the relevance emitter of ``op_types``, accepting
    ``rules``, with the op facts ``facts`` (the fields of :class:`OpSpec`)."""

    def register(fn: Emitter) -> Emitter:
        for op in op_types:
            _register(OpSpec(op, kind, emit=fn, rules=tuple(rules), **facts))
        return fn

    return register


def declare(*op_types: str, kind: Kind, **facts: Any) -> None:
    """Register facts about ``op_types`` that have no relevance emitter."""
    for op in op_types:
        _register(OpSpec(op, kind, **facts))


def seal() -> None:
    """Mark the table complete (called once by :mod:`lrp_onnx.emit.ops`)."""
    _sealed[0] = True


@contextmanager
def scratch() -> Iterator[None]:
    """Registrations made inside the block are undone when it ends (for examples and tests
    that add an op without changing the process-wide table)."""
    saved = dict(OP_SPECS)
    try:
        yield
    finally:
        OP_SPECS.clear()
        OP_SPECS.update(saved)


def _table() -> dict[str, OpSpec]:
    if not _sealed[0]:
        raise RuntimeError("the op registry is read before lrp_onnx.emit.ops filled it")
    return OP_SPECS


def spec_of(op_type: str) -> OpSpec | None:
    """The spec of ``op_type``, or ``None`` for an op the registry does not know."""
    return _table().get(op_type)


def specs() -> list[OpSpec]:
    """Every spec, sorted by op type."""
    return [s for _, s in sorted(_table().items())]


def has_emitter(op_type: str) -> bool:
    """Whether relevance can pass ``op_type`` (it has an emitter)."""
    spec = spec_of(op_type)
    return spec is not None and spec.emit is not None


def is_kind(op_type: str, kind: Kind) -> bool:
    """Whether ``op_type`` is registered with ``kind``."""
    spec = spec_of(op_type)
    return spec is not None and spec.kind is kind


def group_ops(group: str) -> frozenset[str]:
    """The op types (and pattern names) that belong to the composite layer group ``group``."""
    return frozenset(s.op_type for s in _table().values() if group in s.groups)


def group_names() -> list[str]:
    """Every layer group some op belongs to."""
    return sorted({g for s in _table().values() for g in s.groups})


def supported_ops() -> list[str]:
    """Every op type with a relevance emitter, sorted."""
    return sorted(op for op, s in _table().items() if s.emit is not None)


def lookup(layer: Layer) -> OpSpec:
    """The spec of ``layer.kind`` with its emitter; raises ``UnsupportedOp`` naming the node."""
    spec = spec_of(layer.kind)
    if spec is None or spec.emit is None:
        raise UnsupportedOp(
            f"no relevance rule for node {node_label(layer.name, layer.kind)}; "
            f"supported ops: {', '.join(supported_ops())}"
        )
    return spec


def _pass_through(b: Builder, layer: Layer, rule: Rule, r_out: Any) -> Sequence[gs.Tensor | None]:
    """PassRule forced onto an op without an emitter: relevance goes through unchanged."""
    return [r_out]


def _passable(layer: Layer, shape_of: Callable[[gs.Tensor], list[int | None]]) -> bool:
    if len(layer.inputs) != 1 or len(layer.outputs) != 1:
        return False
    return shape_of(layer.inputs[0]) == shape_of(layer.output)


def _foreign(layer: Layer) -> list[str]:
    """Domains outside the ONNX standard one among ``layer``'s nodes (no rule covers them)."""
    return [n.domain for n in layer.nodes if (n.domain or "") not in STANDARD_DOMAINS]


def resolve_entries(layers: Sequence[Layer], rules: Sequence[Rule], label: str, opset: int,
                    shape_of: Callable[[gs.Tensor], list[int | None]]) -> list[OpSpec]:
    """The spec of every layer, checked against its rule.

    A layer whose op has no emitter passes only under ``PassRule`` when it maps one input to an
    output of the same shape; all layers that cannot be handled are listed in one
    ``UnsupportedOp``, with the ``PassRule`` spelling that would force each through.
    """
    entries: list[OpSpec | None] = []
    missing: list[Layer] = []
    for layer, rule in zip(layers, rules, strict=True):
        if not _foreign(layer) and has_emitter(layer.kind):
            entries.append(None)
        elif not _foreign(layer) and isinstance(rule, PassRule) and _passable(layer, shape_of):
            entries.append(OpSpec(layer.kind, Kind.IDENTITY, emit=_pass_through,
                                  rules=(PassRule,)))
        else:
            missing.append(layer)
            entries.append(None)
    if missing:
        listed = ", ".join(node_label(la.name, la.kind) + "".join(
            f" from domain '{d}'" for d in dict.fromkeys(_foreign(la))) for la in missing)
        standard = [la for la in missing if not _foreign(la)]
        hint = ""
        if standard:
            kinds = ", ".join(dict.fromkeys(f"'{la.kind}': PassRule()" for la in standard))
            hint += (f"; where such a node only transforms values elementwise, PassRule forces "
                     f"relevance through it, e.g. Composite(<preset maps>, "
                     f"GlobalTypeMap({{{kinds}}})) or NameMap({standard[0].name!r}, PassRule())")
        if len(standard) < len(missing):
            hint += ("; nodes outside the ONNX standard domain run as they are only off the "
                     "relevance path: explain an output computed by standard ops (output=NAME, "
                     "--output-name NAME) or re-export these ops as standard ONNX ops")
        raise UnsupportedOp(
            f"{label}: {len(missing)} node(s) on the relevance path have no relevance rule "
            f"(opset {opset}): {listed}{hint}; supported ops: {', '.join(supported_ops())}"
        )
    return [e if e is not None else check_rule(la, r)
            for la, r, e in zip(layers, rules, entries)]


def check_rule(layer: Layer, rule: Rule) -> OpSpec:
    """The spec of ``layer`` after checking that its emitter accepts ``rule``."""
    spec = lookup(layer)
    if not isinstance(rule, Rule):
        raise RuleNotApplicable(
            f"layer {layer.index + 1} {node_label(layer.name, layer.kind)}: {rule!r} is not a "
            "rule (use e.g. EpsilonRule())"
        )
    if type(rule) not in spec.rules:
        fits = ", ".join(r.__name__ for r in spec.rules)
        raise RuleNotApplicable(
            f"{rule!r} cannot be applied to layer {layer.index + 1} {layer.summary} "
            f"(node {node_label(layer.name, layer.kind)}); rules that fit: {fits}"
        )
    return spec
