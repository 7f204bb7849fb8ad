"""Conservation properties of the compiled relevance pass (no reference implementation needed).

With bias-free layers every rule below redistributes exactly what arrives, so the input
relevance of each sample sums to the seed: 1 (one-hot, the default) or the target logit
(``normalize_output_relevance=False``). The stabilizer makes this approximate: an output ``z``
passes on ``R z / (z + eps)``, i.e. each layer loses ``eps * Σ_i R_i / z_i``, about
``eps / (typical |z|)`` of the relevance. With the default eps = 1e-6 and activations of ~0.3
that is ~3e-6 per layer (measured: 1.4e-5 over four layers), so the nets below are scaled to
activations of order 1-10 (inputs in [0, 4], weights 2/sqrt(fan_in)) and explained logits of
magnitude > 0.1, which keeps the total loss well under the 1e-5 relative tolerance.
"""

from __future__ import annotations

from collections.abc import Callable

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
from lrp_onnx.testing.references import Net

BATCH = 4
#: Relative tolerance of a per-sample sum (float32 model, stabilizer 1e-6, |logit| > 0.1).
RTOL = 1e-5


def _relu_conv_net(rng: np.random.Generator) -> Net:
    """Bias-free Conv+ReLU, Conv+ReLU, overlapping MaxPool, Flatten, Gemm (10 classes)."""
    net = Net(rng, (3, 8, 8))
    w1 = net.param("first/W", (6, 3, 3, 3), scale=2 / np.sqrt(27))
    y = net.node("Conv", [net.x, w1], "first/conv", pads=[1, 1, 1, 1])
    y = net.node("Relu", [y], "first/relu")
    w2 = net.param("mid/W", (6, 6, 3, 3), scale=2 / np.sqrt(54))
    y = net.node("Conv", [y, w2], "mid/conv", pads=[1, 1, 1, 1], strides=[2, 2])
    y = net.node("Relu", [y], "mid/relu")
    y = net.node("MaxPool", [y], "mid/pool", kernel_shape=[3, 3], strides=[2, 2],
                 pads=[1, 1, 1, 1])
    net.head(y, classes=10, bias=None, scale=2.0)
    return net


