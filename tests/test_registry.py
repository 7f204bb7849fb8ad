"""The op registry as the one source of op facts: the drift it replaced stays fixed.

Before the registry, op facts lived in seven tables that disagreed: the composites' groups named
ops without emitters (a preset's ``NormalizationLayer => PassRule`` let a LayerNormalization
through as if it were supported), and the conservation check called a standalone
BatchNormalization conserving under EpsilonRule although its shift absorbs relevance.
"""

from __future__ import annotations

import numpy as np
import pytest

from lrp_onnx import (
    LRP,
    ConvLayer,
    EpsilonPlusFlat,
    EpsilonRule,
    GlobalTypeMap,
    LayerGroup,
    MaxPoolLayer,
    NormalizationLayer,
    PassRule,
    UnsupportedOp,
    ZeroRule,
)
from lrp_onnx.api import prepare
from lrp_onnx.check import conserving
from lrp_onnx.emit import registry
from lrp_onnx.testing.references import Net


def _layer_norm_model(rng: np.random.Generator, op: str = "LayerNormalization"):
    net = Net(rng, (6,))
    z = net.node("MatMul", [net.x, net.param("lut/W", (6, 6))], "lut/matmul")
    if op == "LayerNormalization":
        ln = net.node(op, [z, net.param("lut/scale", (6,)), net.param("lut/bias", (6,))],
                      "lut/ln", axis=-1)
    else:
        ln = net.node(op, [z], "lut/ln")
    net.head(ln)
    return net.model()


def test_presets_refuse_an_op_without_an_emitter(rng: np.random.Generator) -> None:
    """NormalizationLayer => PassRule in the presets does not cover LayerNormalization, which
    gets its own rule (the LN rule under ZeroRule/EpsilonRule); an op without an emitter is
    refused unless PassRule is forced onto it."""
    assert "LayerNormalization" not in NormalizationLayer.ops
    assert NormalizationLayer.ops == {"BatchNormalization", "LRN"}  # LRN: pass-through
    lrp = LRP(_layer_norm_model(rng), EpsilonPlusFlat())
    assert [r for la, r in zip(lrp.layers, lrp.rules) if la.kind == "LayerNormalization"] \
        == [ZeroRule()]
    with pytest.raises(UnsupportedOp, match="'lut/ln' \\(Exp\\)"):
        LRP(_layer_norm_model(rng, "Exp"), EpsilonPlusFlat())
    # Forced through explicitly, it passes (the user's choice, written in the composite).
    forced = EpsilonPlusFlat()
    forced.primitives += (GlobalTypeMap({"Exp": PassRule()}),)
    LRP(_layer_norm_model(rng, "Exp"), forced)


def test_groups_come_from_the_registry() -> None:
    assert ConvLayer.ops == {"Conv"}  # ConvTranspose has no emitter (facts only)
    assert MaxPoolLayer.ops == {"MaxPool", "GlobalMaxPool"}  # ReduceMax has none either
    for group in registry.group_names():
        assert all(registry.has_emitter(op) for op in LayerGroup(group).ops), group
    custom = LayerGroup("Mine", {"Conv", "Gemm"})
    assert custom.ops == {"Conv", "Gemm"} and custom != LayerGroup("Mine")


def _standalone_bn(rng: np.random.Generator, shift: bool):
    """``BN(x) = a x + c`` with ``c = beta - mean * a``: non-zero, or exactly zero (mean and
    beta zero)."""
    net = Net(rng, (3, 4, 4))
    gamma = net.param("lut/gamma", (3,), positive=True)
    var = net.param("lut/var", (3,), positive=True)
    mean = net.param("lut/mean", (3,)) if shift else net.const("lut/mean", np.zeros(3))
    beta = net.param("lut/beta", (3,)) if shift else net.const("lut/beta", np.zeros(3))
    net.head(net.node("BatchNormalization", [net.x, gamma, beta, mean, var], "lut/bn"))
    return net.model()


@pytest.mark.parametrize("shift", [True, False])
def test_standalone_batchnorm_conserves_only_without_a_shift(rng: np.random.Generator,
                                                             shift: bool) -> None:
    layers = prepare(_standalone_bn(rng, shift)).layers
    bn = next(la for la in layers if la.kind == "BatchNormalization")
    assert conserving(bn, PassRule())
    assert conserving(bn, ZeroRule()) is not shift
    assert conserving(bn, EpsilonRule()) is not shift


def test_facts_are_read_from_the_spec() -> None:
    relu, softmax, shape = (registry.spec_of(op) for op in ("Relu", "Softmax", "Shape"))
    assert relu.sign is registry.Sign.NONNEG and relu.support is registry.Support.ROUTING
    assert softmax.head and softmax.gate and softmax.emit is not None  # heads, and attention
    assert shape.kind is registry.Kind.SHAPE
    assert registry.spec_of("NoSuchOp") is None
