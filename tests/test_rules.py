"""Rule invariants: parameter checks, repr/hash/equality, well-formed ``groups()`` that encode the
documented formulas, ZPlus == AlphaBeta(1, 0), and the error for a rule that does not fit."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import lrp_onnx
from conftest import ort_session
from lrp_onnx import (
    LRP,
    AlphaBetaRule,
    Composite,
    EpsilonRule,
    FlatRule,
    GammaRule,
    GeneralizedGammaRule,
    NameMap,
    PassRule,
    RuleNotApplicable,
    WSquareRule,
    ZBoxRule,
    ZeroRule,
    ZPlusRule,
)
from lrp_onnx.rules.core import Group, LinearRule, Mod, Sel, Term
from lrp_onnx.testing import references as lt
from lrp_onnx.testing.references import Net

LINEAR_RULE_NAMES = ["ZeroRule", "EpsilonRule", "GammaRule", "GeneralizedGammaRule", "ZPlusRule",
                     "AlphaBetaRule", "WSquareRule", "FlatRule", "ZBoxRule"]

# (rule, its repr): defaults are shown only for the rule's headline parameters.
REPRS = [
    (ZeroRule(), "ZeroRule()"),
    (ZeroRule(zero_bias=True), "ZeroRule(zero_bias=True)"),
    (EpsilonRule(), "EpsilonRule(epsilon=1e-06)"),
    (EpsilonRule(epsilon=0.1, zero_bias=True), "EpsilonRule(epsilon=0.1, zero_bias=True)"),
    (GammaRule(), "GammaRule(gamma=0.25)"),
    (GammaRule(gamma=0.5, stabilizer=1e-3), "GammaRule(gamma=0.5, stabilizer=0.001)"),
    (GeneralizedGammaRule(), "GeneralizedGammaRule(gamma=0.25)"),
    (ZPlusRule(), "ZPlusRule()"),
    (ZPlusRule(zero_bias=True), "ZPlusRule(zero_bias=True)"),
    (AlphaBetaRule(), "AlphaBetaRule(alpha=2.0, beta=1.0)"),
    (AlphaBetaRule(1, 0), "AlphaBetaRule(alpha=1.0, beta=0.0)"),
    (WSquareRule(), "WSquareRule()"),
    (WSquareRule(zero_bias=True), "WSquareRule(zero_bias=True)"),
    (FlatRule(), "FlatRule()"),
    (FlatRule(stabilizer=0.5), "FlatRule(stabilizer=0.5)"),
    (ZBoxRule(-3, 3), "ZBoxRule(low=-3.0, high=3.0)"),
    (ZBoxRule(np.zeros((3, 1, 1)), 1.0), "ZBoxRule(low=array(shape=(3, 1, 1)), high=1.0)"),
    (PassRule(), "PassRule()"),
]

LINEAR_RULES = [
    ZeroRule(), ZeroRule(zero_bias=True), EpsilonRule(epsilon=0.1),
    EpsilonRule(epsilon=0.1, zero_bias=True), GammaRule(), GammaRule(gamma=1.0, zero_bias=True),
    GeneralizedGammaRule(), GeneralizedGammaRule(gamma=0.5, zero_bias=True), ZPlusRule(),
    ZPlusRule(zero_bias=True), AlphaBetaRule(), AlphaBetaRule(1.0, 0.0),
    AlphaBetaRule(1.5, 0.5, zero_bias=True), WSquareRule(), WSquareRule(zero_bias=True),
    FlatRule(), ZBoxRule(-3.0, 3.0), ZBoxRule(-3.0, 3.0, zero_bias=True),
]


# -- parameters, repr, equality -----------------------------------------------------------------
@pytest.mark.parametrize("alpha, beta", [(1, 1), (3, 1), (2, 0), (-1, -2), (0.5, -0.5),
                                         (0, -1), (2.0, 1.0 + 1e-9)])
def test_alpha_beta_rejects_bad_parameters(alpha: float, beta: float) -> None:
    with pytest.raises(ValueError, match="AlphaBetaRule"):
        AlphaBetaRule(alpha, beta)


@pytest.mark.parametrize("alpha, beta", [(2, 1), (1, 0), (1.5, 0.5), (3.0, 2.0)])
def test_alpha_beta_accepts(alpha: float, beta: float) -> None:
    rule = AlphaBetaRule(alpha, beta)
    assert [g.coeff for g in rule.groups()] == [alpha, -beta]


@pytest.mark.parametrize("rule, text", REPRS, ids=[t for _, t in REPRS])
def test_repr(rule: lrp_onnx.Rule, text: str) -> None:
    assert repr(rule) == text
    assert str(rule) == text


@pytest.mark.parametrize("rule", [r for r, t in REPRS if "array" not in t], ids=repr)
def test_repr_evaluates_back(rule: lrp_onnx.Rule) -> None:
    """A scalar rule's repr is Python that rebuilds an equal rule."""
    assert eval(repr(rule), vars(lrp_onnx)) == rule  # noqa: S307 (our own repr)


