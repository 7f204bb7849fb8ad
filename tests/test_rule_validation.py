"""Rule hyper-parameters are checked where they are written (issue 20).

* Every rule and preset refuses a meaningless hyper-parameter at construction with one
  ``ValueError`` that says what is allowed; the CLI turns a bad ``--composite`` or rule file into
  one line, exit 1, no file written.
* What the compiler records about rules in the model's metadata reads back (``check``): a
  property test over every rule with random valid hyper-parameters (arrays and extreme finite
  values included) on tiny float32 and float64 models; values the model's float type cannot hold
  are refused at compile time, naming the layer.
* Property tests of ``parse_composite`` and of rule files: random and near-valid strings and
  random TOML/JSON documents give a Composite or a one-line ``RuleAssignmentError``, never
  another exception, and never a compiled model whose relevance is not finite on finite input.

The generators are seeded numpy generators (no hypothesis dependency): each case is reproducible
from its index.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from conftest import MODELS, ort_session
from lrp_onnx import (
    CPLRP,
    LRP,
    AlphaBetaRule,
    AttnLRP,
    Composite,
    ConvLayer,
    DenseLayer,
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    EpsilonRule,
    FirstLayerTypeMap,
    FlatRule,
    GammaRule,
    GeneralizedGammaRule,
    GlobalMap,
    GlobalTypeMap,
    PassRule,
    WSquareRule,
    ZBoxRule,
    ZeroRule,
    ZPlusRule,
    check_model,
)
from lrp_onnx.emit.contract import read_record
from lrp_onnx.errors import LRPError, RuleAssignmentError, RuleNotApplicable
from lrp_onnx.rules.composites import ActivationLayer, ProductLayer, ReshapingLayer
from lrp_onnx.rules.core import ALL_RULES, GradientRule, Rule, UniformRule
from lrp_onnx.rules.presets import PRESETS, parse_composite
from lrp_onnx.rules.rulefile import RULES, load_rules, parse_rule
from lrp_onnx.testing.references import Net

ROOT = Path(__file__).resolve().parent.parent
SEED_MODEL = MODELS / "seed_vgg.onnx"
CNN_SAMPLE = (2, 4, 4)
DENSE_SAMPLE = (4,)


# -- tiny models ---------------------------------------------------------------------------------
def _cnn(dtype: Any = np.float32) -> Any:
    """Conv(2->3, 3x3, pad 1) + ReLU + MaxPool(2) + Flatten + Gemm(12->3): first conv, dense."""
    net = Net(np.random.default_rng(7), CNN_SAMPLE)
    w = net.param("conv/W", (3, 2, 3, 3))
    b = net.const("conv/b", [0.1, -0.2, 0.05])
    y = net.node("Conv", [net.x, w, b], "conv", pads=[1, 1, 1, 1])
    y = net.node("Relu", [y], "relu")
    y = net.node("MaxPool", [y], "pool", kernel_shape=[2, 2], strides=[2, 2])
    net.head(y, classes=3, bias=0.5)
    return net.model(dtype)


def _dense(dtype: Any = np.float32) -> Any:
    """Gemm(4->5) + ReLU + Gemm(5->3): ONNX Runtime's CPU EP has no float64 Conv."""
    net = Net(np.random.default_rng(9), DENSE_SAMPLE)
    y = net.node("Gemm", [net.x, net.param("fc/W", (5, 4)), net.const("fc/b", [0.1] * 5)], "fc",
                 transB=1)
    y = net.node("Relu", [y], "relu")
    net.head(y, classes=3, bias=0.5)
    return net.model(dtype)


def _product(dtype: Any = np.float32) -> Any:
    """Two Gemm branches multiplied (a product of activations) and a Gemm head."""
    net = Net(np.random.default_rng(8), (4,))
    a = net.node("Gemm", [net.x, net.param("a/W", (3, 4)), net.const("a/b", [0.2] * 3)], "a",
                 transB=1)
    c = net.node("Gemm", [net.x, net.param("c/W", (3, 4)), net.const("c/b", [0.3] * 3)], "c",
                 transB=1)
    y = net.node("Mul", [a, c], "prod")
    net.head(y, classes=3, bias=0.5)
    return net.model(dtype)


MODELS_BY_KIND: dict[tuple[str, str], Any] = {}


def _model(kind: str, dtype: Any) -> Any:
    key = (kind, np.dtype(dtype).name)
    if key not in MODELS_BY_KIND:
        MODELS_BY_KIND[key] = {"cnn": _cnn, "dense": _dense, "product": _product}[kind](dtype)
    return MODELS_BY_KIND[key]


