"""Canonicalisation passes and load-time refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrp_onnx as L
from conftest import ort_session
from lrp_onnx.frontend.passes import fold_constant_nodes, name_nodes


def _mlp(nodes, inits, opset=17, inputs=None, in_shape=("N", 4)):
    graph = helper.make_graph(
        nodes, "g",
        inputs or [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


W = np.arange(12, dtype=np.float32).reshape(4, 3) / 7 - 0.5


def test_constant_and_identity_become_initializers(rng: np.random.Generator) -> None:
    const = helper.make_node("Constant", [], ["w_const"],
                             value=numpy_helper.from_array(W, "v"), name="c")
    ident = helper.make_node("Identity", ["w_init"], ["w_alias"], name="alias")
    nodes = [const, ident,
             helper.make_node("MatMul", ["input", "w_const"], ["a"], name="m1"),
             helper.make_node("MatMul", ["input", "w_alias"], ["b"], name="m2"),
             helper.make_node("Add", ["a", "b"], ["logits"], name="add")]
    model = _mlp(nodes, [numpy_helper.from_array(W, "w_init")])
    folded = fold_constant_nodes(onnx.load_from_string(model.SerializeToString()), "m")
    ops = [n.op_type for n in folded.graph.node]
    assert "Constant" not in ops and "Identity" not in ops
    assert {"w_const", "w_init"} <= {t.name for t in folded.graph.initializer}
    x = rng.standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_array_equal(ort_session(model).run(None, {"input": x})[0],
                                  ort_session(folded).run(None, {"input": x})[0])
    # and the whole pipeline sees two dense layers and an Add
    kinds = [la.kind for la in L.LRP(model).layers]
    assert kinds == ["MatMul", "MatMul", "Add"]


def test_unnamed_and_duplicate_nodes_get_unique_names() -> None:
    nodes = [helper.make_node("Relu", ["input"], ["h"]),
             helper.make_node("Relu", ["h"], ["h2"], name="dup"),
             helper.make_node("MatMul", ["h2", "w"], ["logits"], name="dup")]
    model = name_nodes(_mlp(nodes, [numpy_helper.from_array(W, "w")]), "m")
    names = [n.name for n in model.graph.node]
    assert names == ["Relu_0", "dup", "dup__1"]


def test_opset_13_is_upgraded(rng: np.random.Generator) -> None:
    nodes = [helper.make_node("MatMul", ["input", "w"], ["logits"], name="m")]
    model = _mlp(nodes, [numpy_helper.from_array(W, "w")], opset=13)
    compiled = L.compile(model)
    assert [o.version for o in compiled.opset_import if o.domain in ("", "ai.onnx")] == [17]
    x = rng.standard_normal((2, 4)).astype(np.float32)
    out, rel = ort_session(compiled).run(None, {"input": x, "target": np.array([0, 2])})
    np.testing.assert_allclose(out, x @ W, rtol=1e-6)


def test_dynamic_feature_dim_compiles() -> None:
    """A dynamic non-batch dim is no longer refused (issue 14 part 2): the compiled model runs
    at the sizes the original runs at."""
    mm = [helper.make_node("MatMul", ["input", "w"], ["logits"], name="m")]
    model = _mlp(mm, [numpy_helper.from_array(W, "w")], in_shape=("N", "F"))
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    out, rel = ort_session(L.compile(model)).run(None, {"input": x, "target": np.array([0, 2])})
    np.testing.assert_allclose(out, x @ W, rtol=1e-6)
    assert rel.shape == x.shape


@pytest.mark.parametrize("case, needle", [
    ("two_inputs", "2 floating-point inputs"),
    ("int_input", "no floating-point model input"),
    ("no_batch", "batch dimension"),
])
def test_refused_models(case: str, needle: str) -> None:
    mm = [helper.make_node("MatMul", ["input", "w"], ["logits"], name="m")]
    inits = [numpy_helper.from_array(W, "w")]
    if case == "two_inputs":
        model = _mlp(mm + [], inits, inputs=[
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("other", TensorProto.FLOAT, ["N", 4])])
    elif case == "int_input":
        cast = helper.make_node("Cast", ["input"], ["xf"], to=TensorProto.FLOAT, name="cast")
        model = _mlp([cast, helper.make_node("MatMul", ["xf", "w"], ["logits"], name="m")],
                     inits, inputs=[helper.make_tensor_value_info("input", TensorProto.INT64,
                                                                  ["N", 4])])
    else:
        model = _mlp([helper.make_node("MatMul", ["input", "w"], ["logits"], name="m")], inits,
                     in_shape=(4,))
    with pytest.raises(L.LRPError, match=needle):
        L.compile(model)
