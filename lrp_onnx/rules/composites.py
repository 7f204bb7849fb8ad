"""Composites: rules assigned to layers by ordered primitives (RelevancePropagation.jl's API).

``Composite(*primitives)`` applies its primitives in order and **later ones overwrite earlier
ones**; a layer no primitive matches gets ``ZeroRule()``. Positions are 1-based, as on the seed
page: ``LayerMap(3, rule)`` is the third top-level entry, ``LayerMap((1, 5), rule)`` the fifth
layer of the first chain (see :func:`lrp_onnx.show_layer_indices`). Positional primitives match by
prefix, so ``LayerMap(2, rule)`` hits every layer nested under top-level entry 2.

"First layer" is every layer that reads the model input; "last layer" is the layer whose output is
explained (the logits). Type keys are ONNX op types (``"Conv"``, ``"Gemm"``, ``"MaxPool"``) or the
:class:`LayerGroup` s below (``DenseLayer`` = Gemm or MatMul, ...), also by name (``"Dense"``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import onnx_graphsurgeon as gs

from lrp_onnx.emit.registry import Kind, group_ops, has_emitter, spec_of
from lrp_onnx.frontend.layers import Layer
from lrp_onnx.rules.core import (
    Rule,
    ZeroRule,
)


class LayerGroup:
    """A named union of ONNX op types usable as a type key (like Flux's ``ConvLayer``).

    ``LayerGroup(name)`` is a group the op registry defines: its ops are those whose
    registration names the group (:func:`lrp_onnx.emit.registry.group_ops`), so an op joins a
    group where it is registered, and only ops with a relevance emitter can. ``LayerGroup(name,
    ops)`` is a user-defined group of explicit op types.
    """

    def __init__(self, name: str, ops: Iterable[str] | None = None) -> None:
        self.name = name
        self._ops = None if ops is None else frozenset(ops)

    @property
    def ops(self) -> frozenset[str]:
        """The op types in the group."""
        return group_ops(self.name) if self._ops is None else self._ops

    def __repr__(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerGroup) and (self.name, self._ops) == (other.name,
                                                                             other._ops)

    def __hash__(self) -> int:
        return hash((self.name, self._ops))


ConvLayer = LayerGroup("ConvLayer")
DenseLayer = LayerGroup("DenseLayer")
MaxPoolLayer = LayerGroup("MaxPoolLayer")
MeanPoolLayer = LayerGroup("MeanPoolLayer")
PoolingLayer = LayerGroup("PoolingLayer")
ReshapingLayer = LayerGroup("ReshapingLayer")
NormalizationLayer = LayerGroup("NormalizationLayer")
LayerNormLayer = LayerGroup("LayerNormLayer")
SoftmaxLayer = LayerGroup("SoftmaxLayer")
ProductLayer = LayerGroup("ProductLayer")
ActivationLayer = LayerGroup("ActivationLayer")
DropoutLayer = LayerGroup("DropoutLayer")

#: Group names accepted as string keys; ``"Dense"`` is the seed page's spelling.
GROUPS: dict[str, LayerGroup] = {
    g.name: g for g in (ConvLayer, DenseLayer, MaxPoolLayer, MeanPoolLayer, PoolingLayer,
                        ReshapingLayer, NormalizationLayer, ActivationLayer, DropoutLayer,
                        LayerNormLayer, SoftmaxLayer, ProductLayer)
}
GROUPS["Dense"] = DenseLayer

TypeKey = str | LayerGroup


def _matches(key: TypeKey, kind: str) -> bool:
    if isinstance(key, LayerGroup):
        return kind in key.ops
    if key in GROUPS:
        return kind in GROUPS[key].ops
    return key == kind


def _key_name(key: TypeKey) -> str:
    return key.name if isinstance(key, LayerGroup) else str(key)


@dataclass(frozen=True)
class LayerInfo:
    """What a primitive sees of a layer: the layer, its nested index, first/last flags."""

    layer: Layer
    index: tuple[int, ...]
    first: bool
    last: bool


def _positions(spec: Any) -> tuple[int, ...]:
    if isinstance(spec, range):
        return tuple(spec)
    if isinstance(spec, int):
        return (spec,)
    return tuple(int(i) for i in spec)


def _type_map(pairs: Mapping[Any, Any] | Iterable[tuple[Any, Any]]
              ) -> tuple[tuple[TypeKey, Rule], ...]:
    items = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
    for key, rule in items:
        if not isinstance(rule, Rule):
            raise TypeError(f"type map value for {key!r} must be a rule, not {rule!r}")
        if not isinstance(key, (str, LayerGroup)):
            raise TypeError(f"type map key must be an op type string or LayerGroup, not {key!r}")
    return tuple(items)


def _lookup(pairs: tuple[tuple[TypeKey, Rule], ...], kind: str) -> Rule | None:
    for key, rule in pairs:
        if _matches(key, kind):
            return rule
    return None


class Primitive:
    """Base of composite primitives: ``rule_for(info)`` returns a rule or ``None``."""

    comment: str = ""

    def rule_for(self, info: LayerInfo) -> Rule | None:
        raise NotImplementedError

    def _head(self) -> str:
        return type(self).__name__

    def lines(self) -> list[str]:
        """The printed form, one entry per line (as RelevancePropagation.jl shows it)."""
        return [f"{self._head()}  # {self.comment}" if self.comment else self._head()]


class _RulePrimitive(Primitive):
    rule: Rule

    def lines(self) -> list[str]:
        text = f"{self._head()}({self.rule!r})"
        return [f"{text}  # {self.comment}" if self.comment else text]


class _TypeMapPrimitive(Primitive):
    pairs: tuple[tuple[TypeKey, Rule], ...]

    def lines(self) -> list[str]:
        head = f"{self._head()}(" + (f"  # {self.comment}" if self.comment else "")
        body = [f"  {_key_name(k)} => {r!r}," for k, r in self.pairs]
        return [head, *body, ")"]


@dataclass(frozen=True, repr=False)
class GlobalMap(_RulePrimitive):
    """Apply ``rule`` to every layer."""

    rule: Rule
    comment = "all layers"

    def rule_for(self, info: LayerInfo) -> Rule | None:
        return self.rule


@dataclass(frozen=True, repr=False)
class LayerMap(_RulePrimitive):
    """Apply ``rule`` to the layer at ``index`` (int or nested tuple, 1-based, prefix match)."""

    index: int | tuple[int, ...]
    rule: Rule

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", self.index if isinstance(self.index, int)
                           else tuple(int(i) for i in self.index))

    def lines(self) -> list[str]:
        return [f"LayerMap({self.index!r}, {self.rule!r})"]

    def rule_for(self, info: LayerInfo) -> Rule | None:
        want = (self.index,) if isinstance(self.index, int) else tuple(self.index)
        return self.rule if info.index[:len(want)] == want else None


@dataclass(frozen=True, repr=False)
class RangeMap(_RulePrimitive):
    """Apply ``rule`` to top-level ``positions`` (``range(4, 11)`` is Julia's ``4:10``)."""

    positions: Any
    rule: Rule

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", _positions(self.positions))

    def lines(self) -> list[str]:
        return [f"RangeMap({_fmt_positions(self.positions)}, {self.rule!r})"]

    def rule_for(self, info: LayerInfo) -> Rule | None:
        return self.rule if info.index[0] in self.positions else None


@dataclass(frozen=True, repr=False)
class FirstLayerMap(_RulePrimitive):
    """Apply ``rule`` to the first layer(s): those reading the model input (directly or
    through layers that only move its values)."""

    rule: Rule
    comment = "first layer"

    def rule_for(self, info: LayerInfo) -> Rule | None:
        return self.rule if info.first else None


@dataclass(frozen=True, repr=False)
class LastLayerMap(_RulePrimitive):
    """Apply ``rule`` to the last layer: the one producing the explained output."""

    rule: Rule
    comment = "last layer"

    def rule_for(self, info: LayerInfo) -> Rule | None:
        return self.rule if info.last else None


@dataclass(frozen=True, repr=False)
class NameMap(_RulePrimitive):
    """Apply ``rule`` to layers with a node whose ONNX name matches the glob ``pattern``."""

    pattern: str
    rule: Rule

    def lines(self) -> list[str]:
        return [f"NameMap({self.pattern!r}, {self.rule!r})"]

    def rule_for(self, info: LayerInfo) -> Rule | None:
        names = info.layer.node_names
        return self.rule if any(fnmatch.fnmatchcase(n, self.pattern) for n in names) else None


class GlobalTypeMap(_TypeMapPrimitive):
    """Apply a ``{type: rule}`` map to all layers (first matching key wins)."""

    comment = "all layers"

    def __init__(self, pairs: Mapping[Any, Any] | Iterable[tuple[Any, Any]]) -> None:
        self.pairs = _type_map(pairs)

    def rule_for(self, info: LayerInfo) -> Rule | None:
        return _lookup(self.pairs, info.layer.kind)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash((type(self), tuple(self.lines())))


class RangeTypeMap(GlobalTypeMap):
    """A type map on top-level ``positions``."""

    def __init__(self, positions: Any,
                 pairs: Mapping[Any, Any] | Iterable[tuple[Any, Any]]) -> None:
        super().__init__(pairs)
        self.positions = _positions(positions)

    @property
    def comment(self) -> str:  # type: ignore[override]
        return f"layers {_fmt_positions(self.positions)}"

    def rule_for(self, info: LayerInfo) -> Rule | None:
        return _lookup(self.pairs, info.layer.kind) if info.index[0] in self.positions else None


class FirstLayerTypeMap(GlobalTypeMap):
    """A type map on the first layer(s)."""

    comment = "first layer"

    def rule_for(self, info: LayerInfo) -> Rule | None:
        return _lookup(self.pairs, info.layer.kind) if info.first else None


class LastLayerTypeMap(GlobalTypeMap):
    """A type map on the last layer."""

    comment = "last layer"

    def rule_for(self, info: LayerInfo) -> Rule | None:
        return _lookup(self.pairs, info.layer.kind) if info.last else None


class FirstNTypeMap(GlobalTypeMap):
    """A type map on the first ``n`` top-level positions."""

    def __init__(self, n: int,
                 pairs: Mapping[Any, Any] | Iterable[tuple[Any, Any]]) -> None:
        super().__init__(pairs)
        self.n = int(n)

    @property
    def comment(self) -> str:  # type: ignore[override]
        return f"first {self.n} layers"

    def rule_for(self, info: LayerInfo) -> Rule | None:
        return _lookup(self.pairs, info.layer.kind) if info.index[0] <= self.n else None


def _moves(node: Any) -> bool:
    """A node that only moves, scales or shifts values between a projection and attention
    scores: a routing op, or an elementwise merge with one non-constant input (the ``1/√d``
    scale, a bias)."""
    spec = spec_of(str(node.op))
    if spec is None:
        return False
    return spec.routes or (spec.kind is Kind.MERGE and
                           sum(not isinstance(t, gs.Constant) for t in node.inputs) == 1)


def _product_of_activations(node: Any) -> bool:
    spec = spec_of(str(node.op))
    return spec is not None and spec.product_kind is not None and \
        has_emitter(spec.product_kind) and len(node.inputs) > 1 and \
        not any(isinstance(t, gs.Constant) for t in node.inputs)


def attention_projection(layer: Layer) -> bool:
    """Whether ``layer`` feeds a product of two activations (the q/k/v projections) or reads
    one (the output projection), through reshapes, transposes, gathers and constant scales."""
    seen: set[str] = set()
    todo = [(n, True) for n in layer.output.outputs]
    todo += [(p, False) for t in layer.inputs for p in t.inputs]
    while todo:
        node, forward = todo.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        if _product_of_activations(node):
            return True
        if not _moves(node):
            continue
        if forward:
            todo += [(c, True) for out in node.outputs for c in out.outputs]
        else:
            todo += [(p, False) for t in node.inputs if not isinstance(t, gs.Constant)
                     for p in t.inputs]
    return False


class OutsideAttentionTypeMap(GlobalTypeMap):
    """A type map on the layers that are not attention projections (see
    :func:`attention_projection`): the patch embedding, MLP and head linears of a ViT, where
    LXT's Gamma variant applies zennit's rules (torchvision's attention projections are not
    called as modules, so zennit never reaches them)."""

    comment = "layers outside attention"

    def rule_for(self, info: LayerInfo) -> Rule | None:
        rule = _lookup(self.pairs, info.layer.kind)
        return rule if rule is not None and not attention_projection(info.layer) else None


def _fmt_positions(positions: tuple[int, ...]) -> str:
    if positions and positions == tuple(range(positions[0], positions[-1] + 1)):
        return f"{positions[0]}:{positions[-1]}"
    return repr(positions)


class Composite:
    """Ordered composite primitives; later primitives overwrite earlier ones, default ZeroRule.

    ``Composite(rule, *primitives)`` is ``Composite(GlobalMap(rule), *primitives)``.
    """

    def __init__(self, *primitives: Primitive | Rule) -> None:
        prims: list[Primitive] = []
        for p in primitives:
            if isinstance(p, Rule):
                prims.append(GlobalMap(p))
            elif isinstance(p, Primitive):
                prims.append(p)
            else:
                raise TypeError(f"Composite takes primitives or rules, not {p!r}")
        self.primitives: tuple[Primitive, ...] = tuple(prims)

    def rule_for(self, info: LayerInfo) -> Rule:
        """The rule of the last primitive that matches ``info`` (``ZeroRule()`` if none)."""
        for prim in reversed(self.primitives):
            rule = prim.rule_for(info)
            if rule is not None:
                return rule
        return ZeroRule()

    def __repr__(self) -> str:
        lines = ["Composite("]
        for prim in self.primitives:
            body = prim.lines()
            text, sep, comment = body[-1].partition("  # ")
            body[-1] = f"{text},{sep}{comment}"
            lines += ["  " + line for line in body]
        lines.append(")")
        return "\n".join(lines)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Composite) and repr(other) == repr(self)

    def __hash__(self) -> int:
        return hash(repr(self))


def _input_values(layers: Sequence[Layer], data_input: str) -> set[str]:
    """The data input and the values that hand it on unchanged in substance: outputs of layers
    that only move its elements (an exporter's layout ``Transpose``, a ``Reshape``: ops whose
    spec ``routes``) or that quantize it (spec ``reads_input``), in topological order."""
    names = {data_input}
    for la in layers:
        spec = spec_of(la.kind)
        if spec is not None and (spec.routes or spec.reads_input) and la.inputs and \
                all(t.name in names for t in la.inputs):
            names.update(t.name for t in la.outputs)
    return names


def layer_infos(layers: Sequence[Layer], indices: Mapping[int, tuple[int, ...]],
                data_input: str, logits: str) -> list[LayerInfo]:
    """Pair each layer with its nested index and first/last flags (first: reads the model
    input, directly or through layers that only move or quantize its values, such as
    tf2onnx's NHWC to NCHW ``Transpose`` or a QDQ model's input quantization)."""
    inputs = _input_values(layers, data_input)
    return [LayerInfo(layer=la, index=indices[la.index],
                      first=any(t.name in inputs for t in la.inputs),
                      last=la.output.name == logits) for la in layers]
