"""``Where`` with a data-free condition (attention masks) and float-to-float ``Cast`` on the
relevance path, against numpy references; a Softmax seen through a Cast is still CP-LRP's gate."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from cuda_kernels import cuda_gaps
from lrp_onnx import (
    CPLRP,
    LRP,
    Composite,
    EpsilonRule,
    GlobalMap,
    GlobalTypeMap,
    PassRule,
    UnsupportedAttribute,
    UnsupportedOp,
)
from lrp_onnx.testing.references import Net

D = 6


def _explain(model: object, x: np.ndarray, composite: Composite) -> tuple[np.ndarray, np.ndarray]:
    expl = LRP(model, composite, normalize_output_relevance=False).analyze(x)
    return expl.relevance, expl.target


@pytest.mark.parametrize("branch", [1, 2])
def test_where_routes_relevance_to_the_chosen_branch(rng: np.random.Generator,
                                                     branch: int) -> None:
    """``Where(keep, x, c)`` (or ``Where(keep, c, x)``), ``keep`` a constant broadcast over the
    batch: x gets the relevance of the positions it was chosen at, the constant the rest.
    With ε = 0 on the head, R at the Where output is ``y * W[t]``, so ``R_x = [chosen] x W[t]``."""
    net = Net(rng, (D,))
    keep = net.const("keep", rng.random((1, D)) > 0.4, dtype=bool)
    fill = net.const("fill", rng.standard_normal(D))
    ins = [keep, net.x, fill] if branch == 1 else [keep, fill, net.x]
    net.head(net.node("Where", ins, "mask"))
    x = rng.standard_normal((3, D)).astype(np.float32)
    rel, target = _explain(net.model(), x, Composite(GlobalMap(EpsilonRule(epsilon=0.0))))
    w, _ = net.head_params
    chosen = net.inits[keep] if branch == 1 else ~net.inits[keep]
    want = chosen * x.astype(np.float64) * w[target]
    np.testing.assert_allclose(rel, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert np.all(rel[:, ~chosen[0]] == 0)


def test_where_with_a_data_condition_is_refused(rng: np.random.Generator) -> None:
    net = Net(rng, (D,))
    cond = net.node("Greater", [net.x, net.const("zero", np.zeros(D))], "positive")
    net.head(net.node("Where", [cond, net.x, net.const("fill", np.zeros(D))], "mask"))
    with pytest.raises(UnsupportedOp, match="'positive' \\(Greater\\)"):
        LRP(net.model(), CPLRP())
    forced = Composite(*CPLRP().primitives, GlobalTypeMap({"Greater": PassRule()}))
    with pytest.raises(UnsupportedAttribute, match="'mask' \\(Where.*condition depends"):
        LRP(net.model(), forced)


def test_float_casts_pass_relevance(rng: np.random.Generator) -> None:
    """``Cast`` to double and back equals no Cast at all, to the bit; a Cast to an integer
    type on the relevance path is refused with the node's name."""
    x = rng.standard_normal((2, D)).astype(np.float32)
    w = rng.standard_normal((D, D))
    results = []
    for casts in (False, True):
        net = Net(np.random.default_rng(1), (D,))
        h = net.node("MatMul", [net.x, net.const("W", w)], "proj")
        if casts:
            h = net.node("Cast", [net.node("Cast", [h], "up", to=11)], "down", to=1)
        net.head(h)
        results.append(_explain(net.model(), x, CPLRP())[0])
    np.testing.assert_array_equal(results[0], results[1])
    net = Net(rng, (D,))
    net.head(net.node("Cast", [net.node("Cast", [net.x], "to_int", to=7)], "back", to=1))
    with pytest.raises(UnsupportedAttribute, match="'back' \\(Cast.*from int64 to float32"):
        LRP(net.model(), CPLRP())