def _relevance(model: Any, dtype: Any, rng: np.random.Generator) -> np.ndarray:
    """The compiled model's relevance on a finite random batch of 3."""
    x_info = model.graph.input[0]
    sample = [d.dim_value for d in x_info.type.tensor_type.shape.dim][1:]
    x = np.clip(rng.standard_normal((3, *sample)), -3, 3).astype(dtype)
    session = ort_session(model)
    out: np.ndarray = session.run(["relevance"], {x_info.name: x,
                                                  "target": np.full(3, -1, np.int64)})[0]
    return out


# -- construction refuses meaningless hyper-parameters -------------------------------------------
NAN, INF = float("nan"), float("inf")

REFUSED = [
    # (make, words the message must hold)
    (lambda: EpsilonRule(epsilon=NAN), ["EpsilonRule", "epsilon", "finite number >= 0", "nan"]),
    (lambda: EpsilonRule(epsilon=-1), ["EpsilonRule", "epsilon", ">= 0", "-1"]),
    (lambda: EpsilonRule(epsilon=INF), ["EpsilonRule", "finite", "inf"]),
    (lambda: EpsilonRule(epsilon=10 ** 400), ["EpsilonRule", "finite"]),
    (lambda: EpsilonRule(epsilon="1e-6"), ["EpsilonRule", "epsilon", "'1e-6'"]),
    (lambda: EpsilonRule(epsilon=True), ["EpsilonRule", "epsilon", "True"]),
    (lambda: EpsilonRule(zero_bias=2), ["EpsilonRule", "zero_bias", "True or False"]),
    (lambda: ZeroRule(stabilizer=-1e-6), ["ZeroRule", "stabilizer", ">= 0"]),
    (lambda: ZeroRule(stabilizer=NAN), ["ZeroRule", "stabilizer"]),
    (lambda: GammaRule(gamma=-0.25), ["GammaRule", "gamma", ">= 0"]),
    (lambda: GammaRule(gamma=INF), ["GammaRule", "gamma"]),
    (lambda: GammaRule(stabilizer=-1.0), ["GammaRule", "stabilizer"]),
    (lambda: GeneralizedGammaRule(gamma=NAN), ["GeneralizedGammaRule", "gamma"]),
    (lambda: GeneralizedGammaRule(gamma=-1), ["GeneralizedGammaRule", "gamma", ">= 0"]),
    (lambda: ZPlusRule(stabilizer=INF), ["ZPlusRule", "stabilizer"]),
    (lambda: AlphaBetaRule(INF, INF), ["AlphaBetaRule", "alpha", "finite"]),
    (lambda: AlphaBetaRule(NAN, 0.0), ["AlphaBetaRule", "alpha"]),
    (lambda: AlphaBetaRule(stabilizer=-1), ["AlphaBetaRule", "stabilizer"]),
    (lambda: WSquareRule(stabilizer=-0.5), ["WSquareRule", "stabilizer", ">= 0"]),
    (lambda: WSquareRule(zero_bias="yes"), ["WSquareRule", "zero_bias"]),
    (lambda: FlatRule(stabilizer=NAN), ["FlatRule", "stabilizer"]),
    (lambda: UniformRule(epsilon=-1e-9), ["UniformRule", "epsilon", ">= 0"]),
    (lambda: UniformRule(epsilon=INF), ["UniformRule", "epsilon"]),
    (lambda: ZBoxRule(low=1, high=0), ["ZBoxRule", "low must be <= high", "1.0 > high=0.0"]),
    (lambda: ZBoxRule(low=1e309, high=-1e309), ["ZBoxRule", "low", "finite", "inf"]),
    (lambda: ZBoxRule(low=-1.0, high=NAN), ["ZBoxRule", "high", "finite"]),
    (lambda: ZBoxRule(np.array([0.0, 2.0, 0.0]), 1.0), ["ZBoxRule", "<= high", "index (1,)"]),
    (lambda: ZBoxRule(np.zeros((3, 1, 1)), np.full((3, 1, 1), -1.0)), ["ZBoxRule", "<= high"]),
    (lambda: ZBoxRule(np.zeros(3), np.ones(2)), ["ZBoxRule", "(3,)", "(2,)", "broadcast"]),
    (lambda: ZBoxRule(np.array([0.0, INF]), INF), ["ZBoxRule", "low", "finite"]),
    (lambda: ZBoxRule([], 1.0), ["ZBoxRule", "non-empty"]),
    (lambda: ZBoxRule([[1.0], [1.0, 2.0]], 3.0), ["ZBoxRule", "low"]),
    (lambda: ZBoxRule("0", 1.0), ["ZBoxRule", "low"]),
    (lambda: ZBoxRule(np.array([True]), 1.0), ["ZBoxRule", "low"]),
    (lambda: ZBoxRule(0.0, 1.0, stabilizer=-1), ["ZBoxRule", "stabilizer"]),
    (lambda: EpsilonPlus(epsilon=-1), ["EpsilonPlus", "epsilon", ">= 0"]),
    (lambda: EpsilonPlusFlat(epsilon=NAN), ["EpsilonPlusFlat", "epsilon"]),
    (lambda: EpsilonAlpha2Beta1(epsilon=INF), ["EpsilonAlpha2Beta1", "epsilon"]),
    (lambda: EpsilonAlpha2Beta1Flat(epsilon=-2), ["EpsilonAlpha2Beta1Flat", "epsilon"]),
    (lambda: EpsilonGammaBox(1.0, 0.0), ["EpsilonGammaBox", "low must be <= high"]),
    (lambda: EpsilonGammaBox(1e309, -1e309), ["EpsilonGammaBox", "low", "finite"]),
    (lambda: EpsilonGammaBox(-3, 3, gamma=-1), ["EpsilonGammaBox", "gamma", ">= 0"]),
    (lambda: EpsilonGammaBox(-3, 3, epsilon=NAN), ["EpsilonGammaBox", "epsilon"]),
    (lambda: AttnLRP(epsilon=-1e-3), ["AttnLRP", "epsilon", ">= 0"]),
    (lambda: AttnLRP(conv_gamma=NAN), ["AttnLRP", "conv_gamma"]),
    (lambda: CPLRP(dense_gamma=-0.05), ["CPLRP", "dense_gamma", ">= 0"]),
    (lambda: CPLRP(epsilon=INF), ["CPLRP", "epsilon"]),
]


