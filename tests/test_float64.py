"""The float64 runner (``lrp_onnx.testing.float64``) that the zoo's float64 oracle comparisons use.

Its torch-backed Conv, ConvTranspose, MaxPool and ScatterElements are checked against
``onnx.reference``'s own (loop) implementations of the same nodes, in float64, on geometries
the exporters and the compiler produce (asymmetric pads, strides, dilations, groups,
``output_padding``, ``ceil_mode``, negative scatter indices); :func:`to_float64` is checked to
retype every float32 tensor.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

pytest.importorskip("torch")

from lrp_onnx.testing import float64  # noqa: E402
from lrp_onnx.testing.references import IR_VERSION, OPSET  # noqa: E402

D = TensorProto.DOUBLE


def _model(op: str, inputs: dict[str, np.ndarray], consts: dict[str, np.ndarray],
           outputs: list[tuple[str, int]], **attrs: object) -> onnx.ModelProto:
    node = helper.make_node(op, list(inputs) + list(consts), [n for n, _ in outputs], **attrs)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for k, v in inputs.items()],
        [helper.make_tensor_value_info(n, t, None) for n, t in outputs],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                             ir_version=IR_VERSION)


def _compare(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    expected = ReferenceEvaluator(model).run(None, feeds)
    actual = float64.run(model, feeds)
    for e, a in zip(expected, actual):
        assert a.shape == e.shape and a.dtype == e.dtype
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12)


CONV = [
    dict(shape=(2, 4, 7, 6), w=(6, 4, 3, 3), pads=[1, 0, 2, 1], strides=[2, 1]),
    dict(shape=(1, 4, 8, 8), w=(4, 2, 3, 3), pads=[1, 1, 1, 1], group=2, dilations=[2, 1]),
    dict(shape=(2, 3, 9), w=(5, 3, 3), pads=[0, 2], strides=[2]),
]


@pytest.mark.parametrize("case", CONV, ids=str)
def test_conv_and_transpose(case: dict, rng: np.random.Generator) -> None:
    case = dict(case)
    x = rng.standard_normal(case.pop("shape"))
    w = rng.standard_normal(case.pop("w"))
    b = rng.standard_normal(w.shape[0])
    _compare(_model("Conv", {"x": x}, {"w": w, "b": b}, [("y", D)], **case), {"x": x})
    # ConvTranspose with the same geometry is Conv's adjoint: <Conv(x), v> = <x, ConvT(v)>
    # (onnx.reference's own ConvTranspose fails on grouped and asymmetric-pad cases).
    conv = float64.run(_model("Conv", {"x": x}, {"w": w}, [("y", D)], **case), {"x": x})[0]
    v = rng.standard_normal(conv.shape)
    nd = x.ndim - 2
    k, s = w.shape[2:], case.get("strides", [1] * nd)
    d, p = case.get("dilations", [1] * nd), case.get("pads", [0] * 2 * nd)
    output_padding = [x.shape[2 + i] - ((conv.shape[2 + i] - 1) * s[i] + (k[i] - 1) * d[i] + 1
                                        - p[i] - p[i + nd]) for i in range(nd)]
    group = case.get("group", 1)
    bt = rng.standard_normal(w.shape[1] * group)
    tr = _model("ConvTranspose", {"v": v}, {"w": w, "b": bt}, [("x", D)],
                output_padding=output_padding, **case)
    xt = float64.run(tr, {"v": v})[0]
    assert xt.shape == x.shape
    xt -= bt.reshape(1, -1, *[1] * nd)
    np.testing.assert_allclose(np.vdot(x, xt), np.vdot(conv, v), rtol=1e-12)


POOL = [
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 0], ceil_mode=1),
    dict(kernel_shape=[2, 2], strides=[1, 1], dilations=[2, 2]),
]


@pytest.mark.parametrize("case", POOL, ids=str)
def test_maxpool_values_and_indices(case: dict, rng: np.random.Generator) -> None:
    # small integers: ties inside windows (the first maximum in scan order wins)
    x = rng.integers(-2, 3, size=(2, 3, 7, 6)).astype(np.float64)
    _compare(_model("MaxPool", {"x": x}, {}, [("y", D), ("i", TensorProto.INT64)], **case),
             {"x": x})


def test_scatter_elements_add(rng: np.random.Generator) -> None:
    data = rng.standard_normal((4, 5))
    idx = rng.integers(-4, 4, size=(6, 5))
    upd = rng.standard_normal((6, 5))
    _compare(_model("ScatterElements", {"d": data, "i": idx, "u": upd}, {}, [("y", D)],
                    axis=0, reduction="add"), {"d": data, "i": idx, "u": upd})


def test_to_float64_retypes_everything() -> None:
    x = np.ones((1, 3), np.float32)
    nodes = [helper.make_node("Constant", [], ["c"],
                              value=numpy_helper.from_array(np.full(3, 0.5, np.float32))),
             helper.make_node("Add", ["x", "c"], ["s"]),
             helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["y", "w"], ["out"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(np.full(3, 2.0, np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION)
    converted = float64.to_float64(model)
    assert model.graph.initializer[0].data_type == TensorProto.FLOAT  # the input is untouched
    assert converted.graph.initializer[0].data_type == D
    assert converted.graph.node[0].attribute[0].t.data_type == D
    assert converted.graph.node[2].attribute[0].i == D
    assert converted.graph.input[0].type.tensor_type.elem_type == D
    assert converted.graph.output[0].type.tensor_type.elem_type == D
    onnx.checker.check_model(converted, full_check=True)
    out = float64.run(model, {"x": x})[0]
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, np.full((1, 3), 3.0))
