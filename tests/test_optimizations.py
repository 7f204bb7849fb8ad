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
from lrp_onnx.testing.references import IR_VERSION, OPSET

SWITCHES = ("reuse_forward", "sign_analysis", "conv_transpose_as_conv", "modifiers_as_ops",
            "relu_denominators", "abs_denominators")
COMPOSITES = {
    "zero": lambda: None,
    "epsilon_plus_flat": L.EpsilonPlusFlat,
    "alpha2beta1_flat": L.EpsilonAlpha2Beta1Flat,
    "gamma_box": lambda: L.EpsilonGammaBox(-3.0, 3.0),
}


def _weight(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(
        (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)


def _net(name: str, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto],
         sample: list[int]) -> onnx.ModelProto:
    """Input ``x`` ``[N, *sample]``, output ``logits`` ``[N, 5]``."""
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *sample])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                             ir_version=IR_VERSION)


def _geometry_net(rng: np.random.Generator) -> onnx.ModelProto:
    """Convolutions of every geometry the Conv-form transpose must get right (or refuse):
    dilation with asymmetric pads, groups, a padding wider than the kernel, stride 2, 1x1."""
    def w(name: str, *shape: int) -> onnx.TensorProto:
        return _weight(rng, name, *shape)

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
    return _net("geometry", nodes, inits, [3, 9, 8])


def _residual_net(rng: np.random.Generator) -> onnx.ModelProto:
    """Two residual blocks (an identity shortcut, then a 1x1 projection), ResNet's pattern: the
    summands' pre-activations feed only the ``Add`` (denominators of unknown sign)."""
    def w(name: str, *shape: int) -> onnx.TensorProto:
        return _weight(rng, name, *shape)

    inits = [w("w0", 4, 3, 3, 3), w("w1", 4, 4, 3, 3), w("w2", 6, 4, 3, 3), w("wp", 6, 4, 1, 1),
             w("wd", 5, 6), numpy_helper.from_array(rng.uniform(-0.2, 0.2, 4).astype(np.float32),
                                                    "b4")]
    p1 = {"pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b4"], ["c0"], "conv0", **p1),
        helper.make_node("Relu", ["c0"], ["a0"], "relu0"),
        helper.make_node("Conv", ["a0", "w1", "b4"], ["c1"], "conv1", **p1),
        helper.make_node("Add", ["c1", "a0"], ["s1"], "add1"),
        helper.make_node("Relu", ["s1"], ["a1"], "relu1"),
        helper.make_node("Conv", ["a1", "w2"], ["c2"], "conv2", strides=[2, 2], **p1),
        helper.make_node("Conv", ["a1", "wp"], ["cp"], "proj", strides=[2, 2]),
        helper.make_node("Add", ["c2", "cp"], ["s2"], "add2"),
        helper.make_node("Relu", ["s2"], ["a2"], "relu2"),
        helper.make_node("GlobalAveragePool", ["a2"], ["p"], "pool"),
        helper.make_node("Flatten", ["p"], ["f"], "flatten"),
        helper.make_node("Gemm", ["f", "wd"], ["logits"], "dense", transB=1),
    ]
    return _net("residual", nodes, inits, [3, 8, 8])


def _test_model(which: str, rng: np.random.Generator) -> tuple[onnx.ModelProto,
                                                               tuple[int, ...]]:
    if which == "seed_vgg":
        return onnx.load(MODELS / "seed_vgg.onnx"), (3, 32, 32)
    if which == "residual":
        return _residual_net(rng), (3, 8, 8)
    return _geometry_net(rng), (3, 9, 8)


