"""The per-op x per-rule table: compile -> ONNX Runtime (CPU) -> compare with the
numpy matrix-form references of :mod:`lrp_onnx.testing.references`.

Every model is "layer under test" (nodes named ``lut/*``, which get the rule under test through a
``NameMap``) followed by a fixed head (``Flatten`` + ``Gemm`` under ZeroRule, bias 5 so the
logits are far from zero). The reference computes the head's relevance in numpy too, so the
relevance reaching the layer is known independently: it is ``∝ y`` (the layer's output), which
keeps the z-rule's ``R / stab(z)`` well conditioned in float32.

Conditioning (why some rules use a large stabilizer). ORT computes every denominator ``d`` in
float32, with an absolute rounding error ``δ`` of about 1e-7 times the sum of the magnitudes of
its terms; ``R / stab(d)`` then errs by about ``|R| δ / stab(d)²``. Where ``d`` is the layer's
own output ``z`` (ZeroRule) the arriving ``R`` is ``∝ z`` and the ratio is insensitive; where it
is sign-definite (z⁺, z⁻, W², the flat counts, the z^B term of in-bounds inputs) its error is
relative. Two kinds of rule case are not: ``EpsilonRule`` with ε between ~1e-4 and 1e-2
(``z / (z + ε)`` has slope up to 1/ε near z = 0) and denominators that are not ``z``
(``EpsilonRule(zero_bias)`` divides by ``Wx``; raw-input ``GammaRule`` by
``(W+γW⁺)x + b+γb⁺``, which crosses zero where z does not). Measured over 9 seeds, ε = 0.01 and
a Gamma stabilizer of 0.1 reached 1.1x the float32 tolerance, so those cases use ε = 0.1 (worst
0.4x) and a Gamma stabilizer of 1.0 (worst 0.2x) instead of loosening the tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

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
    Rule,
    WSquareRule,
    ZBoxRule,
    ZeroRule,
    ZPlusRule,
)
from lrp_onnx.testing import references as lt
from lrp_onnx.testing.references import Net

BATCH = 3
TARGETS = np.array([1, 4, 0], dtype=np.int64)


# -- inputs -----------------------------------------------------------------------------------
def uniform(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Both signs, inside [-2, 2] (so inside every ZBox bound used below)."""
    return rng.uniform(-2.0, 2.0, size=shape)