def _run(net: Net, composite: Composite, x: np.ndarray, target: np.ndarray,
         normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    compiled = LRP(net.model(), composite, normalize_output_relevance=normalize).model
    logits, relevance = ort_session(compiled).run(["logits", "relevance"],
                                                  {"x": x, "target": target})
    return logits, relevance


def _targets(net: Net, x: np.ndarray) -> np.ndarray:
    """``-1`` (argmax) for the first half of the batch, the argmin class for the rest: the
    explained logits are the extremes of 10, far from zero (checked by :func:`_explained`)."""
    logits = net.run64(x.astype(np.float64))
    target = logits.argmin(axis=1)
    target[: len(x) // 2] = -1
    return target.astype(np.int64)


def _explained(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    chosen = np.where(target < 0, logits.argmax(axis=1), target)
    value = logits[np.arange(len(logits)), chosen].astype(np.float64)
    assert np.all(np.abs(value) > 0.1), f"logits {value} too close to 0 for a 1e-5 check"
    return value


FIRST_LAYER_RULES = [
    ZeroRule(), EpsilonRule(), GammaRule(), GeneralizedGammaRule(), ZPlusRule(),
    AlphaBetaRule(2.0, 1.0), AlphaBetaRule(1.0, 0.0), WSquareRule(), FlatRule(),
    ZBoxRule(0.0, 4.0),
]


@pytest.mark.parametrize("first", FIRST_LAYER_RULES, ids=repr)
def test_relu_conv_net_conserves(first: Rule, rng: np.random.Generator) -> None:
    """ZeroRule everywhere but the first conv; every bias-free rule there conserves too."""
    net = _relu_conv_net(rng)
    x = rng.uniform(0.0, 4.0, size=(BATCH, 3, 8, 8)).astype(np.float32)
    target = _targets(net, x)
    logits, relevance = _run(net, Composite(NameMap("first/*", first)), x, target)
    _explained(logits, target)
    sums = relevance.astype(np.float64).reshape(BATCH, -1).sum(axis=1)
    np.testing.assert_allclose(sums, np.ones(BATCH), rtol=RTOL)


def test_unnormalized_seed_sums_to_the_target_logit(rng: np.random.Generator) -> None:
    net = _relu_conv_net(rng)
    x = rng.uniform(0.0, 4.0, size=(BATCH, 3, 8, 8)).astype(np.float32)
    target = _targets(net, x)
    logits, relevance = _run(net, Composite(ZeroRule()), x, target, normalize=False)
    sums = relevance.astype(np.float64).reshape(BATCH, -1).sum(axis=1)
    np.testing.assert_allclose(sums, _explained(logits, target), rtol=RTOL)
    # And it is the normalised relevance scaled by the logit.
    _, unit = _run(net, Composite(ZeroRule()), x, target)
    scaled = unit.astype(np.float64) * _explained(logits, target).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(relevance, scaled, rtol=RTOL, atol=1e-6 * np.abs(scaled).max())


# -- single layers on positive inputs: (build on x) ----------------------------------------------
def _maxpool(net: Net, x: str) -> str:
    return net.node("MaxPool", [x], "lut/pool", kernel_shape=[3, 3], strides=[2, 2],
                    pads=[1, 1, 1, 1])


def _avgpool(net: Net, x: str) -> str:
    return net.node("AveragePool", [x], "lut/pool", kernel_shape=[3, 3], strides=[2, 2],
                    pads=[1, 1, 1, 1], count_include_pad=1)


def _gap(net: Net, x: str) -> str:
    return net.node("GlobalAveragePool", [x], "lut/gap")


def _reduce_mean(net: Net, x: str) -> str:
    return net.node("ReduceMean", [x], "lut/mean", axes=[3], keepdims=0)


def _add_skip(net: Net, x: str) -> str:
    return net.node("Add", [net.node("Relu", [x], "lut/relu"), x], "lut/add")


def _add_conv_residual(net: Net, x: str) -> str:
    c = net.node("Conv", [x, net.param("lut/W", (3, 3, 3, 3))], "lut/conv", pads=[1, 1, 1, 1])
    return net.node("Add", [net.node("Relu", [c], "lut/relu"), x], "lut/add")


def _add_broadcast(net: Net, x: str) -> str:
    m = net.node("ReduceMean", [x], "lut/mean", axes=[2, 3], keepdims=1)
    return net.node("Add", [x, m], "lut/add")


def _concat(net: Net, x: str) -> str:
    return net.node("Concat", [x, net.node("Relu", [x], "lut/relu")], "lut/concat", axis=1)


LAYERS: dict[str, Callable[[Net, str], str]] = {
    "maxpool": _maxpool, "avgpool": _avgpool, "global_avgpool": _gap,
    "reducemean": _reduce_mean, "add_skip": _add_skip, "add_conv_residual": _add_conv_residual,
    "add_broadcast": _add_broadcast, "concat": _concat,
}


@pytest.mark.parametrize("build", LAYERS.values(), ids=LAYERS.keys())
def test_layer_conserves(build: Callable[[Net, str], str], rng: np.random.Generator) -> None:
    net = Net(rng, (3, 6, 6))
    net.head(build(net, net.x), classes=10, bias=None)
    x = rng.uniform(0.1, 2.0, size=(BATCH, 3, 6, 6)).astype(np.float32)
    target = _targets(net, x)
    logits, relevance = _run(net, Composite(ZeroRule()), x, target, normalize=False)
    sums = relevance.astype(np.float64).reshape(BATCH, -1).sum(axis=1)
    np.testing.assert_allclose(sums, _explained(logits, target), rtol=RTOL)


def test_routing_ops_conserve_exactly(rng: np.random.Generator) -> None:
    """Transpose/Reshape/Dropout/Flatten only move values: the relevance is bit-for-bit the
    relevance of the same head applied to the moved input, moved back."""
    routed = Net(rng, (3, 4, 5))
    y = routed.node("Transpose", [routed.x], "lut/transpose", perm=[0, 3, 1, 2])  # N,5,3,4
    shape = routed.const("lut/shape", np.array([-1, 10, 6]), dtype=np.int64)
    y = routed.node("Reshape", [y, shape], "lut/reshape")
    y = routed.node("Dropout", [y], "lut/dropout")
    routed.head(y, classes=4, bias=None)

    direct = Net(rng, (5 * 3 * 4,))
    direct.const("head/W", routed.inits["head/W"])
    direct.node("Gemm", [direct.x, "head/W"], "logits", transB=1)

    x = rng.uniform(-2.0, 2.0, size=(BATCH, 3, 4, 5)).astype(np.float32)
    moved = np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(BATCH, -1))
    target = np.array([0, 1, 2, 3], dtype=np.int64)
    _, r_routed = _run(routed, Composite(PassRule(), NameMap("logits", ZeroRule())), x, target)
    _, r_direct = _run(direct, Composite(ZeroRule()), moved, target)
    assert np.abs(r_direct).max() > 0
    back = r_direct.reshape(BATCH, 5, 3, 4).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(r_routed, back)