@pytest.mark.parametrize("case", range(len(REFUSED)))
def test_meaningless_hyper_parameters_are_refused(case: int) -> None:
    make, words = REFUSED[case]
    with pytest.raises(ValueError) as info:
        make()
    text = str(info.value)
    assert "\n" not in text and len(text) < 300, text
    for word in words:
        assert word in text, (word, text)


def test_the_limit_values_are_accepted() -> None:
    """0 is meaningful for every stabilizer (the limit ε → 0) and for gamma (LRP-0); low ==
    high is a (degenerate) box; extreme finite values are valid hyper-parameters."""
    assert EpsilonRule(epsilon=0).epsilon == 0.0
    assert ZeroRule(stabilizer=0.0).stabilizer == 0.0
    assert GammaRule(gamma=0).gamma == 0.0
    assert UniformRule(epsilon=0).epsilon == 0.0
    assert ZBoxRule(2.0, 2.0).low == 2.0
    assert ZBoxRule(np.zeros((3, 1, 1)), 0.0).high == 0.0
    assert EpsilonRule(epsilon=5e-324).epsilon == 5e-324
    assert GammaRule(gamma=1e300).gamma == 1e300
    assert ZBoxRule(-1e300, 1e300).high == 1e300
    assert EpsilonRule(epsilon=np.float32(0.5)).epsilon == 0.5
    assert ZeroRule(zero_bias=np.bool_(True)).zero_bias is True