def small_ints(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Values in {-1, 0, 1, 2}: many ties inside pooling windows."""
    return rng.integers(-1, 3, size=shape).astype(np.float64)


# -- the op table -----------------------------------------------------------------------------
Build = Callable[[Net, str], tuple[str, str | None]]


@dataclass(frozen=True)
class OpCase:
    """One layer under test.

    ``build(net, x)`` emits the layer on ``x`` and returns ``(output, linear)`` where ``linear``
    is the value whose affine map from ``x`` the linear rules act on (the pre-activation), or
    ``None`` for a non-linear layer. ``kind`` picks the reference: ``linear`` (every linear rule),
    ``zmap`` (z-rule through the evaluated Jacobian: average pools, means), ``maxpool``,
    ``route`` (PassRule / routing) or ``custom`` (``ref(net, x, R, eps)``).
    """

    id: str
    sample: tuple[int, ...]
    build: Build
    kind: str
    nonneg: bool = False  # put a Relu (its own layer) before the layer under test
    inputs: Callable[[np.random.Generator, tuple[int, ...]], np.ndarray] = uniform
    feature_axis: int = 0  # axis of one sample that per-channel ZBox bounds vary along
    pool: dict = field(default_factory=dict)  # MaxPool geometry for the reference
    ref: Callable | None = None
    opset: int | None = None  # the model's opset, where the op needs a newer one than 17


def conv(cin: int, cout: int, kernel: tuple[int, ...], *, bias: bool = True, act: bool = False,
         **attrs) -> Build:
    def build(net: Net, x: str) -> tuple[str, str | None]:
        group = attrs.get("group", 1)
        w = net.param("lut/W", (cout, cin // group, *kernel))
        ins = [x, w] + ([net.param("lut/B", (cout,), scale=0.5)] if bias else [])
        z = net.node("Conv", ins, "lut/conv", **attrs)
        return (net.node("Relu", [z], "lut/relu") if act else z), z
    return build


def conv_bn(act: bool) -> Build:
    def build(net: Net, x: str) -> tuple[str, str | None]:
        w = net.param("lut/W", (4, 3, 3, 3))
        z = net.node("Conv", [x, w, net.param("lut/B", (4,), scale=0.5)], "lut/conv",
                     pads=[1, 1, 1, 1])
        # A negative scale flips the folded weights' signs (W⁺ and W⁻ swap).
        scale = net.const("lut/bn_scale", [1.5, -0.8, 0.6, 2.0])
        shift = net.param("lut/bn_shift", (4,), scale=0.5)
        mean = net.param("lut/bn_mean", (4,), scale=0.3)
        var = net.const("lut/bn_var", net.rng.uniform(0.5, 2.0, size=4))
        z = net.node("BatchNormalization", [z, scale, shift, mean, var], "lut/bn", epsilon=0.05)
        return (net.node("Relu", [z], "lut/relu") if act else z), z
    return build


def standalone_bn(act: bool) -> Build:
    """A BatchNormalization with no linear layer before it (DenseNet's pre-activation BN)."""
    def build(net: Net, x: str) -> tuple[str, str | None]:
        scale = net.const("lut/bn_scale", [1.5, -0.8, 0.6])
        shift = net.param("lut/bn_shift", (3,), scale=0.5)
        mean = net.param("lut/bn_mean", (3,), scale=0.3)
        var = net.const("lut/bn_var", net.rng.uniform(0.5, 2.0, size=3))
        z = net.node("BatchNormalization", [x, scale, shift, mean, var], "lut/bn", epsilon=0.05)
        return (net.node("Relu", [z], "lut/relu") if act else z), z
    return build


def conv_add_bias(with_conv_bias: bool) -> Build:
    def build(net: Net, x: str) -> tuple[str, str | None]:
        ins = [x, net.param("lut/W", (4, 3, 3, 3))]
        if with_conv_bias:
            ins.append(net.param("lut/B", (4,), scale=0.5))
        z = net.node("Conv", ins, "lut/conv")
        shape = (4, 1, 1) if with_conv_bias else (1, 4, 1, 1)
        z = net.node("Add", [z, net.param("lut/bias", shape, scale=0.5)], "lut/add")
        return z, z
    return build


def gemm(fin: int, fout: int, trans_b: int, *, c_shape: tuple[int, ...] | None = (5,),
         **attrs) -> Build:
    def build(net: Net, x: str) -> tuple[str, str | None]:
        w = net.param("lut/W", (fout, fin) if trans_b else (fin, fout), scale=1 / np.sqrt(fin))
        ins = [x, w] + ([net.param("lut/C", c_shape, scale=0.5)] if c_shape else [])
        z = net.node("Gemm", ins, "lut/gemm", transB=trans_b, **attrs)
        return z, z
    return build


def matmul_add(fin: int, fout: int) -> Build:
    def build(net: Net, x: str) -> tuple[str, str | None]:
        z = net.node("MatMul", [x, net.param("lut/W", (fin, fout), scale=1 / np.sqrt(fin))],
                     "lut/matmul")
        z = net.node("Add", [z, net.param("lut/bias", (fout,), scale=0.5)], "lut/add")
        return z, z
    return build


def single(op: str, *extra: Callable[[Net], str], **attrs) -> Build:
    """A one-node layer ``op(x, *extra)``."""
    def build(net: Net, x: str) -> tuple[str, str | None]:
        return net.node(op, [x, *(e(net) for e in extra)], f"lut/{op.lower()}", **attrs), None
    return build


def ints(*values: int) -> Callable[[Net], str]:
    def make(net: Net) -> str:
        name = f"lut/shape{len(net.inits)}"
        net.const(name, np.asarray(values), dtype=np.int64)
        return name
    return make


def maxpool_case(id: str, sample: tuple[int, ...], kernel: list[int], strides: list[int],
                 pads: list[int], inputs=uniform, **attrs) -> OpCase:
    return OpCase(id, sample, single("MaxPool", kernel_shape=kernel, strides=strides, pads=pads,
                                     **attrs),
                  "maxpool", inputs=inputs,
                  pool={"kernel": kernel, "strides": strides,
                        "pads": pads[:len(kernel)], "dilations": attrs.get("dilations")})


# Custom references: ``ref(net, x, R, eps)`` with x the layer input, R at the layer output.
def ref_add_skip(net: Net, x: np.ndarray, R: np.ndarray, eps: float) -> np.ndarray:
    r_relu, r_x = lt.ref_add([np.maximum(x, 0), x], R, eps)
    return r_relu + r_x  # the Relu branch passes its share through


def ref_add_broadcast(net: Net, x: np.ndarray, R: np.ndarray, eps: float) -> np.ndarray:
    m = x.mean(axis=(2, 3), keepdims=True)
    r_x, r_m = lt.ref_add([x, m], R, eps)
    # ReduceMean under the z-rule: x * (R_m / stab(m)) / (H*W).
    return r_x + x * (r_m / lt.stabilize(m, eps)) / (x.shape[2] * x.shape[3])


def ref_add_const(net: Net, x: np.ndarray, R: np.ndarray, eps: float) -> np.ndarray:
    return lt.ref_add([x, net.inits["lut/c"]], R, eps)[0]  # the constant absorbs the rest


def ref_add_residual(net: Net, x: np.ndarray, R: np.ndarray, eps: float) -> np.ndarray:
    W, b = net.linear_map(input=net.x, output="lut/conv", prefixes=("lut/conv",))
    conv_out = (x.reshape(len(x), -1) @ W.T + b).reshape(R.shape)
    r_x, r_conv = lt.ref_add([x, conv_out], R, eps)
    r_through = lt.ref_epsilon(W, b, x.reshape(len(x), -1), r_conv.reshape(len(x), -1), eps)
    return r_x + r_through.reshape(x.shape)


def ref_concat_transpose(net: Net, x: np.ndarray, R: np.ndarray, eps: float) -> np.ndarray:
    r_x, r_t = lt.ref_concat([x.shape[1], x.shape[1]], R, axis=1)
    return r_x + r_t.transpose(0, 1, 3, 2)  # the Transpose branch routes its share back


def ref_concat_mean(net: Net, x: np.ndarray, R: np.ndarray, eps: float) -> np.ndarray:
    m = x.mean(axis=2, keepdims=True)
    r_x, r_m = lt.ref_concat([x.shape[2], 1], R, axis=2)
    return r_x + x * (r_m / lt.stabilize(m, eps)) / x.shape[2]  # ReduceMean under the z-rule


def _residual(net: Net, x: str) -> tuple[str, str | None]:
    w = net.param("lut/W", (3, 3, 3, 3))
    c = net.node("Conv", [x, w, net.param("lut/B", (3,), scale=0.5)], "lut/conv",
                 pads=[1, 1, 1, 1])
    return net.node("Add", [x, c], "lut/add"), None


def _add_skip(net: Net, x: str) -> tuple[str, str | None]:
    return net.node("Add", [net.node("Relu", [x], "lut/relu"), x], "lut/add"), None


def _sum_skip(net: Net, x: str) -> tuple[str, str | None]:
    return net.node("Sum", [net.node("Relu", [x], "lut/relu"), x], "lut/sum"), None


def _add_broadcast(net: Net, x: str) -> tuple[str, str | None]:
    m = net.node("ReduceMean", [x], "lut/mean", axes=[2, 3], keepdims=1)
    return net.node("Add", [x, m], "lut/add"), None


def _add_const(net: Net, x: str) -> tuple[str, str | None]:
    c = net.param("lut/c", (3, 1, 1), scale=1.0)
    return net.node("Add", [x, c], "lut/add"), None


def _concat_transpose(net: Net, x: str) -> tuple[str, str | None]:
    t = net.node("Transpose", [x], "lut/transpose", perm=[0, 1, 3, 2])
    return net.node("Concat", [x, t], "lut/concat", axis=1), None


def _concat_mean(net: Net, x: str) -> tuple[str, str | None]:
    m = net.node("ReduceMean", [x], "lut/mean", axes=[2], keepdims=1)
    return net.node("Concat", [x, m], "lut/concat", axis=2), None


LINEAR_CASES = [
    OpCase("conv", (3, 6, 6), conv(3, 4, (3, 3), pads=[1, 1, 1, 1]), "linear"),
    OpCase("conv_stride2", (3, 7, 7), conv(3, 4, (3, 3), strides=[2, 2], pads=[1, 1, 1, 1]),
           "linear"),
    OpCase("conv_asym_pads", (3, 6, 5), conv(3, 4, (3, 3), pads=[1, 0, 2, 1]), "linear"),
    OpCase("conv_same_upper", (3, 7, 6),
           conv(3, 4, (4, 3), strides=[2, 1], auto_pad="SAME_UPPER"), "linear"),
    OpCase("conv_same_lower", (3, 6, 6), conv(3, 4, (4, 2), auto_pad="SAME_LOWER"), "linear"),
    OpCase("conv_dilation2", (3, 7, 7), conv(3, 4, (3, 3), dilations=[2, 2], pads=[2, 1, 2, 1]),
           "linear"),
    OpCase("conv_groups2", (4, 5, 5), conv(4, 6, (3, 3), group=2, pads=[1, 1, 1, 1]), "linear"),
    OpCase("conv_depthwise", (4, 5, 5), conv(4, 4, (3, 3), group=4, pads=[1, 1, 1, 1]),
           "linear"),
    OpCase("conv1d", (3, 10), conv(3, 4, (3,), strides=[2], pads=[1, 1]), "linear"),
    OpCase("conv3d", (2, 4, 4, 3), conv(2, 3, (2, 2, 2), pads=[1, 0, 1, 0, 1, 0]), "linear"),
    OpCase("conv_no_bias", (3, 6, 6), conv(3, 4, (3, 3), bias=False, strides=[2, 2]),
           "linear"),
    OpCase("conv_relu", (3, 6, 6), conv(3, 4, (3, 3), act=True, pads=[1, 1, 1, 1]), "linear"),
    OpCase("conv_bn", (3, 5, 5), conv_bn(act=False), "linear"),
    OpCase("conv_bn_relu", (3, 5, 5), conv_bn(act=True), "linear"),
    OpCase("conv_add_bias", (3, 5, 5), conv_add_bias(with_conv_bias=False), "linear"),
    OpCase("bn", (3, 4, 4), standalone_bn(act=False), "linear"),
    OpCase("bn_relu", (3, 4, 4), standalone_bn(act=True), "linear"),
    OpCase("conv_bias_add_bias", (3, 5, 5), conv_add_bias(with_conv_bias=True), "linear"),
    # Non-negative input (after a Relu): the engine drops every x⁻ term at compile time.
    OpCase("conv_nonneg_input", (3, 6, 6), conv(3, 4, (3, 3), pads=[1, 1, 1, 1]), "linear",
           nonneg=True),
    OpCase("gemm_transB0", (8,), gemm(8, 5, 0), "linear"),
    OpCase("gemm_transB1", (8,), gemm(8, 5, 1, c_shape=(1, 5)), "linear"),
    OpCase("gemm_alpha_beta", (8,), gemm(8, 5, 1, alpha=0.5, beta=2.0), "linear"),
    # A negative alpha changes which weights count as positive: (αW)⁺ = αW⁻.
    OpCase("gemm_neg_alpha_beta", (8,), gemm(8, 5, 0, alpha=-0.7, beta=-1.5), "linear"),
    OpCase("gemm_no_bias", (8,), gemm(8, 5, 1, c_shape=None), "linear"),
    OpCase("gemm_nonneg_input", (8,), gemm(8, 5, 1), "linear", nonneg=True),
    OpCase("matmul_add_2d", (8,), matmul_add(8, 5), "linear"),
    OpCase("matmul_add_3d", (4, 8), matmul_add(8, 5), "linear", feature_axis=1),
]

NONLINEAR_CASES = [
    maxpool_case("maxpool_3x3_s2_p1", (3, 7, 7), [3, 3], [2, 2], [1, 1, 1, 1]),
    maxpool_case("maxpool_ceil", (2, 7, 6), [2, 2], [2, 2], [0, 0, 0, 0], ceil_mode=1),
    maxpool_case("maxpool_ties", (3, 6, 6), [3, 3], [1, 1], [1, 1, 1, 1], inputs=small_ints),
    maxpool_case("maxpool_dilation2", (2, 7, 7), [2, 2], [1, 1], [0, 0, 0, 0],
                 dilations=[2, 2]),
    maxpool_case("maxpool_1d", (3, 9), [3], [2], [1, 1]),
    OpCase("global_maxpool", (3, 4, 5), single("GlobalMaxPool"), "maxpool",
           pool={"global": True}),
    OpCase("global_maxpool_ties", (3, 4, 5), single("GlobalMaxPool"), "maxpool",
           inputs=small_ints, pool={"global": True}),
    OpCase("avgpool_pad_exclude", (3, 6, 6),
           single("AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0),
           "zmap"),
    OpCase("avgpool_pad_include", (3, 6, 6),
           single("AveragePool", kernel_shape=[3, 3], pads=[1, 0, 1, 2], count_include_pad=1),
           "zmap"),
    OpCase("avgpool_ceil", (2, 7, 6),
           single("AveragePool", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1), "zmap"),
    OpCase("avgpool_stride2", (3, 7, 7),
           single("AveragePool", kernel_shape=[3, 3], strides=[2, 2]), "zmap"),
    OpCase("global_avgpool", (3, 4, 5), single("GlobalAveragePool"), "zmap"),
    OpCase("reducemean_keepdims1", (3, 4, 5),
           single("ReduceMean", axes=[2, 3], keepdims=1), "zmap"),
    OpCase("reducemean_keepdims0", (3, 4, 5),
           single("ReduceMean", axes=[-1, 2], keepdims=0), "zmap"),
    OpCase("reducemean_tokens", (4, 6), single("ReduceMean", axes=[1], keepdims=0), "zmap"),
    OpCase("add_relu_skip", (3, 4, 4), _add_skip, "custom", ref=ref_add_skip),
    OpCase("sum_relu_skip", (3, 4, 4), _sum_skip, "custom", ref=ref_add_skip),
    OpCase("add_broadcast", (3, 4, 5), _add_broadcast, "custom", ref=ref_add_broadcast),
    OpCase("add_const", (3, 4, 4), _add_const, "custom", ref=ref_add_const),
    OpCase("add_conv_residual", (3, 4, 4), _residual, "custom", ref=ref_add_residual),
    # Unequal branches, so that handing a slice to the wrong input would be caught.
    OpCase("concat_channels", (3, 4, 4), _concat_transpose, "custom", ref=ref_concat_transpose),
    OpCase("concat_axis2_sizes_4_1", (3, 4, 5), _concat_mean, "custom", ref=ref_concat_mean),
]

def floats(*values: float) -> Callable[[Net], str]:
    def make(net: Net) -> str:
        return net.const(f"lut/value{len(net.inits)}", np.asarray(values).reshape(-1)[0]
                         if len(values) == 1 else np.asarray(values))
    return make


#: Standalone elementwise activations: relevance passes them unchanged (Zennit's Pass).
ACTIVATION_CASES = [
    OpCase(f"act_{op.lower()}", (3, 4, 2), single(op, *extra, **attrs), "route", opset=opset)
    for op, extra, attrs, opset in [
        ("Relu", (), {}, None), ("LeakyRelu", (), {"alpha": 0.1}, None),
        ("PRelu", (floats(0.25),), {}, None), ("Clip", (floats(0.0), floats(6.0)), {}, None),
        ("Sigmoid", (), {}, None), ("Tanh", (), {}, None), ("HardSigmoid", (), {}, None),
        ("HardSwish", (), {}, None), ("Gelu", (), {}, 20), ("Elu", (), {}, None),
        ("Selu", (), {}, None), ("Celu", (), {}, None), ("Softplus", (), {}, None),
        ("Softsign", (), {}, None), ("Mish", (), {}, 18),
        ("ThresholdedRelu", (), {"alpha": 0.1}, None),
    ]
]

ROUTE_CASES = [
    *ACTIVATION_CASES,
    OpCase("squeeze", (3, 1, 2), single("Squeeze", ints(2)), "route"),
    OpCase("unsqueeze", (3, 4, 2), single("Unsqueeze", ints(1)), "route"),
    OpCase("flatten", (3, 4, 2), single("Flatten", axis=1), "route"),
    OpCase("reshape", (3, 4, 2), single("Reshape", ints(-1, 2, 12)), "route"),
    OpCase("transpose", (3, 4, 2), single("Transpose", perm=[0, 2, 3, 1]), "route"),
    OpCase("relu", (3, 4, 2), single("Relu"), "route"),
    OpCase("dropout", (3, 4, 2), single("Dropout"), "route"),
]

#: The op table: a new op (or geometry) is one more row here; ``kind`` picks the tests.
OP_CASES: list[OpCase] = [*LINEAR_CASES, *NONLINEAR_CASES, *ROUTE_CASES]


def cases(*kinds: str) -> list[OpCase]:
    return [c for c in OP_CASES if c.kind in kinds]


# -- the rule table ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RuleCase:
    """A rule (made for an op case) and its matrix-form reference ``ref(W, b, x, R, bounds)``."""

    id: str
    make: Callable[[OpCase], Rule]
    ref: Callable


def channel_bounds(case: OpCase) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ZBox bounds that vary along the case's feature axis and contain [-2, 2]."""
    n = case.sample[case.feature_axis]
    shape = [1] * len(case.sample)
    shape[case.feature_axis] = n
    if case.feature_axis == len(case.sample) - 1:
        shape = [n]  # a trailing axis broadcasts without the leading ones
    return (-2.0 - 0.25 * np.arange(1, n + 1)).reshape(shape), \
        (2.0 + 0.5 * np.arange(1, n + 1)).reshape(shape)


def _zbox_ref(lo, hi):
    def ref(W, b, x, R, case):
        low, high = (np.broadcast_to(np.asarray(v, np.float64), case.sample).reshape(-1)
                     for v in (lo(case), hi(case)))
        return lt.ref_zbox(W, b, x, R, low, high)
    return ref


RULE_CASES = [
    RuleCase("zero", lambda c: ZeroRule(), lambda W, b, x, R, c: lt.ref_zero(W, b, x, R)),
    RuleCase("epsilon", lambda c: EpsilonRule(epsilon=0.1),
             lambda W, b, x, R, c: lt.ref_epsilon(W, b, x, R, 0.1)),
    # Denominator Wx (no bias) is not ∝ R: moderate epsilon (see the module docstring).
    RuleCase("epsilon_zero_bias", lambda c: EpsilonRule(epsilon=0.1, zero_bias=True),
             lambda W, b, x, R, c: lt.ref_epsilon(W, b, x, R, 0.1, zero_bias=True)),
    # Raw-input gamma: the denominator can cross zero where z does not (module docstring).
    RuleCase("gamma", lambda c: GammaRule(gamma=0.25, stabilizer=1.0),
             lambda W, b, x, R, c: lt.ref_gamma(W, b, x, R, 0.25, 1.0)),
    RuleCase("generalized_gamma", lambda c: GeneralizedGammaRule(gamma=0.5),
             lambda W, b, x, R, c: lt.ref_generalized_gamma(W, b, x, R, 0.5)),
    RuleCase("zplus", lambda c: ZPlusRule(), lambda W, b, x, R, c: lt.ref_zplus(W, b, x, R)),
    RuleCase("zplus_zero_bias", lambda c: ZPlusRule(zero_bias=True),
             lambda W, b, x, R, c: lt.ref_zplus(W, b, x, R, zero_bias=True)),
    RuleCase("alpha2_beta1", lambda c: AlphaBetaRule(2.0, 1.0),
             lambda W, b, x, R, c: lt.ref_alpha_beta(W, b, x, R, 2.0, 1.0)),
    RuleCase("alpha1_beta0", lambda c: AlphaBetaRule(1.0, 0.0),
             lambda W, b, x, R, c: lt.ref_alpha_beta(W, b, x, R, 1.0, 0.0)),
    RuleCase("wsquare", lambda c: WSquareRule(), lambda W, b, x, R, c: lt.ref_wsquare(W, b, x, R)),
    RuleCase("wsquare_zero_bias", lambda c: WSquareRule(zero_bias=True),
             lambda W, b, x, R, c: lt.ref_wsquare(W, b, x, R, zero_bias=True)),
    RuleCase("flat", lambda c: FlatRule(), lambda W, b, x, R, c: lt.ref_flat(W, b, x, R)),
    RuleCase("zbox", lambda c: ZBoxRule(-3.0, 3.0),
             _zbox_ref(lambda c: -3.0, lambda c: 3.0)),
    RuleCase("zbox_per_channel", lambda c: ZBoxRule(*channel_bounds(c)),
             _zbox_ref(lambda c: channel_bounds(c)[0], lambda c: channel_bounds(c)[1])),
]

Z_RULE_CASES = [
    (ZeroRule(), 1e-6),
    # A large stabilizer, so that a z-rule that differs from its reference only through the
    # stabilizer (MaxPool under ZeroRule routes exactly, without one) is caught.
    (ZeroRule(stabilizer=0.1), 0.1),
    (EpsilonRule(epsilon=0.1), 0.1),
]


# -- the harness -------------------------------------------------------------------------------
def run_case(case: OpCase, rule: Rule, rng: np.random.Generator,
             dtype=np.float32) -> tuple[Net, np.ndarray, np.ndarray, np.ndarray, str, str | None]:
    """Build, compile and run ``case`` with ``rule`` on the ``lut/`` nodes.

    Returns ``(net, relevance, x_lut, R_y, y, linear)``: the compiled model's relevance, the
    layer input (float64), the relevance reaching the layer output (reference), and names.
    """
    net = Net(rng, case.sample)
    if case.opset is not None:
        net.opset = case.opset
    x_name = net.node("Relu", [net.x], x_lut_name(case)) if case.nonneg else net.x
    y, linear = case.build(net, x_name)
    net.head(y)
    x = case.inputs(rng, (BATCH, *case.sample)).astype(dtype)

    compiled = LRP(net.model(dtype), Composite(NameMap("lut/*", rule))).model
    logits, relevance = ort_session(compiled).run(["logits", "relevance"],
                                                  {"x": x, "target": TARGETS})

    x64 = x.astype(np.float64)
    # The forward outputs are the model's own: check them against the float64 evaluator.
    np.testing.assert_allclose(logits, net.run64(x64), rtol=1e-5, atol=1e-5)
    x_lut = net.run64(x64, output=x_name) if case.nonneg else x64
    y64 = net.run64(x64, output=y)
    w_head, b_head = net.head_params
    r_y = lt.ref_head(w_head, b_head, y64, TARGETS)
    return net, relevance, x_lut, r_y, y, linear


def x_lut_name(case: OpCase) -> str:
    """The layer's input value: the graph input, or the Relu in front of it."""
    return "pre/relu" if case.nonneg else "x"


def _check(relevance: np.ndarray, expected: np.ndarray, dtype) -> None:
    assert np.abs(expected).max() > 0, "degenerate case: the reference relevance is all zero"
    lt.assert_relevance_close(relevance, expected, dtype)


@pytest.mark.parametrize("rule_case", RULE_CASES, ids=lambda r: r.id)
@pytest.mark.parametrize("case", cases("linear"), ids=lambda c: c.id)
def test_linear_rule(case: OpCase, rule_case: RuleCase, rng: np.random.Generator) -> None:
    net, relevance, x_lut, r_y, _, linear = run_case(case, rule_case.make(case), rng)
    W, b = net.linear_map(input=x_lut_name(case), output=linear)
    n = len(x_lut)
    expected = rule_case.ref(W, b, x_lut.reshape(n, -1), r_y.reshape(n, -1), case)
    # With ``nonneg`` the Relu in front of the layer passes the layer's input relevance as is.
    _check(relevance, expected.reshape(relevance.shape), np.float32)


@pytest.mark.parametrize("rule_eps", Z_RULE_CASES, ids=lambda r: repr(r[0]))
@pytest.mark.parametrize("case", cases("zmap", "maxpool", "custom"), ids=lambda c: c.id)
def test_nonlinear_layer(case: OpCase, rule_eps: tuple[Rule, float],
                         rng: np.random.Generator) -> None:
    rule, eps = rule_eps
    net, relevance, x_lut, r_y, y, _ = run_case(case, rule, rng)
    if case.kind == "zmap":
        J, b = net.linear_map(input="x", output=y)
        assert np.all(b == 0)
        n = len(x_lut)
        expected = lt.ref_z_map(J, x_lut.reshape(n, -1), r_y.reshape(n, -1), eps)
    elif case.kind == "maxpool":
        # ZeroRule routes relevance to the winner exactly (no stabilizer); EpsilonRule keeps
        # the factor y / stab(y).
        eps_or_none = None if isinstance(rule, ZeroRule) else eps
        if case.pool.get("global"):
            expected, y_ref = lt.ref_global_maxpool(x_lut, r_y, eps=eps_or_none)
        else:
            expected, y_ref = lt.ref_maxpool(x_lut, r_y, eps=eps_or_none, **case.pool)
        # The reference's windows reproduce the forward (geometry check of the reference).
        np.testing.assert_array_equal(y_ref, net.run64(x_lut, output=y))
    else:
        assert case.ref is not None
        expected = case.ref(net, x_lut, r_y, eps)
    _check(relevance, expected.reshape(relevance.shape), np.float32)


@pytest.mark.parametrize("rule", [PassRule(), ZeroRule(), EpsilonRule(epsilon=0.1)], ids=repr)
@pytest.mark.parametrize("case", cases("route"), ids=lambda c: c.id)
def test_routing_layer(case: OpCase, rule: Rule, rng: np.random.Generator) -> None:
    net, relevance, x_lut, r_y, y, _ = run_case(case, rule, rng)
    if case.id == "relu" or case.id.startswith("act_"):
        expected = r_y  # activations pass R unchanged (Relu: zero where its output, hence R, is)
    else:
        J, _ = net.linear_map(input="x", output=y)
        expected = lt.ref_route(J, r_y.reshape(len(r_y), -1))
    _check(relevance, expected.reshape(relevance.shape), np.float32)


# ONNX Runtime's CPU provider has no double Conv/AveragePool/GlobalAveragePool, so float64 is
# checked on the dense layers only.
@pytest.mark.parametrize("rule_case", [r for r in RULE_CASES if r.id in
                                       ("zero", "zplus", "alpha2_beta1", "zbox")],
                         ids=lambda r: r.id)
@pytest.mark.parametrize("case", [c for c in cases("linear") if c.id.startswith(("gemm", "mat"))],
                         ids=lambda c: c.id)
def test_float64_model(case: OpCase, rule_case: RuleCase, rng: np.random.Generator) -> None:
    """A float64 model is compiled and runs in float64 (constants follow the model's dtype)."""
    net, relevance, x_lut, r_y, _, linear = run_case(case, rule_case.make(case), rng, np.float64)
    W, b = net.linear_map(input=x_lut_name(case), output=linear)
    n = len(x_lut)
    expected = rule_case.ref(W, b, x_lut.reshape(n, -1), r_y.reshape(n, -1), case)
    _check(relevance, expected.reshape(relevance.shape), np.float64)


def test_stabilizer_sign_of_zero() -> None:
    """An output with ``z == 0`` exactly is divided by ``+eps`` (``sign(0) = +1``).

    The relevance reaching the layer must not be ``∝ z`` here, so the head uses FlatRule; the
    inputs and weights are small dyadic numbers, so ``z == 0`` also holds exactly in float32.
    """
    net = Net(np.random.default_rng(0), (4,))
    W = np.array([[1.0, -1.0, 0.5, -0.5], [1.0, 2.0, 0.0, 1.0], [-1.0, 0.5, 1.0, 0.25]])
    b = np.array([0.0, 0.5, -0.25])
    y = net.node("Gemm", [net.x, net.const("lut/W", W), net.const("lut/C", b)], "lut/gemm",
                 transB=1)
    net.head(y)
    x = np.array([[1.0, 1.0, 2.0, 2.0], [2.0, 2.0, 1.0, 1.0]], dtype=np.float32)
    target = np.array([0, 3], dtype=np.int64)
    composite = Composite(NameMap("lut/*", ZeroRule()), NameMap("logits", FlatRule()))
    compiled = LRP(net.model(), composite).model
    relevance = ort_session(compiled).run(["relevance"], {"x": x, "target": target})[0]

    x64 = x.astype(np.float64)
    y64 = x64 @ W.T + b
    assert np.all(y64[:, 0] == 0)
    w_head, b_head = net.head_params
    seed = np.eye(w_head.shape[0])[target]
    r_y = lt.ref_flat(w_head, b_head, y64, seed)
    expected = lt.ref_zero(W, b, x64, r_y)
    assert np.abs(expected).max() > 1e4  # the z == 0 output dominates: R / 1e-6
    _check(relevance, expected, np.float32)
