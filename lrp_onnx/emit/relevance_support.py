"""Where relevance provably vanishes, and the cheaper stabilizer that follows from it.

A value ``t`` *carries relevance only where it is non-zero* when the relevance arriving at ``t``
is exactly zero at every position where ``t`` is zero. That holds when every layer reading ``t``
sends it relevance of the form ``t * (...)`` (every linear-type rule whose terms read ``x``,
``x⁺`` or ``x⁻``; the z-rule on sums, products and average pools), or routes relevance the way it
routes values (reshapes, concatenation, ReLU, a max pool under ZeroRule) into values that carry
relevance only where they are non-zero themselves. Flat, WSquare and ZBox (terms reading ``1`` or
a bound), the gradient and the seed at the explained logit break it.

The use: a denominator ``z`` whose only reader is a ReLU with output ``y = relu(z)`` that carries
relevance only where it is non-zero receives ``R = 0`` wherever ``z <= 0``. Its stabilized
quotient ``R / (z + eps * sign(z))`` is then exactly ``R / (y + eps)``: where ``z > 0`` the two
denominators are the same float (``y = z``), where ``z <= 0`` the numerator is zero and any
non-zero denominator gives 0. ``y + eps`` is one ``Add`` on a value the forward pass computes
anyway, instead of the sign-aware ``z + (Cast(z >= 0) * 2eps - eps)``, and the pre-activation ``z``
is no longer read by the relevance pass (ONNX Runtime can fuse the ReLU into its Conv).
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_graphsurgeon as gs

from lrp_onnx.emit.registry import Support, spec_of
from lrp_onnx.frontend.graph import Graph
from lrp_onnx.frontend.layers import Layer
from lrp_onnx.rules.core import EpsilonRule, LinearRule, Rule, Sel, ZeroRule

_INPUT_TERMS = frozenset({Sel.X, Sel.POS, Sel.NEG})


def _zero_where_input_zero(layer: Layer, rule: Rule, carrying: set[str]) -> bool:
    """Whether the relevance ``layer`` sends to each input is zero where that input is zero
    (from the op's :class:`~lrp_onnx.emit.registry.Support` fact)."""
    z_rule = isinstance(rule, (ZeroRule, EpsilonRule))
    outputs = layer.outputs or (layer.output,)
    spec = spec_of(layer.kind)
    support = spec.support if spec is not None else Support.NONE
    if support is Support.LINEAR:
        return isinstance(rule, LinearRule) and rule.multiply_input and all(
            t.x in _INPUT_TERMS for g in rule.groups() for t in g.terms)
    if support is Support.PROPORTIONAL:
        return z_rule
    if support is Support.MAX_POOL:  # ZeroRule routes to the winner, EpsilonRule multiplies by x
        return isinstance(rule, EpsilonRule) or (
            isinstance(rule, ZeroRule) and all(o.name in carrying for o in outputs))
    if support is Support.ROUTING:
        return all(o.name in carrying for o in outputs)
    return False


def carrying_only_where_nonzero(graph: Graph, layers: Sequence[Layer],
                                rules: Sequence[Rule]) -> set[str]:
    """Names of the layer outputs that carry relevance only where they are non-zero."""
    readers: dict[str, list[tuple[Layer, Rule]]] = {}
    for layer, rule in zip(layers, rules):
        for t in layer.inputs:
            readers.setdefault(t.name, []).append((layer, rule))
    carrying: set[str] = set()
    for layer in reversed(layers):  # readers come after their producers
        for out in layer.outputs or (layer.output,):
            if out.name == graph.logits.name or graph.is_graph_output(out):
                continue  # the seed is not zero where the logit is
            if all(_zero_where_input_zero(la, r, carrying) for la, r in readers.get(out.name, [])):
                carrying.add(out.name)
    return carrying


def relu_covers(graph: Graph, layers: Sequence[Layer],
                rules: Sequence[Rule]) -> dict[str, gs.Tensor]:
    """``{z: relu(z)}`` for every pre-activation ``z`` whose relevance is zero where ``z <= 0``:
    ``z`` is read only by a ReLU (folded into its layer, or a layer of its own) whose output
    carries relevance only where it is non-zero. Must run before anything is emitted (it reads
    the readers of values)."""
    carrying = carrying_only_where_nonzero(graph, layers, rules)
    covers: dict[str, gs.Tensor] = {}
    for layer in layers:
        act = layer.activation
        if layer.output.name not in carrying:
            continue
        if layer.kind == "Relu":  # a ReLU layer of its own: z is its producer's output
            z = layer.inputs[0]
            readers = graph.consumers(z)
            if len(readers) == 1 and readers[0] is layer.primary and \
                    not graph.is_graph_output(z) and z.name != graph.logits.name:
                covers[z.name] = layer.output
        elif act is not None and act.op == "Relu" and act.inputs[0] is layer.pre_activation:
            covers[layer.pre_activation.name] = layer.output  # a ReLU folded into its layer
    return covers
