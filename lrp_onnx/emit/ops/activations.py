"""Elementwise activations and the multi-node activation patterns (SiLU, Erf-GELU).

An activation directly after a linear layer is folded into that layer (the rule acts on the
pre-activation, as in RelevancePropagation.jl); a standalone one is a layer of its own. Either way
relevance passes it unchanged (Zennit's ``Pass``), so one emitter serves them all; what differs
per activation are its facts: sign, display name, whether it is a gate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from lrp_onnx.emit.builder import Builder
from lrp_onnx.emit.registry import Kind, Sign, Support, emitter
from lrp_onnx.frontend.graph import Graph
from lrp_onnx.frontend.layers import Layer, act_name
from lrp_onnx.rules.core import ROUTING_RULES, Rule


def _summary(graph: Graph, layer: Layer) -> str:
    return layer.act_name or act_name(graph, layer.primary) or layer.primary.op


def _clip_name(graph: Graph, node: gs.Node) -> str:
    lo, hi = graph.optional_const(node, 1), graph.optional_const(node, 2)
    if lo is not None and hi is not None and float(lo) == 0.0 and float(hi) == 6.0:
        return "relu6"
    return "clip"


def _clip_nonneg(graph: Graph, node: gs.Node) -> bool:
    """A Clip whose constant lower bound is ``>= 0``."""
    low = graph.optional_const(node, 1)
    return low is not None and float(np.min(low)) >= 0.0


_ACTIVATION: dict[str, Any] = {"kind": Kind.ACTIVATION, "rules": ROUTING_RULES,
                               "groups": ("ActivationLayer",), "summary": _summary}


@emitter("Relu", sign=Sign.NONNEG, support=Support.ROUTING, **_ACTIVATION)
@emitter("Sigmoid", "HardSigmoid", sign=Sign.NONNEG, gate=True, **_ACTIVATION)
@emitter("Softplus", sign=Sign.NONNEG, **_ACTIVATION)
@emitter("Clip", sign=Sign.NONNEG, sign_condition=_clip_nonneg, display=_clip_name,
         **_ACTIVATION)
@emitter("LeakyRelu", "PRelu", "Tanh", "HardSwish", "Gelu", "Elu", "Selu", "Celu", "Softsign",
         "Mish", "ThresholdedRelu", "Erf", "Pow", **_ACTIVATION)
@emitter("SiLU", **_ACTIVATION)  # Mul(x, Sigmoid(x)), matched by the layer view
def activation(b: Builder, layer: Layer, rule: Rule, r_out: gs.Tensor) -> list[gs.Tensor | None]:
    """``R = R'``: elementwise activations pass relevance unchanged (Zennit's Pass)."""
    return [r_out]