def test_equality_and_hash() -> None:
    assert EpsilonRule(epsilon=0.1) == EpsilonRule(epsilon=0.1)
    assert hash(EpsilonRule(epsilon=0.1)) == hash(EpsilonRule(epsilon=0.1))
    assert EpsilonRule(epsilon=0.1) != EpsilonRule(epsilon=0.2)
    assert EpsilonRule() != EpsilonRule(zero_bias=True)
    # Same field values, different rule: never equal.
    assert ZeroRule() != EpsilonRule(epsilon=1e-6)
    assert ZPlusRule() != AlphaBetaRule(1.0, 0.0)
    assert ZBoxRule(-3, 3) == ZBoxRule(-3.0, 3.0)
    assert AlphaBetaRule(2, 1) == AlphaBetaRule(2.0, 1.0)
    assert hash(AlphaBetaRule(2, 1)) == hash(AlphaBetaRule(2.0, 1.0))
    assert ZBoxRule(np.array([0.0, 1.0]), 2) == ZBoxRule([0, 1], 2.0)
    table = {GammaRule(): "a", GammaRule(gamma=0.5): "b", ZBoxRule(-1, 1): "c"}
    assert table[GammaRule(gamma=0.25)] == "a"
    assert table[ZBoxRule(-1.0, 1.0)] == "c"
    assert len({ZeroRule(), ZeroRule(), PassRule(), PassRule()}) == 2


def test_rules_are_frozen() -> None:
    rule = EpsilonRule()
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.epsilon = 0.5  # type: ignore[misc]


def test_zbox_vector_bounds_hashable() -> None:
    assert hash(ZBoxRule(np.zeros(3), 1.0)) == hash(ZBoxRule([0, 0, 0], 1))


def test_zbox_per_channel_bounds_hashable() -> None:
    low, high = -np.ones((3, 1, 1)), np.ones((3, 1, 1))
    assert hash(ZBoxRule(low, high)) == hash(ZBoxRule(low.copy(), high.copy()))