def _relevance(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort_session(model)
    inp = model.graph.input[0].name
    return session.run(["relevance"], {inp: x, "target": np.full(len(x), -1, np.int64)})[0]


def _ops(model: onnx.ModelProto) -> list[str]:
    return sorted(n.op_type for n in model.graph.node if n.name.startswith("lrp/"))


@pytest.mark.parametrize("composite", sorted(COMPOSITES))
@pytest.mark.parametrize("which", ["seed_vgg", "geometry", "residual"])
def test_each_switch_keeps_the_relevance(which: str, composite: str,
                                         rng: np.random.Generator) -> None:
    model, shape = _test_model(which, rng)
    x = rng.uniform(-1, 1, (4, *shape)).astype(np.float32)
    if which == "seed_vgg":
        x[0] = np.load(MODELS / "seed_vgg_input.npy").astype(np.float32).reshape(shape)
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
    if which == "seed_vgg" or composite == "zero":
        must.add("relu_denominators")  # Zero/Epsilon layers followed by a Relu
    if composite in ("epsilon_plus_flat", "alpha2beta1_flat"):
        must.add("sign_analysis")  # ZPlus/AlphaBeta after a Relu (RP.jl's GammaRule: no x⁻)
    if which == "residual" and composite == "zero":
        must.add("abs_denominators")  # ZeroRule convolutions whose output only the Add reads
    assert must <= changed, f"switches without effect: {sorted(must - changed)}"


def test_conv_form_transpose_is_chosen_per_geometry(rng: np.random.Generator) -> None:
    compiled = L.compile(_geometry_net(rng))
    kinds = {n.name.split("/")[1]: n.op_type for n in compiled.graph.node
             if n.name.startswith("lrp/conv") and n.name.endswith("/convT")}
    assert kinds == {"conv_dilated": "Conv", "conv_grouped": "Conv",
                     "conv_wide_pad": "ConvTranspose", "conv_stride2": "ConvTranspose",
                     "conv_1x1": "Conv"}


@pytest.mark.parametrize("switch", ["relu_denominators", "abs_denominators"])
@pytest.mark.parametrize("composite", sorted(COMPOSITES))
@pytest.mark.parametrize("which", ["seed_vgg", "geometry", "residual"])
def test_denominator_forms_give_the_same_floats(which: str, composite: str, switch: str,
                                                rng: np.random.Generator) -> None:
    """``relu(z) + eps`` differs from ``z + eps * sign(z)`` only where the numerator is exactly
    zero, and ``(|z| t) / (|z| + eps)`` is ``(z t) / (z + eps * sign(z))`` with both operands
    negated where ``z < 0``: the relevance is bit-identical, not merely close (ReLU nets have
    many exact zeros, and these inputs include an all-zero and a negative image)."""
    model, shape = _test_model(which, rng)
    x = rng.uniform(-1, 1, (4, *shape)).astype(np.float32)
    x[1] = 0.0
    x[2] = -np.abs(x[2])
    make = COMPOSITES[composite]
    on = L.compile(model, make())
    off = L.compile(model, make(), optimizations=replace(L.Optimizations(), **{switch: False}))
    if switch == "relu_denominators" and (which == "seed_vgg" or composite == "zero"):
        assert _ops(on) != _ops(off)
    if switch == "abs_denominators":
        assert (_ops(on) != _ops(off)) == (which == "residual" and composite == "zero")
    np.testing.assert_array_equal(_relevance(on, x), _relevance(off, x))


def _chain(rng: np.random.Generator, ops: list[str], out_relu: bool = False) -> onnx.ModelProto:
    """x -> conv "c0" -> Relu "a0" -> then each of ``ops`` on the previous value ("conv": a
    3x3 conv + Relu; "flat_conv" is the same, meant for a Flat rule; "sigmoid", "maxpool",
    "twice": the pre-activation of the next conv also feeds an Add) -> GAP -> dense."""
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w0")]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], "conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["a0"], "relu0")]
    prev = "a0"
    outputs = []
    for i, op in enumerate(ops, 1):
        if op in ("conv", "twice"):
            inits.append(numpy_helper.from_array(
                rng.standard_normal((4, 4, 3, 3)).astype(np.float32), f"w{i}"))
            nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], f"conv{i}",
                                          pads=[1, 1, 1, 1]))
            nodes.append(helper.make_node("Relu", [f"c{i}"], [f"a{i}"], f"relu{i}"))
            if op == "twice":
                nodes.append(helper.make_node("Add", [f"a{i}", f"c{i}"], [f"s{i}"], f"add{i}"))
                prev = f"s{i}"
                continue
        elif op == "sigmoid":
            nodes.append(helper.make_node("Sigmoid", [prev], [f"a{i}"], f"sigmoid{i}"))
        elif op == "maxpool":
            nodes.append(helper.make_node("MaxPool", [prev], [f"a{i}"], f"pool{i}",
                                          kernel_shape=[2, 2], strides=[2, 2]))
        prev = f"a{i}"
    if out_relu:
        outputs.append(helper.make_tensor_value_info("a0", TensorProto.FLOAT, ["N", 4, 8, 8]))
    inits.append(numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "wd"))
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["p"], "gap"),
              helper.make_node("Flatten", ["p"], ["f"], "flatten"),
              helper.make_node("Gemm", ["f", "wd"], ["logits"], "dense", transB=1)]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]), *outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                             ir_version=IR_VERSION)


@pytest.mark.parametrize(("ops", "rules", "out_relu", "covered"), [
    (["conv"], {}, False, {"c0", "c1"}),
    (["maxpool", "conv"], {}, False, {"c0", "c2"}),  # ZeroRule max pool routes to its winner
    (["maxpool", "conv"], {"pool1": L.EpsilonRule()}, False, {"c0", "c2"}),
    (["conv"], {"conv1": L.FlatRule()}, False, {"c1"}),  # Flat's relevance ignores x
    (["conv"], {"conv1": L.WSquareRule()}, False, {"c1"}),
    (["maxpool", "conv"], {"conv2": L.FlatRule()}, False, {"c2"}),  # ... also through a pool
    (["conv"], {"conv1": L.ZPlusRule()}, False, {"c0", "c1"}),
    (["sigmoid"], {}, False, set()),  # Sigmoid(0) != 0; c0 feeds nothing else but the GAP...
    (["conv"], {}, True, {"c1"}),  # a0 is also a graph output: its seed-free relevance is not
    (["twice"], {}, False, {"c0"}),  # c1 feeds the Relu and the Add
])
def test_relu_covers_follow_the_readers(ops: list[str], rules: dict[str, L.Rule],
                                        out_relu: bool, covered: set[str],
                                        rng: np.random.Generator) -> None:
    """Which pre-activations get ``relu(z) + eps``: only those whose ReLU output every reader
    multiplies its relevance by (or routes like its values into such a value)."""
    from lrp_onnx.api import assign_rules, prepare
    from lrp_onnx.emit.relevance_support import relu_covers

    prep = prepare(_chain(rng, ops, out_relu))
    flat = [rules.get(la.name, L.ZeroRule()) for la in prep.layers]
    assert set(relu_covers(prep.graph, prep.layers, assign_rules(prep, flat))) == covered