def test_issue_cases_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--composite`` with infinite inverted bounds and a rule file with a negative epsilon:
    one line, exit 1, no output file."""
    from lrp_onnx.cli.main import main

    rules = tmp_path / "bad.toml"
    rules.write_text('[[map]]\ntype = "GlobalMap"\nrule = "EpsilonRule(epsilon=-1)"\n')
    nan_json = tmp_path / "bad.json"
    nan_json.write_text('{"map": [{"type": "GlobalMap", "rule": "ZBoxRule(low=1, high=0)"}]}')
    cases = [
        (["--composite", "EpsilonGammaBox(low=1e309, high=-1e309)"],
         ["EpsilonGammaBox", "finite", "inf"]),
        (["--rules", str(rules)], ["bad.toml", "EpsilonRule: epsilon must be a finite number"]),
        (["--rules", str(nan_json)], ["bad.json", "ZBoxRule: low must be <= high"]),
        (["--composite", "EpsilonPlus(epsilon=1e300)"], ["too large for float32", "'"]),
    ]
    for i, (args, words) in enumerate(cases):
        out = tmp_path / f"out{i}.onnx"
        code = main(["convert", str(SEED_MODEL), str(out), *args])
        err = capsys.readouterr().err
        assert code == 1, (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith("lrp-onnx: error: "), err
        for word in words:
            assert word in err, (word, err)
        assert not out.exists()


def test_zbox_bounds_must_broadcast_to_the_input() -> None:
    """Array bounds are checked against the model's input shape at compile time; the error
    is one line naming the rule, the layer and the input."""
    model = _cnn()
    ok = Composite(GlobalMap(EpsilonRule()), FirstLayerTypeMap({ConvLayer: ZBoxRule(
        -np.ones((2, 1, 1)), np.ones((1, 4, 4)))}))
    assert np.isfinite(_relevance(LRP(model, ok).model, np.float32,
                                  np.random.default_rng(0))).all()
    for low in (np.zeros(3), np.zeros((3, 1, 1)), np.zeros((2, 4, 4, 4))):
        bad = Composite(GlobalMap(EpsilonRule()),
                        FirstLayerTypeMap({ConvLayer: ZBoxRule(low, 1.0)}))
        with pytest.raises(RuleNotApplicable) as info:
            LRP(model, bad)
        text = str(info.value)
        assert "\n" not in text
        for word in ("ZBoxRule", "'conv'", "input 'x'", "(2, 4, 4)", str(low.shape)):
            assert word in text, (word, text)


@pytest.mark.parametrize(("rule", "words"), [
    (EpsilonRule(epsilon=1e300), ["epsilon=1e+300", "too large for float32"]),
    (EpsilonRule(epsilon=1e-300), ["epsilon=1e-300", "too small for float32", "use 0"]),
    (ZeroRule(stabilizer=5e-324), ["stabilizer=5e-324", "too small"]),
    (GammaRule(gamma=1e300), ["gamma=1e+300", "too large"]),
    (ZBoxRule(-1e300, 1e300), ["low=-1e+300", "too large"]),
    (ZBoxRule(np.full((2, 1, 1), -1e300), 1.0), ["array(shape=(2, 1, 1))", "too large"]),
])
def test_values_the_float_type_cannot_hold_are_refused_naming_the_layer(
        rule: Rule, words: list[str]) -> None:
    composite = Composite(GlobalMap(EpsilonRule()), FirstLayerTypeMap({ConvLayer: rule}))
    with pytest.raises(RuleNotApplicable) as info:
        LRP(_model("cnn", np.float32), composite)
    text = str(info.value)
    assert "\n" not in text and "'conv' (Conv)" in text, text
    for word in words:
        assert word in text, (word, text)


# -- the metadata record round-trips -------------------------------------------------------------
EXTREMES = (0.0, 5e-324, 1e-300, 1e-30, 1e-6, 0.25, 1.0, 3.0, 1e6, 1e30, 1e300)


def _nonneg(rng: np.random.Generator) -> float:
    if rng.random() < 0.5:
        return float(EXTREMES[rng.integers(len(EXTREMES))])
    return float(10.0 ** rng.uniform(-10, 10))


def _bounds(rng: np.random.Generator, sample: tuple[int, ...]) -> tuple[Any, Any]:
    """Scalars or arrays broadcastable to one (2, 4, 4) or (4,) sample, low <= high."""
    shapes = [(), (1,), (4,), (1, 4)] if sample == DENSE_SAMPLE else \
        [(), (1,), (4,), (2, 1, 1), (1, 4, 4), (2, 4, 4), (1, 1, 1, 1)]
    scale = float(EXTREMES[rng.integers(len(EXTREMES))])
    shape = shapes[rng.integers(len(shapes))]
    low = rng.uniform(-1, 0, shape) * scale - rng.uniform(0, 1)
    spread = rng.uniform(0, 2, shapes[rng.integers(len(shapes))]) * max(scale, 1.0)
    high = low + spread
    if rng.random() < 0.3:  # scalars as Python floats, arrays as lists now and then
        return float(np.min(low)), float(np.max(high))
    return (low if rng.random() < 0.5 else low.tolist()), high


def _random_rule(rng: np.random.Generator, cls: type[Rule],
                 sample: tuple[int, ...] = CNN_SAMPLE) -> Rule:
    zb = bool(rng.random() < 0.3)
    if cls is ZeroRule:
        return ZeroRule(stabilizer=_nonneg(rng), zero_bias=zb)
    if cls is EpsilonRule:
        return EpsilonRule(epsilon=_nonneg(rng), zero_bias=zb)
    if cls in (GammaRule, GeneralizedGammaRule):
        return cls(gamma=_nonneg(rng), stabilizer=_nonneg(rng), zero_bias=zb)
    if cls is ZPlusRule:
        return ZPlusRule(stabilizer=_nonneg(rng), zero_bias=zb)
    if cls is AlphaBetaRule:  # alpha - beta == 1 to 1e-12: beta within float's exact range
        beta = float(rng.choice([0.0, 5e-324, 1e-300, 0.5, 1.0, 3.0, 1e3]))
        return AlphaBetaRule(1.0 + beta, beta, stabilizer=_nonneg(rng), zero_bias=zb)
    if cls is WSquareRule:
        return WSquareRule(stabilizer=_nonneg(rng), zero_bias=zb)
    if cls is FlatRule:
        return FlatRule(stabilizer=_nonneg(rng))
    if cls is ZBoxRule:
        low, high = _bounds(rng, sample)
        return ZBoxRule(low, high, stabilizer=_nonneg(rng), zero_bias=zb)
    if cls is UniformRule:
        return UniformRule(epsilon=_nonneg(rng))
    return cls()  # PassRule, GradientRule: no hyper-parameters


def _placed(rule: Rule, linear: str = "cnn") -> tuple[str, Composite]:
    """A tiny model and a composite that puts ``rule`` on every layer it fits (``linear``: the
    model for linear rules, ``"cnn"`` or ``"dense"``)."""
    base = GlobalMap(EpsilonRule())
    if isinstance(rule, ZBoxRule):
        return linear, Composite(base, FirstLayerTypeMap({ConvLayer: rule, DenseLayer: rule}))
    if isinstance(rule, (UniformRule, GradientRule)):
        return "product", Composite(base, GlobalTypeMap({ProductLayer: rule}))
    if isinstance(rule, PassRule):
        return linear, Composite(base, GlobalTypeMap({ActivationLayer: rule,
                                                      ReshapingLayer: rule}))
    return linear, Composite(base, GlobalTypeMap({ConvLayer: rule, DenseLayer: rule}))


def test_every_rule_spelling_reads_back() -> None:
    """``parse_rule(rule.spelling()) == rule`` for every rule, random hyper-parameters."""
    rng = np.random.default_rng(20)
    for i in range(600):
        cls = ALL_RULES[i % len(ALL_RULES)]
        rule = _random_rule(rng, cls)
        assert parse_rule(rule.spelling()) == rule, (i, rule.spelling())
        assert "\n" not in repr(rule)


ROUND_TRIPS = 120


def test_recorded_rules_read_back_and_relevance_is_finite() -> None:
    """Property test: each rule with random valid hyper-parameters, compiled on a tiny float32
    or float64 model, either compiles (then ``check`` reads the record back, recompiles it to
    the same relevance and finds every relevance finite) or is refused at compile time with one
    line because the float type cannot hold a value (and only then)."""
    rng = np.random.default_rng(2020)
    compiled = refused = extreme = 0
    for i in range(ROUND_TRIPS):
        cls = ALL_RULES[i % len(ALL_RULES)]
        dtype = np.float64 if i % 3 == 2 else np.float32
        linear = "dense" if dtype == np.float64 or i % 4 == 3 else "cnn"
        rule = _random_rule(rng, cls, DENSE_SAMPLE if linear == "dense" else CNN_SAMPLE)
        kind, composite = _placed(rule, linear)
        model = _model(kind, dtype)
        problem = rule.dtype_problem(dtype)
        try:
            lrp = LRP(model, composite)
        except RuleNotApplicable as exc:
            assert problem is not None, (i, rule.spelling(), exc)
            assert "\n" not in str(exc) and problem in str(exc)
            refused += 1
            continue
        assert problem is None, (i, rule.spelling())
        compiled += 1
        values = [abs(v) for v in np.asarray(
            [getattr(rule, f) for f in ("epsilon", "stabilizer", "gamma") if hasattr(rule, f)]
            or [1.0])]
        extreme += any(v != 0 and (v < 1e-200 or v > 1e200) for v in values)
        recorded = [la["rule"] for la in read_record(lrp.model)["layers"]]
        assert rule.spelling() in recorded, (i, recorded)
        assert parse_rule(rule.spelling()) == rule
        report = check_model(lrp.model, samples=2, seed=i)
        results = {r.name: r for r in report.results}
        assert results["recorded_rules"].ok, (i, rule.spelling(), results["recorded_rules"])
        assert results["relevance_finite"].ok, (i, rule.spelling(), results["relevance_finite"])
        assert results["outputs_unchanged"].ok, (i, rule.spelling())
    assert compiled >= ROUND_TRIPS // 2 and refused > 0 and extreme > 0, \
        (compiled, refused, extreme)


def test_extreme_values_compile_in_float64_and_read_back() -> None:
    """1e300 fits a float64 model: it compiles, its record reads back, and its relevance is
    finite (float32 refuses it, see above); so does float32's smallest normal number as a
    stabilizer. A smaller non-zero stabilizer is refused in float64 too: ONNX Runtime drops
    ``z + 1e-300`` as adding zero (0 / 0 then gives NaN)."""
    rules = [EpsilonRule(epsilon=1.2e-38), EpsilonRule(epsilon=1e300), GammaRule(gamma=1e300),
             ZBoxRule(np.full((1, 4), -1e300), 1e300), ZeroRule(stabilizer=1e-30),
             UniformRule(epsilon=1e300)]
    for rule in rules:
        kind, composite = _placed(rule, "dense")
        report = check_model(LRP(_model(kind, np.float64), composite).model, samples=2)
        failed = [r.name for r in report.results if r.ok is False]
        # (a huge epsilon absorbs the relevance: conservation is not asked of it)
        assert not set(failed) - {"conservation_layers", "conservation_total"}, (rule, failed)
    for rule in (EpsilonRule(epsilon=1e-300), ZeroRule(stabilizer=5e-324)):
        kind, composite = _placed(rule, "dense")
        with pytest.raises(RuleNotApplicable, match="too small for float64: use 0"):
            LRP(_model(kind, np.float64), composite)


def test_cli_check_reads_back_array_bounds(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's path end to end: a rule file with per-channel ZBox bounds, ``convert``, then
    ``lrp-onnx check`` on the compiled file reads the recorded rules back and passes."""
    from lrp_onnx.cli.main import main

    rules = tmp_path / "box.toml"
    rules.write_text('preset = "EpsilonPlus"\n[[map]]\ntype = "FirstLayerTypeMap"\n'
                     'rules = { Conv = "ZBoxRule(low=[[[-2.1]], [[-2.0]], [[-1.8]]], '
                     'high=[[[2.2]], [[2.4]], [[2.6]]])" }\n')
    out = tmp_path / "box.onnx"
    assert main(["convert", str(SEED_MODEL), str(out), "--rules", str(rules)]) == 0
    recorded = [la["rule"] for la in read_record(onnx.load(str(out)))["layers"]]
    assert "ZBoxRule(low=[[[-2.1]], [[-2.0]], [[-1.8]]], high=[[[2.2]], [[2.4]], [[2.6]]])" \
        in recorded
    capsys.readouterr()
    code = main(["check", str(out), "--json", "--samples", "2"])
    report = json.loads(capsys.readouterr().out)
    results = {r["name"]: r for r in report["results"]}
    assert code == 0 and results["recorded_rules"]["ok"], results
    assert results["relevance_finite"]["ok"]