# -- groups() ---------------------------------------------------------------------------------
def _apply_groups(rule: LinearRule, W: np.ndarray, b: np.ndarray, x: np.ndarray, R: np.ndarray,
                  low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Interpret ``rule.groups()`` directly in numpy (dense W, no ONNX): the spec the engine gets.

    ``R_in = Σ_g coeff_g Σ_k sign_k sel_k(x) ⊙ W_kᵀ s_g`` with
    ``s_g = mask_g(R) / stab(Σ_k sign_k (sel_k W_kᵀ + b_k))`` (no ``sel_k ⊙`` when
    ``multiply_input`` is False).
    """
    sel = {Sel.X: x, Sel.POS: np.maximum(x, 0), Sel.NEG: np.minimum(x, 0),
           Sel.ONES: np.ones_like(x), Sel.LOW: np.broadcast_to(low, x.shape),
           Sel.HIGH: np.broadcast_to(high, x.shape)}
    z_plain = x @ W.T + b
    total = np.zeros_like(x)
    for g in rule.groups():
        z = sum(t.sign * (sel[t.x] @ t.w(W).T + t.b(b)) for t in g.terms)
        r = R if g.mask is None else np.where(z_plain > 0 if g.mask == "pos" else z_plain < 0,
                                              R, 0.0)
        s = r / lt.stabilize(z, rule.eps)
        for t in g.terms:
            v = s @ t.w(W)
            total = total + g.coeff * t.sign * (sel[t.x] * v if rule.multiply_input else v)
    return total


def _reference(rule: LinearRule, W, b, x, R, low, high) -> np.ndarray:
    eps, zb = rule.eps, getattr(rule, "zero_bias", False)
    if isinstance(rule, (ZeroRule, EpsilonRule)):
        return lt.ref_epsilon(W, b, x, R, eps, zero_bias=zb)
    if isinstance(rule, GammaRule):
        return lt.ref_gamma(W, b, x, R, rule.gamma, eps, zero_bias=zb)
    if isinstance(rule, GeneralizedGammaRule):
        return lt.ref_generalized_gamma(W, b, x, R, rule.gamma, eps, zero_bias=zb)
    if isinstance(rule, ZPlusRule):
        return lt.ref_zplus(W, b, x, R, eps, zero_bias=zb)
    if isinstance(rule, AlphaBetaRule):
        return lt.ref_alpha_beta(W, b, x, R, rule.alpha, rule.beta, eps, zero_bias=zb)
    if isinstance(rule, WSquareRule):
        return lt.ref_wsquare(W, b, x, R, eps, zero_bias=zb)
    if isinstance(rule, FlatRule):
        return lt.ref_flat(W, b, x, R, eps)
    if isinstance(rule, ZBoxRule):
        return lt.ref_zbox(W, b, x, R, low, high, eps, zero_bias=zb)
    raise AssertionError(rule)


@pytest.mark.parametrize("rule", LINEAR_RULES, ids=repr)
def test_groups_well_formed(rule: LinearRule) -> None:
    groups = rule.groups()
    assert isinstance(groups, tuple) and groups
    assert groups == rule.groups()  # deterministic, comparable
    reads_input = False
    for g in groups:
        assert isinstance(g, Group)
        assert math.isfinite(g.coeff)  # AlphaBetaRule(1, 0) keeps a beta group with coeff -0.0
        assert g.mask in (None, "pos", "neg")
        assert isinstance(g.terms, tuple) and g.terms
        for t in g.terms:
            assert isinstance(t, Term)
            assert isinstance(t.x, Sel) and isinstance(t.w, Mod) and isinstance(t.b, Mod)
            assert t.sign in (1, -1)
            for mod in (t.w, t.b):  # every modifier is a known, shape-preserving kind
                assert mod(np.array([[-1.5, 0.0, 2.0]])).shape == (1, 3)
            if not rule.multiply_input:
                assert t.x is Sel.ONES
            reads_input |= t.x in (Sel.X, Sel.POS, Sel.ONES)
            if getattr(rule, "zero_bias", False) or isinstance(rule, FlatRule):
                assert t.b.kind == "zero"
    assert reads_input, "the engine needs a term reading x, x⁺ or 1"


@pytest.mark.parametrize("rule", LINEAR_RULES, ids=repr)
def test_groups_encode_the_formula(rule: LinearRule, rng: np.random.Generator) -> None:
    """``groups()`` interpreted in numpy equals the rule's matrix-form reference (float64)."""
    W = rng.normal(size=(5, 7))
    b = rng.normal(size=5)
    x = rng.uniform(-2, 2, size=(4, 7))
    R = x @ W.T + b  # relevance ∝ z, as in a network
    low, high = np.full(7, -3.0), np.full(7, 3.0)
    np.testing.assert_allclose(_apply_groups(rule, W, b, x, R, low, high),
                               _reference(rule, W, b, x, R, low, high), rtol=1e-12, atol=1e-12)


def test_mods() -> None:
    p = np.array([-2.0, -0.5, 0.0, 1.0, 3.0])
    np.testing.assert_array_equal(Mod("pos")(p), [0, 0, 0, 1, 3])
    np.testing.assert_array_equal(Mod("neg")(p), [-2, -0.5, 0, 0, 0])
    np.testing.assert_array_equal(Mod("square")(p), p * p)
    np.testing.assert_array_equal(Mod("gamma_pos", 0.5)(p), [-2, -0.5, 0, 1.5, 4.5])
    np.testing.assert_array_equal(Mod("gamma_neg", 0.5)(p), [-3, -0.75, 0, 1, 3])
    with pytest.raises(ValueError, match="unknown"):
        Mod("nope")(p)


# -- compiled behaviour ---------------------------------------------------------------------------
def _conv_net(rng: np.random.Generator) -> Net:
    net = Net(rng, (3, 6, 6))
    w = net.param("lut/W", (4, 3, 3, 3))
    y = net.node("Conv", [net.x, w, net.param("lut/B", (4,), scale=0.5)], "lut/conv",
                 pads=[1, 1, 1, 1])
    y = net.node("MaxPool", [y], "lut/maxpool", kernel_shape=[2, 2], strides=[2, 2])
    net.head(y)
    return net


def test_zplus_equals_alpha1_beta0(rng: np.random.Generator) -> None:
    net = _conv_net(rng)
    x = rng.uniform(-2, 2, size=(3, 3, 6, 6)).astype(np.float32)
    feeds = {"x": x, "target": np.array([0, 2, -1], dtype=np.int64)}
    results = []
    for rule in (ZPlusRule(), AlphaBetaRule(1.0, 0.0)):
        compiled = LRP(net.model(), Composite(NameMap("lut/conv", rule))).model
        results.append(ort_session(compiled).run(["relevance"], feeds)[0])
    assert np.abs(results[0]).max() > 0
    # Same math; AlphaBeta(1, 0) also adds 0 * (its beta term), so equality is to rounding.
    lt.assert_relevance_close(results[1], results[0].astype(np.float64), np.float32)


@pytest.mark.parametrize("node, rule, fits", [
    ("lut/conv", PassRule(), LINEAR_RULE_NAMES),
    ("lut/maxpool", GammaRule(), ["ZeroRule", "EpsilonRule"]),
    ("lut/maxpool", PassRule(), ["ZeroRule", "EpsilonRule"]),
    ("head/flatten", ZPlusRule(), ["PassRule", "ZeroRule", "EpsilonRule"]),
], ids=["pass-on-conv", "gamma-on-maxpool", "pass-on-maxpool", "zplus-on-flatten"])
def test_rule_not_applicable(node: str, rule: lrp_onnx.Rule, fits: list[str],
                             rng: np.random.Generator) -> None:
    net = _conv_net(rng)
    with pytest.raises(RuleNotApplicable) as info:
        LRP(net.model(), Composite(NameMap(node, rule)))
    msg = str(info.value)
    assert f"'{node}'" in msg
    assert repr(rule) in msg
    listed = msg.split("rules that fit:")[1]
    assert sorted(n.strip() for n in listed.split(",")) == sorted(fits)
    assert isinstance(info.value, lrp_onnx.LRPError)


def test_rule_not_applicable_from_rule_list(rng: np.random.Generator) -> None:
    net = _conv_net(rng)
    layers = LRP(net.model()).layers
    assert [la.kind for la in layers] == ["Conv", "MaxPool", "Flatten", "Gemm"]
    rules = [ZeroRule(), ZPlusRule(), PassRule(), EpsilonRule()]
    with pytest.raises(RuleNotApplicable, match=r"'lut/maxpool'.*rules that fit: ZeroRule"):
        LRP(net.model(), rules)


def test_zbox_bounds_that_do_not_broadcast(rng: np.random.Generator) -> None:
    net = _conv_net(rng)
    rule = ZBoxRule(np.zeros(5), 1.0)  # 5 does not broadcast against the sample (3, 6, 6)
    with pytest.raises(RuleNotApplicable, match=r"'lut/conv'.*\(3, 6, 6\)"):
        LRP(net.model(), Composite(NameMap("lut/conv", rule)))
