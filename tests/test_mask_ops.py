"""``Where`` with a data-free condition (attention masks) and float-to-float ``Cast`` on the
relevance path, against numpy references; a Softmax seen through a Cast is still CP-LRP's gate."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

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