# -- parse_composite: random and near-valid strings ----------------------------------------------
VALID_COMPOSITES = [
    "EpsilonPlus", "EpsilonPlusFlat()", "EpsilonAlpha2Beta1(epsilon=1e-3)",
    "EpsilonAlpha2Beta1Flat", "EpsilonGammaBox(low=-3.0, high=3.0)",
    "EpsilonGammaBox(-1, 1, epsilon=0.1, gamma=0.5)",
    "AttnLRP(epsilon=0, conv_gamma=0.25, dense_gamma=0.05)", "CPLRP()",
]
TOKENS = ["1e309", "-1e309", "nan", "inf", "1e-400", "0", "-0.0", "5e-324", "1e300", "-1",
          "True", "None", "'a'", "[1, 2]", "10**400", "9" * 400, "-" * 50 + "1", "(", ")", ",",
          "=", "low=", "high=", "gamma=", "epsilon=", "**{}", "*[1]", "x.y", "\n", "\x00",
          "EpsilonPlus", "ZBoxRule(0, 1)", "[" * 40, "lambda: 0", "__import__('os')"]
ALPHABET = list("()[]{},=.-+eE0123456789 abxyz_*'\"#\n\t\x00é")


def _mutate(rng: np.random.Generator, text: str) -> str:
    for _ in range(int(rng.integers(1, 4))):
        pos = int(rng.integers(0, len(text) + 1))
        what = rng.integers(4)
        if what == 0 and text:  # delete a span
            text = text[:pos] + text[pos + int(rng.integers(1, 4)):]
        elif what == 1:  # insert a character
            text = text[:pos] + ALPHABET[rng.integers(len(ALPHABET))] + text[pos:]
        elif what == 2:  # insert a token
            text = text[:pos] + TOKENS[rng.integers(len(TOKENS))] + text[pos:]
        else:  # replace a number with a token
            parts = text.split("=")
            if len(parts) > 1:
                k = int(rng.integers(1, len(parts)))
                tail = parts[k].lstrip("-0123456789.e")
                parts[k] = TOKENS[rng.integers(len(TOKENS))] + tail
                text = "=".join(parts)
    return text


