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
from .rules import Rule

#: ``emit(b, layer, rule, r_out) -> one relevance (or None) per layer.inputs``.
Emitter = Callable[[Builder, Layer, Rule, gs.Tensor], Sequence["gs.Tensor | None"]]


@dataclass(frozen=True)
class OpEntry:
    """A registered emitter: the op it handles, the rules it accepts, its docstring."""

    op_type: str
    emit: Emitter
    rules: tuple[type[Rule], ...]

    @property
    def doc(self) -> str:
        return (self.emit.__doc__ or "").strip().splitlines()[0] if self.emit.__doc__ else ""


RELEVANCE: dict[str, OpEntry] = {}


def relevance(*op_types: str, rules: tuple[type[Rule], ...]) -> Callable[[Emitter], Emitter]:
    """Register ``fn`` as the emitter of ``op_types``, accepting ``rules``."""

    def register(fn: Emitter) -> Emitter:
        for op in op_types:
            if op in RELEVANCE:
                raise ValueError(f"relevance emitter for {op!r} registered twice")
            RELEVANCE[op] = OpEntry(op, fn, tuple(rules))
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


def unsupported(layers: Sequence[Layer], label: str, opset: int) -> None:
    """Raise one ``UnsupportedOp`` listing every layer whose op has no emitter."""
    _ensure_ops()
    missing = [la for la in layers if la.kind not in RELEVANCE]
    if not missing:
        return
    listed = ", ".join(node_label(la.name, la.kind) for la in missing)
    raise UnsupportedOp(
        f"{label}: {len(missing)} node(s) on the relevance path have no relevance rule "
        f"(opset {opset}): {listed}; supported ops: {', '.join(sorted(RELEVANCE))}"
    )


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
