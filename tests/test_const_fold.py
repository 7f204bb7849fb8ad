"""Weights and biases computed from constants (``fold_constant_weights``, ``Graph.constant``).

Each model writes a weight or bias as a small constant sub-graph, as tf2onnx, fp16 converters and
quantizers do; it must compile and give the relevance of the same model with the folded value
written by hand as an initializer (computed here with numpy from the formula: a transpose, a
cast, a fill, ``(q - zp) * scale``), and the compiled model's original output must be the input
model's. Float chains are folded in the model (the weight stored once); a ``DequantizeLinear``
weight stays int8 in the forward pass.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import lrp_onnx as L
from conftest import ort_session
from lrp_onnx.frontend.constants import fold_constant_weights

W = (np.arange(12, dtype=np.float32).reshape(4, 3) - 5.5) / 7  # x @ W: 4 features -> 3 classes
B = np.array([0.25, -0.5, 0.125], dtype=np.float32)


def _model(nodes, inits, in_shape=("N", 4), out_shape=("N", 3)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(out_shape))],
        initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _same_relevance(model: onnx.ModelProto, by_hand: onnx.ModelProto, x: np.ndarray,
                    composite=None) -> onnx.ModelProto:
    """Compile both; relevance and outputs must be equal; returns the compiled ``model``."""
    rules = composite if isinstance(composite, L.Composite) else \
        L.Composite(composite if composite is not None else L.EpsilonRule())
    ours, ref = L.LRP(model, rules), L.LRP(by_hand, rules)
    assert [la.kind for la in ours.layers] == [la.kind for la in ref.layers]
    a, b = ours.analyze(x, 1, device="cpu"), ref.analyze(x, 1, device="cpu")
    np.testing.assert_allclose(a.relevance, b.relevance, rtol=1e-6, atol=1e-7)
    assert np.abs(a.relevance).max() > 0
    # the compiled model's own output is the input model's
    np.testing.assert_array_equal(a.output, ort_session(model).run(None, {"input": x})[0])
    return ours.model


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node if not n.name.startswith("lrp/")]


def test_transposed_weight_of_matmul_is_folded_and_stored_once(rng: np.random.Generator) -> None:
    nodes = [helper.make_node("Transpose", ["w_t"], ["w"], perm=[1, 0], name="tr"),
             helper.make_node("MatMul", ["input", "w"], ["z"], name="mm"),
             helper.make_node("Add", ["z", "b"], ["logits"], name="bias")]
    model = _model(nodes, [numpy_helper.from_array(np.ascontiguousarray(W.T), "w_t"),
                           numpy_helper.from_array(B, "b")])
    by_hand = _model(nodes[1:], [numpy_helper.from_array(W, "w"),
                                 numpy_helper.from_array(B, "b")])
    x = rng.standard_normal((3, 4)).astype(np.float32)
    compiled = _same_relevance(model, by_hand, x)
    assert _ops(compiled) == ["MatMul", "Add"]
    stored = {t.name: list(t.dims) for t in compiled.graph.initializer}
    assert "w_t" not in stored and stored["w"] == [4, 3]  # W once, in the layout MatMul reads


def test_constant_of_shape_bias_is_folded(rng: np.random.Generator) -> None:
    fill = helper.make_tensor("fill", TensorProto.FLOAT, [1], [0.375])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["b"], value=fill, name="cos"),
             helper.make_node("MatMul", ["input", "w"], ["z"], name="mm"),
             helper.make_node("Add", ["z", "b"], ["logits"], name="bias")]
    model = _model(nodes, [numpy_helper.from_array(np.array([3], dtype=np.int64), "shape"),
                           numpy_helper.from_array(W, "w")])
    by_hand = _model(nodes[1:], [numpy_helper.from_array(np.full(3, 0.375, np.float32), "b"),
                                 numpy_helper.from_array(W, "w")])
    x = rng.standard_normal((3, 4)).astype(np.float32)
    compiled = _same_relevance(model, by_hand, x)
    assert _ops(compiled) == ["MatMul", "Add"]
    assert L.LRP(model).layers[0].bias_add is not None  # the layer view folds the bias in


def test_cast_float16_weight_of_gemm_is_folded(rng: np.random.Generator) -> None:
    w16 = W.T.astype(np.float16)
    nodes = [helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Gemm", ["input", "w", "b"], ["logits"], transB=1, name="fc")]
    model = _model(nodes, [numpy_helper.from_array(w16, "w16"), numpy_helper.from_array(B, "b")])
    by_hand = _model(nodes[1:], [numpy_helper.from_array(w16.astype(np.float32), "w"),
                                 numpy_helper.from_array(B, "b")])
    x = rng.standard_normal((3, 4)).astype(np.float32)
    compiled = _same_relevance(model, by_hand, x, L.EpsilonRule(epsilon=0.01))
    assert _ops(compiled) == ["Gemm"]
    assert {t.name for t in compiled.graph.initializer} >= {"w", "b"}
    assert "w16" not in {t.name for t in compiled.graph.initializer}


def test_dequantized_conv_weight_keeps_int8_forward(rng: np.random.Generator) -> None:
    q = rng.integers(-127, 128, size=(3, 2, 3, 3)).astype(np.int8)
    scale = np.array([0.01, 0.02, 0.005], dtype=np.float32)
    zero = np.zeros(3, dtype=np.int8)
    w_float = ((q.astype(np.int32) - zero[:, None, None, None]) *
               scale[:, None, None, None]).astype(np.float32)
    conv = helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv")
    tail = [helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
            helper.make_node("Flatten", ["p"], ["logits"], name="flat")]
    dq = helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], axis=0,
                          name="dq")
    shapes = {"in_shape": ("N", 2, 5, 5), "out_shape": ("N", 3)}
    model = _model([dq, conv, *tail], [numpy_helper.from_array(q, "w_q"),
                                       numpy_helper.from_array(scale, "w_scale"),
                                       numpy_helper.from_array(zero, "w_zp"),
                                       numpy_helper.from_array(B, "b")], **shapes)
    by_hand = _model([conv, *tail], [numpy_helper.from_array(w_float, "w"),
                                     numpy_helper.from_array(B, "b")], **shapes)
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    for composite in (L.EpsilonRule(), L.EpsilonPlus()):
        compiled = _same_relevance(model, by_hand, x, composite)
        # the deployed forward pass: int8 weight and its DequantizeLinear, untouched
        assert _ops(compiled)[:2] == ["DequantizeLinear", "Conv"]
        stored = {t.name: t.data_type for t in compiled.graph.initializer}
        assert stored["w_q"] == TensorProto.INT8


def test_integer_shape_arithmetic_is_not_rewritten() -> None:
    """A Reshape target computed from constants (torch exports' shape arithmetic) stays as
    exported: only float values are folded, and a model without any is returned untouched."""
    nodes = [helper.make_node("Concat", ["lead", "rest"], ["shape"], axis=0, name="cat"),
             helper.make_node("Reshape", ["input", "shape"], ["flat"], name="reshape"),
             helper.make_node("MatMul", ["flat", "w"], ["logits"], name="mm")]
    model = _model(nodes, [numpy_helper.from_array(np.array([-1], np.int64), "lead"),
                           numpy_helper.from_array(np.array([4], np.int64), "rest"),
                           numpy_helper.from_array(W, "w")], in_shape=("N", 2, 2))
    before = model.SerializeToString()
    assert fold_constant_weights(model, "m").SerializeToString() == before


def test_constant_scale_outside_a_parameter_slot_is_not_rewritten() -> None:
    """A float constant sub-graph read elsewhere than as a weight or bias (a scale, a mask)
    compiles as exported, so the model keeps its bytes."""
    nodes = [helper.make_node("Sqrt", ["c"], ["scale"], name="sqrt"),
             helper.make_node("Mul", ["input", "scale"], ["h"], name="mul"),
             helper.make_node("MatMul", ["h", "w"], ["logits"], name="mm")]
    model = _model(nodes, [numpy_helper.from_array(np.array(4.0, np.float32), "c"),
                           numpy_helper.from_array(W, "w")])
    before = model.SerializeToString()
    assert fold_constant_weights(model, "m").SerializeToString() == before