def _random_text(rng: np.random.Generator) -> str:
    n = int(rng.integers(0, 40))
    return "".join(ALPHABET[i] if rng.random() < 0.8 else TOKENS[i % len(TOKENS)]
                   for i in rng.integers(0, len(ALPHABET), n))


def _compiles_finite(composite: Composite, rng: np.random.Generator) -> bool:
    """Compile ``composite`` on the tiny CNN: a one-line LRPError (False) or a model whose
    relevance is finite on finite input (True); anything else fails the test."""
    try:
        model = LRP(_model("cnn", np.float32), composite).model
    except LRPError as exc:
        assert "\n" not in str(exc)
        return False
    rel = _relevance(model, np.float32, rng)
    assert np.isfinite(rel).all(), composite
    return True


def _parsed(parse: Any, source: Any, text: str, names: str = "",
            limit: int | None = None) -> Composite | None:
    """``parse(source)``: a Composite, or ``None`` after a one-line ``RuleAssignmentError``
    (naming ``names``, shorter than ``limit``); any other outcome fails the test."""
    try:
        composite = parse(source)
    except RuleAssignmentError as exc:
        message = str(exc)
        assert "\n" not in message and names in message and \
            (limit is None or len(message) < limit), (text, message)
        return None
    assert isinstance(composite, Composite), text
    return composite


