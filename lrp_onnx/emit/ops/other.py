"""Ops the compiler knows facts about but sends no relevance through (no emitter).

They matter to the analyses: shape readers never carry relevance, output heads are stripped
before relevance starts, and the sign analysis knows which outputs are non-negative. A node of
one of these on the relevance path is refused with :class:`~lrp_onnx.errors.UnsupportedOp`
unless ``PassRule`` is forced onto it.
"""

from __future__ import annotations

from lrp_onnx.emit.registry import Kind, Sign, declare
from lrp_onnx.frontend.graph import Graph

declare("Shape", "Size", kind=Kind.SHAPE)
declare("LogSoftmax", kind=Kind.OUTPUT, head=True)
declare("Abs", "Exp", kind=Kind.ELEMENTWISE, sign=Sign.NONNEG)
declare("Max", kind=Kind.ELEMENTWISE, sign=Sign.PRESERVES,
        sign_condition=Graph.constant_operands_nonneg)
declare("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
        "Bernoulli", kind=Kind.ELEMENTWISE, random=True)