def test_softmax_through_a_cast_is_the_gate(rng: np.random.Generator) -> None:
    """The legacy exporter writes ``Softmax -> Cast -> MatMul``: CP-LRP still holds the
    attention weights constant (the relevance equals the model without the Cast)."""
    x = rng.standard_normal((2, 4, D)).astype(np.float32)
    net = Net(np.random.default_rng(2), (4, D))
    q = net.node("MatMul", [net.x, net.param("Wq", (D, D))], "q")
    k = net.node("MatMul", [net.x, net.param("Wk", (D, D))], "k")
    v = net.node("MatMul", [net.x, net.param("Wv", (D, D))], "v")
    kt = net.node("Transpose", [k], "kT", perm=[0, 2, 1])
    a = net.node("Softmax", [net.node("MatMul", [q, kt], "scores")], "attn", axis=-1)
    net.head(net.node("MatMul", [a, v], "context"))
    results = []
    for cast in (False, True):
        model = net.model()
        if cast:  # Softmax -> Cast(float) -> MatMul, as the legacy exporter writes it
            context = next(n for n in model.graph.node if n.name == "context")
            context.input[0] = "attn_cast"
            at = [n.name for n in model.graph.node].index("context")
            model.graph.node.insert(at, helper.make_node("Cast", ["attn"], ["attn_cast"],
                                                         name="attn_cast", to=1))
        lrp = LRP(model, CPLRP(), normalize_output_relevance=False)
        assert [la.kind for la in lrp.layers].count("BilinearMatMul") == 2
        results.append(lrp.analyze(x).relevance)
    np.testing.assert_allclose(results[1], results[0], rtol=1e-6,
                               atol=1e-7 * np.abs(results[0]).max())


def _sequence_model(rng: np.random.Generator, select: str) -> tuple[object, np.ndarray]:
    """``x [N, T, D]`` (T known only at run time) -> select positions along T -> head; returns
    the model and the head weight ``[classes, D]``."""
    from onnx import TensorProto, numpy_helper

    w = rng.standard_normal((3, D)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    if select.startswith("gather"):
        index = int(select.split(":")[1])
        inits.append(numpy_helper.from_array(np.array(index, np.int64), "idx"))
        nodes = [helper.make_node("Gather", ["x", "idx"], ["picked"], name="pick", axis=1)]
    else:  # slice:start:end, then the mean over T
        start, end = (int(v) for v in select.split(":")[1:])
        inits += [numpy_helper.from_array(np.array([v], np.int64), n)
                  for n, v in (("starts", start), ("ends", end), ("axes", 1))]
        nodes = [helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["cut"], name="pick"),
                 helper.make_node("Transpose", ["cut"], ["cutT"], name="cutT", perm=[0, 2, 1]),
                 helper.make_node("GlobalAveragePool", ["cutT"], ["pooled3"], name="pool"),
                 helper.make_node("Flatten", ["pooled3"], ["picked"], name="flat")]
    nodes.append(helper.make_node("Gemm", ["picked", "W"], ["logits"], name="head", transB=1))
    graph = helper.make_graph(
        nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", D])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w.astype(np.float64)


@pytest.mark.parametrize("select", ["gather:0", "gather:-1", "gather:2", "slice:1:-1",
                                    "slice:-3:100", "slice:0:2"])
def test_selecting_along_a_run_time_axis(rng: np.random.Generator, select: str) -> None:
    """BERT's [CLS] (``Gather 0``), a language model's last position (``Gather -1``) and Slices
    along a sequence axis whose length is known only at run time: the selected positions get
    their relevance back, the others none, at every length (ε = 0: ``R_x = x W[t] / count``)."""
    model, w = _sequence_model(rng, select)
    lrp = LRP(model, Composite(GlobalMap(EpsilonRule(epsilon=0.0))),
              normalize_output_relevance=False)
    assert cuda_gaps(lrp.model) == []  # the run-time pads included
    for t in (4, 7):
        x = rng.standard_normal((2, t, D)).astype(np.float32)
        expl = lrp.analyze(x)
        kept = np.zeros(t, bool)
        op, *bounds = select.split(":")
        if op == "gather":
            kept[int(bounds[0])] = True
        else:
            kept[slice(int(bounds[0]), int(bounds[1]))] = True
        want = kept[None, :, None] * x * w[expl.target][:, None, :] / kept.sum()
        np.testing.assert_allclose(expl.relevance, want, rtol=1e-5,
                                   atol=1e-6 * np.abs(want).max())