def _some_compile_finite(composites: dict[str, Composite], rng: np.random.Generator) -> None:
    """Of the first 16 distinct composites, at least one compiles (all finite or refused)."""
    assert sum(_compiles_finite(c, rng) for c in list(composites.values())[:16]) > 0


@pytest.mark.filterwarnings("error")  # a SyntaxWarning would be a second line on stderr
def test_parse_composite_property() -> None:
    rng = np.random.default_rng(42)
    parsed: dict[str, Composite] = {}
    errors = 0
    for i in range(3000):
        if i % 4 == 0:
            text = _random_text(rng)
        else:
            text = _mutate(rng, VALID_COMPOSITES[rng.integers(len(VALID_COMPOSITES))])
        composite = _parsed(parse_composite, text, text, limit=600)
        if composite is None:
            errors += 1
        else:
            parsed.setdefault(repr(composite), composite)
    assert errors > 1000 and len(parsed) > 10, (errors, len(parsed))
    _some_compile_finite(parsed, rng)


def test_every_preset_parses_with_its_defaults() -> None:
    for name in PRESETS:
        text = name if name != "EpsilonGammaBox" else f"{name}(-3, 3)"
        assert isinstance(parse_composite(text), Composite)


# -- rule files: random TOML/JSON documents ------------------------------------------------------
PRIMITIVES = ["GlobalMap", "FirstLayerMap", "LastLayerMap", "GlobalTypeMap",
              "FirstLayerTypeMap", "LastLayerTypeMap", "LayerMap", "RangeMap", "RangeTypeMap",
              "FirstNTypeMap", "NameMap", "Bogus"]
KEYS = ["type", "rule", "rules", "index", "range", "n", "pattern", "extra"]
TYPE_KEYS = ["Conv", "Gemm", "Dense", "ConvLayer", "Relu", "MaxPool", "Flatten", "??"]
VALID_RULES = [
    "ZeroRule()", "EpsilonRule(epsilon=1e-3)", "GammaRule(gamma=0.5)", "ZPlusRule",
    "AlphaBetaRule(2, 1)", "WSquareRule(zero_bias=True)", "FlatRule()", "PassRule()",
    "ZBoxRule(low=-3, high=3)", "ZBoxRule(low=[[[-1.0]], [[-2.0]]], high=[1.0])",
    "GeneralizedGammaRule(gamma=0.1)", "UniformRule()", "GradientRule()",
]


def _rule_text(rng: np.random.Generator) -> str:
    text = VALID_RULES[rng.integers(len(VALID_RULES))]
    return text if rng.random() < 0.6 else _mutate(rng, text)


