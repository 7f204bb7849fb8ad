"""One relevance emitter per ONNX op type, in one table.

Registration happens next to the emitter with ``@relevance("Conv", rules=LINEAR_RULES)``; the
table refuses duplicates. ``lookup`` names the node, the op, the opset and the supported ops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from .builder import Builder
from .errors import RuleNotApplicable, UnsupportedOp, node_label
from .layers import Layer
from .rules import PassRule, Rule

#: ``emit(b, layer, rule, r_out) -> one relevance (or None) per layer.inputs``.
Emitter = Callable[[Builder, Layer, Rule, gs.Tensor], Sequence["gs.Tensor | None"]]


@dataclass(frozen=True)
class OpEntry:
    """A registered emitter: the op it handles, the rules it accepts, its docstring."""

    op_type: str
    emit: Emitter
    rules: tuple[type[Rule], ...]
    #: the emitter receives one relevance (or None) per layer output (``Split``)
    multi_output: bool = False

    @property
    def doc(self) -> str:
        return (self.emit.__doc__ or "").strip().splitlines()[0] if self.emit.__doc__ else ""


RELEVANCE: dict[str, OpEntry] = {}


def relevance(*op_types: str, rules: tuple[type[Rule], ...],
              multi_output: bool = False) -> Callable[[Emitter], Emitter]:
    """Register ``fn`` as the emitter of ``op_types``, accepting ``rules``."""

    def register(fn: Emitter) -> Emitter:
        for op in op_types:
            if op in RELEVANCE:
                raise ValueError(f"relevance emitter for {op!r} registered twice")
            RELEVANCE[op] = OpEntry(op, fn, tuple(rules), multi_output)
        return fn

    return register


def supported_ops() -> list[str]:
    """Every op type with an emitter, sorted."""
    _ensure_ops()
    return sorted(RELEVANCE)


def _ensure_ops() -> None:
    from . import ops  # noqa: F401  (the import fills RELEVANCE)


def lookup(layer: Layer) -> OpEntry:
    """The entry for ``layer.kind``; raises ``UnsupportedOp`` naming the layer's node."""
    _ensure_ops()
    entry = RELEVANCE.get(layer.kind)
    if entry is None:
        raise UnsupportedOp(
            f"no relevance rule for node {node_label(layer.name, layer.kind)}; "
            f"supported ops: {', '.join(sorted(RELEVANCE))}"
        )
    return entry


def _pass_through(b: Builder, layer: Layer, rule: Rule,
                  r_out: gs.Tensor) -> Sequence[gs.Tensor | None]:
    """PassRule forced onto an op without an emitter: relevance goes through unchanged."""
    return [r_out]


def _passable(layer: Layer, shape_of: Callable[[gs.Tensor], list[int | None]]) -> bool:
    if len(layer.inputs) != 1 or len(layer.outputs) != 1:
        return False
    return shape_of(layer.inputs[0]) == shape_of(layer.output)


def resolve_entries(layers: Sequence[Layer], rules: Sequence[Rule], label: str, opset: int,
                    shape_of: Callable[[gs.Tensor], list[int | None]]) -> list[OpEntry]:
    """The emitter entry of every layer, checked against its rule.

    A layer whose op has no emitter passes only under ``PassRule`` when it maps one input to an
    output of the same shape; all layers that cannot be handled are listed in one
    ``UnsupportedOp``, with the ``PassRule`` spelling that would force each through.
    """
    _ensure_ops()
    entries: list[OpEntry | None] = []
    missing: list[Layer] = []
    for layer, rule in zip(layers, rules, strict=True):
        if layer.kind in RELEVANCE:
            entries.append(None)
        elif isinstance(rule, PassRule) and _passable(layer, shape_of):
            entries.append(OpEntry(layer.kind, _pass_through, (PassRule,)))
        else:
            missing.append(layer)
            entries.append(None)
    if missing:
        listed = ", ".join(node_label(la.name, la.kind) for la in missing)
        kinds = ", ".join(dict.fromkeys(f"'{la.kind}': PassRule()" for la in missing))
        first = missing[0].name
        raise UnsupportedOp(
            f"{label}: {len(missing)} node(s) on the relevance path have no relevance rule "
            f"(opset {opset}): {listed}; where such a node only transforms values elementwise, "
            f"PassRule forces relevance through it, e.g. Composite(<preset maps>, "
            f"GlobalTypeMap({{{kinds}}})) or NameMap({first!r}, PassRule()); "
            f"supported ops: {', '.join(sorted(RELEVANCE))}"
        )
    return [e if e is not None else check_rule(la, r)
            for la, r, e in zip(layers, rules, entries)]


def check_rule(layer: Layer, rule: Rule) -> OpEntry:
    """The entry for ``layer`` after checking that it accepts ``rule``."""
    entry = lookup(layer)
    if not isinstance(rule, Rule):
        raise RuleNotApplicable(
            f"layer {layer.index + 1} {node_label(layer.name, layer.kind)}: {rule!r} is not a "
            "rule (use e.g. EpsilonRule())"
        )
    if type(rule) not in entry.rules:
        fits = ", ".join(r.__name__ for r in entry.rules)
        raise RuleNotApplicable(
            f"{rule!r} cannot be applied to layer {layer.index + 1} {layer.summary} "
            f"(node {node_label(layer.name, layer.kind)}); rules that fit: {fits}"
        )
    return entry
