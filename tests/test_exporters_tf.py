"""Keras CNNs converted by tf2onnx, against a numpy reference written from the LRP formulas.

The fixtures ``tests/data/keras_*.onnx`` and ``keras_samples.npz`` are written by
``scripts/export_keras_cnn.py`` (TensorFlow 2.21, tf2onnx 1.17, in a separate venv; this file
never imports TensorFlow). They take NHWC input ``[N, H, W, C]``; tf2onnx puts a
``Transpose(perm=[0, 3, 1, 2])`` in front of the first Conv and a ``Transpose(perm=[0, 2, 3, 1])``
before the Keras Flatten, so the relevance comes back NHWC, in the input's layout.

The reference reads the weights from the ONNX file (initializers of the Conv and MatMul/Add
nodes, in graph order; numpy and onnx only), builds each convolution's dense matrix from its
kernel, ``pads``, ``strides`` and ``group``, runs the forward pass in float64 and the rules in
matrix form (:mod:`lrp_onnx.testing.references`: ``ref_epsilon``, ``ref_zplus``, ``ref_flat``,
``ref_maxpool``, ``ref_z_map``), with the layouts done by hand: NHWC -> NCHW at the input, the
Flatten over NHWC (``H, W, C`` order) and back. The compiled graph is compared twice: run in float64
(:mod:`lrp_onnx.testing.float64`) at the float64 tolerances of
:func:`~lrp_onnx.testing.references.assert_relevance_close` (``rtol=1e-10``,
``atol=1e-12·max|R|``), and run by ONNX Runtime in float32 at ``rtol=1e-5``,
``atol=2e-5·max|R|`` (float32 rounding, measured below that).

``keras_depthwise_unoptimized.onnx`` computes its depthwise kernel from initializers
(``Transpose(Reshape(W, shape))``, tf2onnx with its optimizers off): its tests run once
``lrp_onnx`` folds constant sub-graphs (probed below, not assumed). Its depthwise bias is a
separate NHWC ``Add`` after the output ``Transpose``, so it is a layer of its own (ZeroRule's
proportional split) instead of part of the conv rule's denominator: the reference follows the
graph as written. (Under ZeroRule the two exports agree up to the stabilizer: ``x·W·R_z/stab(z)``
with ``R_z = z·R/stab(z+b)`` against ``x·W·R/stab(z+b)``; measured 7.9e-5·max|R| apart.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import ort_session
from lrp_onnx import (
    LRP,
    Composite,
    ConvLayer,
    DenseLayer,
    EpsilonPlus,
    EpsilonPlusFlat,
    EpsilonRule,
    GlobalTypeMap,
    check,
)
from lrp_onnx.testing import float64
from lrp_onnx.testing.references import (
    assert_relevance_close,
    ref_add,
    ref_epsilon,
    ref_flat,
    ref_maxpool,
    ref_z_map,
    ref_zplus,
)

DATA = Path(__file__).parent / "data"
SAMPLES = np.load(DATA / "keras_samples.npz")
#: the ε of the all-epsilon composite (large enough to change the result visibly); the
#: reference uses its float32 value, the one the compiled graph holds
EPS = float(np.float32(0.01))
#: fixed targets of the eight explained samples (the four stored ones and the same minus 0.5)
TARGETS = np.array([0, 1, 2, 3, 4, 0, 1, 2], dtype=np.int64)
#: stem -> architecture (the key of its input in keras_samples.npz)
ARCH = {
    "keras_cnn": "cnn_max",
    "keras3_cnn_softmax": "cnn_avg",
    "keras_cnn_unoptimized": "cnn_max",
    "keras_depthwise": "depthwise",
    "keras_depthwise_unoptimized": "depthwise",
}


def _epsilon() -> Composite:
    return Composite(GlobalTypeMap({ConvLayer: EpsilonRule(epsilon=EPS),
                                    DenseLayer: EpsilonRule(epsilon=EPS)}))


#: composite name -> (constructor, rule of the first conv, of the other convs, dense ε)
COMPOSITES: dict[str, tuple[Any, str, str, float]] = {
    "Epsilon": (_epsilon, "epsilon", "epsilon", EPS),
    "EpsilonPlus": (EpsilonPlus, "zplus", "zplus", 1e-6),
    "EpsilonPlusFlat": (EpsilonPlusFlat, "flat", "zplus", 1e-6),
}


# -- reading the fixture (numpy and onnx only) -----------------------------------------------------
def _params(path: Path) -> tuple[list[dict[str, Any]], list[tuple[np.ndarray, np.ndarray]]]:
    """Conv layers (W, b, pads, strides, group) and dense layers (W [in, out], b), in order."""
    model = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    convs, dense = [], []
    nodes = list(model.graph.node)
    for i, node in enumerate(nodes):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            assert attrs.get("auto_pad", b"NOTSET") == b"NOTSET"
            assert list(attrs.get("dilations", [1, 1])) == [1, 1]
            w = inits[node.input[1]]
            convs.append({"W": w, "b": inits[node.input[2]],
                          "pads": list(attrs.get("pads", [0, 0, 0, 0])),
                          "strides": list(attrs.get("strides", [1, 1])),
                          "group": int(attrs.get("group", 1))})
        elif node.op_type == "MatMul":
            add = nodes[i + 1]
            assert add.op_type == "Add" and add.input[0] == node.output[0]
            dense.append((inits[node.input[1]], inits[add.input[1]]))
    return convs, dense


def conv_matrix(conv: dict[str, Any], in_shape: tuple[int, int, int]) -> tuple[np.ndarray,
                                                                                 np.ndarray,
                                                                                 tuple[int, ...]]:
    """Dense matrix ``J`` [O, D] and bias [O] of an ONNX Conv on one ``[C, H, W]`` sample
    (``y = J x + b`` over C-order flattening); taps in the padding are left out."""
    w, pads, strides, group = conv["W"], conv["pads"], conv["strides"], conv["group"]
    cout, cin_g, kh, kw = w.shape
    c, h, wd = in_shape
    oh = (h + pads[0] + pads[2] - kh) // strides[0] + 1
    ow = (wd + pads[1] + pads[3] - kw) // strides[1] + 1
    J = np.zeros((cout, oh, ow, c, h, wd))
    oy, ox = np.meshgrid(np.arange(oh), np.arange(ow), indexing="ij")
    for o in range(cout):
        g = o // (cout // group)
        for k in range(cin_g):
            ci = g * cin_g + k
            for ky in range(kh):
                for kx in range(kw):
                    iy = oy * strides[0] - pads[0] + ky
                    ix = ox * strides[1] - pads[1] + kx
                    ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < wd)
                    J[o, oy[ok], ox[ok], ci, iy[ok], ix[ok]] += w[o, k, ky, kx]
    bias = np.repeat(conv["b"], oh * ow)
    return J.reshape(cout * oh * ow, c * h * wd), bias, (cout, oh, ow)


def _mean_matrix(groups: int, size: int) -> np.ndarray:
    """``J`` of a mean over ``size`` consecutive entries, ``groups`` times."""
    return np.kron(np.eye(groups), np.full((1, size), 1.0 / size))


def _avgpool_matrix(shape: tuple[int, int, int], k: int) -> np.ndarray:
    c, h, w = shape
    J = np.zeros((c, h // k, w // k, c, h, w))
    for ci in range(c):
        for y in range(h // k):
            for x in range(w // k):
                J[ci, y, x, ci, y * k:(y + 1) * k, x * k:(x + 1) * k] = 1.0 / (k * k)
    return J.reshape(c * (h // k) * (w // k), c * h * w)


def _conv_rule(rule: str, J: np.ndarray, b: np.ndarray, x: np.ndarray, R: np.ndarray,
               eps: float) -> np.ndarray:
    if rule == "epsilon":
        return ref_epsilon(J, b, x, R, eps)
    if rule == "zplus":
        return ref_zplus(J, b, x, R)
    assert rule == "flat"
    return ref_flat(J, b, x, R)


def reference(stem: str, x: np.ndarray, target: np.ndarray,
              composite: str) -> tuple[np.ndarray, np.ndarray]:
    """Logits and the NHWC input relevance of the fixture ``stem`` (float64)."""
    arch = ARCH[stem]
    # The unoptimized depthwise file keeps its kernel in HWCM form: read the optimized twin.
    path = DATA / f"{stem.replace('_unoptimized', '')}.onnx"
    convs, dense = _params(path)
    _, first_rule, conv_rule, dense_eps = COMPOSITES[composite]
    n = len(x)
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    xc = x.astype(np.float64).transpose(0, 3, 1, 2)  # the Transpose tf2onnx puts first
    J1, b1, s1 = conv_matrix(convs[0], xc.shape[1:])
    x1 = xc.reshape(n, -1)
    a1 = relu(x1 @ J1.T + b1)
    if arch == "depthwise":
        J2, b2, s2 = conv_matrix(convs[1], s1)
        a2 = relu(a1 @ J2.T + b2)
        J_gap = _mean_matrix(s2[0], s2[1] * s2[2])
        feats = a2 @ J_gap.T
        (wd, bd), = dense
        logits = feats @ wd + bd
        seed = np.eye(logits.shape[1])[target]
        r_feats = ref_epsilon(wd.T, bd, feats, seed, dense_eps)
        r_a2 = ref_z_map(J_gap, a2, r_feats)  # ZeroRule on GlobalAveragePool
        r_a1 = _conv_rule(conv_rule, J2, b2, a1, r_a2, EPS)
    else:
        if arch == "cnn_max":
            pooled = a1.reshape(n, *s1)
            pooled = pooled.reshape(n, s1[0], s1[1] // 2, 2, s1[2] // 2, 2).max(axis=(3, 5))
            p = pooled.reshape(n, -1)
            s_p = pooled.shape[1:]
        else:
            J_pool = _avgpool_matrix(s1, 2)
            p = a1 @ J_pool.T
            s_p = (s1[0], s1[1] // 2, s1[2] // 2)
        J2, b2, s2 = conv_matrix(convs[1], s_p)
        a2 = relu(p @ J2.T + b2)
        flat = a2.reshape(n, *s2).transpose(0, 2, 3, 1).reshape(n, -1)  # Keras flattens HWC
        (wd1, bd1), (wd2, bd2) = dense
        h = relu(flat @ wd1 + bd1)
        logits = h @ wd2 + bd2
        seed = np.eye(logits.shape[1])[target]
        r_h = ref_epsilon(wd2.T, bd2, h, seed, dense_eps)
        r_flat = ref_epsilon(wd1.T, bd1, flat, r_h, dense_eps)
        hh, ww, cc = s2[1], s2[2], s2[0]
        r_a2 = r_flat.reshape(n, hh, ww, cc).transpose(0, 3, 1, 2).reshape(n, -1)
        r_p = _conv_rule(conv_rule, J2, b2, p, r_a2, EPS)
        if arch == "cnn_max":
            r_a1, y = ref_maxpool(a1.reshape(n, *s1), r_p.reshape(n, *s_p), [2, 2], [2, 2],
                                  [0, 0, 0, 0], eps=None)  # ZeroRule: exact routing
            np.testing.assert_array_equal(y.reshape(n, -1), p)
            r_a1 = r_a1.reshape(n, -1)
        else:
            r_a1 = ref_z_map(J_pool, a1, r_p)  # ZeroRule on AveragePool
    if stem == "keras_depthwise_unoptimized":
        # The depthwise bias is its own NHWC Add after the Conv (and a Transpose): ZeroRule
        # splits the relevance between the conv output z and the bias, x·W sees no bias.
        z1 = x1 @ J1.T
        r_z1 = ref_add([z1.reshape(n, *s1), b1.reshape(1, *s1)], r_a1.reshape(n, *s1))[0]
        r_x = _conv_rule(first_rule, J1, np.zeros_like(b1), x1, r_z1.reshape(n, -1), EPS)
    else:
        r_x = _conv_rule(first_rule, J1, b1, x1, r_a1, EPS)
    return logits, r_x.reshape(xc.shape).transpose(0, 2, 3, 1)


def _inputs(stem: str) -> np.ndarray:
    x = SAMPLES[f"x_{ARCH[stem]}"]
    return np.concatenate([x, x - 0.5]).astype(np.float32)


# -- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("stem", list(ARCH))
def test_onnx_runtime_matches_keras(stem: str) -> None:
    """The fixture computes what Keras computed (the conversion, not lrp_onnx, is checked)."""
    session = ort_session(onnx.load(DATA / f"{stem}.onnx"))
    (out,) = session.run(None, {"input": SAMPLES[f"x_{ARCH[stem]}"]})
    expected = SAMPLES[stem]
    # TensorFlow and ONNX Runtime sum the convolutions in different orders (float32).
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("composite", list(COMPOSITES))
@pytest.mark.parametrize("stem", ARCH)
def test_relevance_matches_numpy_reference(stem: str, composite: str) -> None:
    path = DATA / f"{stem}.onnx"
    analyzer = LRP(path, COMPOSITES[composite][0]())
    x = _inputs(stem)
    outputs = {o.name: o for o in analyzer.model.graph.output}
    original = onnx.load(path)
    out_name = original.graph.output[0].name
    assert out_name in outputs and "relevance" in outputs
    session = ort_session(analyzer.model)
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {"input": x, "target": TARGETS})))
    # The compiled model's original output is the fixture's, run by ONNX Runtime.
    (plain,) = ort_session(original).run(None, {"input": x})
    np.testing.assert_allclose(got[out_name], plain, rtol=1e-6, atol=1e-7 * np.abs(plain).max())
    logits, expected = reference(stem, x, TARGETS, composite)
    if stem == "keras3_cnn_softmax":  # the trailing Softmax is skipped: the logits are explained
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        np.testing.assert_allclose(plain, e / e.sum(axis=1, keepdims=True), rtol=1e-5,
                                   atol=1e-6)
    else:
        np.testing.assert_allclose(plain, logits, rtol=1e-5, atol=1e-6 * np.abs(logits).max())
    assert got["relevance"].shape == x.shape  # NHWC, the input's layout
    # float32 rounding: the same graph run in float64 (below) matches to 1e-12; ONNX Runtime's
    # float32 run differed from the reference by up to 4.7e-6·max|R| (measured on these
    # fixtures, 2026-12-05), over the default atol of 1e-6·max|R|.
    assert_relevance_close(got["relevance"], expected, np.float32, atol_scale=2e-5)
    r64 = dict(zip([o.name for o in analyzer.model.graph.output],
                   float64.run(float64.to_float64(analyzer.model),
                               {"input": x.astype(np.float64), "target": TARGETS})))
    assert_relevance_close(r64["relevance"], expected, np.float64)


@pytest.mark.parametrize("stem", ARCH)
def test_lrp_onnx_check_passes(stem: str) -> None:
    report = check.check_model(DATA / f"{stem}.onnx", EpsilonPlusFlat())
    failed = [f"{r.name}: {r.detail}" for r in report.results if r.ok is False]
    assert report.ok, failed
    passed = {r.name for r in report.results if r.ok}
    assert {"onnx_checker", "outputs_unchanged", "relevance_finite",
            "conservation_layers"} <= passed


def test_unoptimized_export_explains_like_the_optimized_one() -> None:
    """tf2onnx with its optimizers off (Transpose pairs around every Conv and MaxPool, ReLU in
    NHWC, Identity outputs) gives the same relevance as the optimized graph."""
    x = _inputs("keras_cnn")
    a = LRP(DATA / "keras_cnn.onnx", EpsilonPlusFlat()).analyze(x, TARGETS, device="cpu")
    b = LRP(DATA / "keras_cnn_unoptimized.onnx", EpsilonPlusFlat()).analyze(x, TARGETS,
                                                                          device="cpu")
    # Same weights, same float32 ops; only the layout changes around them.
    np.testing.assert_allclose(b.relevance, a.relevance, rtol=1e-5,
                               atol=1e-6 * np.abs(a.relevance).max())



@pytest.mark.parametrize("stem", ["keras_cnn", "keras_cnn_unoptimized"])
def test_first_layer_maps_look_through_the_layout_transpose(stem: str) -> None:
    """The first Conv reads the input through tf2onnx's NHWC -> NCHW Transpose: it is a first
    layer, so EpsilonPlusFlat puts FlatRule on it (and ZPlusRule on the second Conv)."""
    analyzer = LRP(DATA / f"{stem}.onnx", EpsilonPlusFlat())
    rules = {la.index: type(r).__name__ for la, r in zip(analyzer.layers, analyzer.rules)
             if la.kind == "Conv"}
    assert list(rules.values()) == ["FlatRule", "ZPlusRule"]