def _scalar(rng: np.random.Generator) -> Any:
    choice = rng.integers(7)
    if choice == 0:
        return int(rng.integers(-3, 6))
    if choice == 1:
        return float(rng.choice([0.5, -1.0, 1e300, NAN, INF, 5e-324]))
    if choice == 2:
        return bool(rng.random() < 0.5)
    if choice == 3:
        return _random_text(rng)
    if choice == 4:
        return [int(v) for v in rng.integers(-1, 5, int(rng.integers(0, 4)))]
    return _rule_text(rng)


def _entry(rng: np.random.Generator) -> Any:
    if rng.random() < 0.05:
        return _scalar(rng)
    entry: dict[str, Any] = {}
    if rng.random() < 0.9:
        entry["type"] = PRIMITIVES[rng.integers(len(PRIMITIVES))] if rng.random() < 0.9 \
            else _scalar(rng)
    kind = entry.get("type")
    if kind in ("GlobalMap", "FirstLayerMap", "LastLayerMap", "LayerMap", "RangeMap",
                "NameMap") or rng.random() < 0.2:
        entry["rule"] = _rule_text(rng) if rng.random() < 0.9 else _scalar(rng)
    if (isinstance(kind, str) and "TypeMap" in kind) or rng.random() < 0.2:
        entry["rules"] = {TYPE_KEYS[k]: _rule_text(rng)
                          for k in rng.integers(0, len(TYPE_KEYS), int(rng.integers(0, 3)))} \
            if rng.random() < 0.9 else _scalar(rng)
    for key in KEYS[3:]:
        if rng.random() < 0.25:
            entry[key] = {"index": lambda: [int(v) for v in rng.integers(1, 4, 2)],
                          "range": lambda: [int(v) for v in rng.integers(1, 5, 2)],
                          "n": lambda: int(rng.integers(-1, 5)),
                          "pattern": lambda: "conv*",
                          "extra": lambda: _scalar(rng)}[key]() if rng.random() < 0.7 \
                else _scalar(rng)
    return entry


def _document(rng: np.random.Generator) -> Any:
    if rng.random() < 0.05:
        return [_scalar(rng)]
    doc: dict[str, Any] = {}
    if rng.random() < 0.4:
        doc["preset"] = VALID_COMPOSITES[rng.integers(len(VALID_COMPOSITES))] \
            if rng.random() < 0.5 else _mutate(rng, VALID_COMPOSITES[0])
    if rng.random() < 0.9:
        doc["map"] = [_entry(rng) for _ in range(int(rng.integers(0, 4)))] \
            if rng.random() < 0.95 else _scalar(rng)
    if rng.random() < 0.05:
        doc["unknown"] = 1
    return doc


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == INF else repr(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


def _toml(doc: Any) -> str:
    if not isinstance(doc, dict):
        return f"x = {_toml_value(doc)}\n[x]\n"  # a doubled key: not valid TOML
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in doc.items())


def test_rule_files_property(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    good: dict[str, Composite] = {}
    errors = 0
    for i in range(500):
        doc = _document(rng)
        suffix = ".json" if i % 2 else ".toml"
        text = json.dumps(doc) if suffix == ".json" else _toml(doc)
        if rng.random() < 0.15:  # near-valid text: a mutated document
            text = _mutate(rng, text)
        path = tmp_path / f"rules{i}{suffix}"
        if rng.random() < 0.02:
            path.write_bytes(b"\xff\xfe" + text.encode("utf-8"))
        else:
            path.write_text(text, encoding="utf-8")
        composite = _parsed(load_rules, path, text, names=str(path))
        if composite is None:
            errors += 1
        else:
            good.setdefault(repr(composite), composite)
    assert errors > 100 and len(good) > 20, (errors, len(good))
    _some_compile_finite(good, rng)


def test_parse_rule_knows_every_rule() -> None:
    assert set(RULES) == {cls.__name__ for cls in ALL_RULES}


# -- docs/rules.md states every rule's valid range -----------------------------------------------
def test_docs_state_each_rules_valid_range() -> None:
    text = (ROOT / "docs" / "rules.md").read_text(encoding="utf-8")
    section = text[text.index("## Valid hyper-parameters"):]
    table = section[:section.find("\n## ", 5) if "\n## " in section[5:] else len(section)]
    for cls in ALL_RULES:
        assert f"`{cls.__name__}`" in table, cls.__name__
    for name in PRESETS:
        assert f"`{name}`" in table, name
