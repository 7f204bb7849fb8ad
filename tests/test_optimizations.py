"""Every graph optimization (``lrp_onnx.Optimizations``) changes the graph, never the relevance.

Each model is compiled with every switch on (the default), with each switch off alone, and with
all off (``Optimizations.none()``); the relevances must agree to float32 rounding (relative L2
<= 1e-5 per sample, on inputs that keep denominators away from zero), and each switch must
actually change the graph it is expected to change (so a switch that silently does nothing is
caught).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrp_onnx as L
from conftest import MODELS, ort_session
from lrp_onnx.testing import IR_VERSION, OPSET

SWITCHES = ("reuse_forward", "sign_analysis", "conv_transpose_as_conv", "modifiers_as_ops")
COMPOSITES = {
    "zero": lambda: None,
    "epsilon_plus_flat": L.EpsilonPlusFlat,
    "alpha2beta1_flat": L.EpsilonAlpha2Beta1Flat,
    "gamma_box": lambda: L.EpsilonGammaBox(-3.0, 3.0),
}


def _geometry_net(rng: np.random.Generator) -> onnx.ModelProto:
    """Convolutions of every geometry the Conv-form transpose must get right (or refuse):
    dilation with asymmetric pads, groups, a padding wider than the kernel, stride 2, 1x1."""
    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)

    inits = [w("w1", 8, 3, 3, 3), w("w2", 8, 4, 3, 3), w("w3", 8, 8, 2, 2), w("w4", 8, 8, 3, 3),
             w("w5", 8, 8, 1, 1), w("wd", 5, 8),
             numpy_helper.from_array(rng.uniform(0.1, 0.5, 8).astype(np.float32), "b")]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b"], ["c1"], "conv_dilated", dilations=[2, 1],
                         pads=[1, 0, 2, 1]),
        helper.make_node("Relu", ["c1"], ["a1"], "relu1"),
        helper.make_node("Conv", ["a1", "w2", "b"], ["c2"], "conv_grouped", group=2,
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["a2"], "relu2"),
        helper.make_node("Conv", ["a2", "w3", "b"], ["c3"], "conv_wide_pad", pads=[2, 2, 2, 2]),
        helper.make_node("Relu", ["c3"], ["a3"], "relu3"),
        helper.make_node("Conv", ["a3", "w4", "b"], ["c4"], "conv_stride2", strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c4"], ["a4"], "relu4"),
        helper.make_node("Conv", ["a4", "w5", "b"], ["c5"], "conv_1x1"),
        helper.make_node("Relu", ["c5"], ["a5"], "relu5"),
        helper.make_node("GlobalAveragePool", ["a5"], ["p"], "pool"),
        helper.make_node("Flatten", ["p"], ["f"], "flatten"),
        helper.make_node("Gemm", ["f", "wd"], ["logits"], "dense", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "geometry", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                             ir_version=IR_VERSION)


def _relevance(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort_session(model)
    inp = model.graph.input[0].name
    return session.run(["relevance"], {inp: x, "target": np.full(len(x), -1, np.int64)})[0]


def _ops(model: onnx.ModelProto) -> list[str]:
    return sorted(n.op_type for n in model.graph.node if n.name.startswith("lrp/"))


@pytest.mark.parametrize("composite", sorted(COMPOSITES))
@pytest.mark.parametrize("which", ["seed_vgg", "geometry"])
def test_each_switch_keeps_the_relevance(which: str, composite: str,
                                         rng: np.random.Generator) -> None:
    if which == "seed_vgg":
        model: onnx.ModelProto = onnx.load(MODELS / "seed_vgg.onnx")
        x = np.load(MODELS / "seed_vgg_input.npy").astype(np.float32).reshape(1, 3, 32, 32)
        x = np.concatenate([x, rng.uniform(-1, 1, (3, *x.shape[1:])).astype(np.float32)])
    else:
        model = _geometry_net(rng)
        x = rng.uniform(-1, 1, (4, 3, 9, 8)).astype(np.float32)
    make = COMPOSITES[composite]
    default = L.compile(model, make())
    expected = _relevance(default, x)
    assert np.isfinite(expected).all()
    variants = {s: replace(L.Optimizations(), **{s: False}) for s in SWITCHES}
    variants["none"] = L.Optimizations.none()
    changed = set()
    for label, opts in variants.items():
        compiled = L.compile(model, make(), optimizations=opts)
        if _ops(compiled) != _ops(default):
            changed.add(label)
        got = _relevance(compiled, x)
        for a, e in zip(got.reshape(len(x), -1), expected.reshape(len(x), -1)):
            rel = np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30)
            assert rel <= 1e-5, f"{which} {composite} with {label} off: rel L2 {rel:.3g}"
    # which switches must have had an effect on this model and composite
    # dense layers: Zero/Epsilon; every model has a flipped kernel
    must = {"none", "conv_transpose_as_conv", "reuse_forward", "modifiers_as_ops"}
    if composite in ("epsilon_plus_flat", "alpha2beta1_flat"):
        must.add("sign_analysis")  # ZPlus/AlphaBeta after a Relu (RP.jl's GammaRule: no x⁻)
    assert must <= changed, f"switches without effect: {sorted(must - changed)}"


def test_conv_form_transpose_is_chosen_per_geometry(rng: np.random.Generator) -> None:
    compiled = L.compile(_geometry_net(rng))
    kinds = {n.name.split("/")[1]: n.op_type for n in compiled.graph.node
             if n.name.startswith("lrp/conv") and n.name.endswith("/convT")}
    assert kinds == {"conv_dilated": "Conv", "conv_grouped": "Conv",
                     "conv_wide_pad": "ConvTranspose", "conv_stride2": "ConvTranspose",
                     "conv_1x1": "ConvTranspose"}
