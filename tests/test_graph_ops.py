"""Multi-node activations, gating products, Pad/Slice/Split, and PassRule on unknown ops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrp_onnx as L
from lrp_onnx.testing import oracle


def stab(z: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def _model(nodes, inits, in_shape, out_shape=("N", 3), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(out_shape))],
        initializer=[numpy_helper.from_array(np.asarray(v, np.float32), k)
                     for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _head_relevance(h: np.ndarray, w: np.ndarray, target: np.ndarray, eps: float) -> np.ndarray:
    """Relevance at the input of an ``h @ w`` head under EpsilonRule(eps), one-hot seed."""
    z = h @ w
    r = np.zeros_like(z)
    r[np.arange(len(z)), target] = 1.0
    return h * ((r / stab(z, eps)) @ w.T)


# -- SiLU and GELU, as torch exports them -------------------------------------------------------
class _Acts:
    @staticmethod
    def build():  # noqa: ANN205
        torch = pytest.importorskip("torch")
        from torch import nn

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.c1 = nn.Conv2d(3, 6, 3, padding=1)
                self.a1 = nn.SiLU()
                self.c2 = nn.Conv2d(6, 6, 3, padding=1)
                self.a2 = nn.GELU()
                self.pool = nn.MaxPool2d(2)
                self.a3 = nn.SiLU()
                self.fc = nn.Linear(6 * 4 * 4, 5)

            def forward(self, x):  # noqa: ANN001, ANN202
                h = self.a1(self.c1(x))
                h = self.a3(self.pool(self.a2(self.c2(h))))  # a SiLU after a pool: standalone
                return self.fc(torch.flatten(h, 1))

        torch.manual_seed(0)
        return Net().eval()


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_silu_gelu_fold_and_match_zennit(dynamo: bool, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("zennit")
    from zennit.composites import EpsilonPlus

    model = _Acts.build()
    path = oracle.export(model, tmp_path / "acts.onnx", torch.zeros(1, 3, 8, 8), dynamo=dynamo)
    analyzer = L.LRP(path, L.EpsilonPlus())
    summaries = [la.summary for la in analyzer.layers]
    assert summaries[0] == "Conv((3, 3), 3 => 6, silu, pad=1)"
    assert summaries[1] == "Conv((3, 3), 6 => 6, gelu, pad=1)"
    assert summaries[2:4] == ["MaxPool((2, 2))", "silu"]
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    logits, target = oracle.torch_targets(model, x)
    expl = analyzer.analyze(x, target)
    _, ref = oracle.zennit_relevance(model, x, EpsilonPlus(), target, 5)
    oracle.assert_agreement(expl.relevance, ref, f"silu/gelu {'dynamo' if dynamo else 'legacy'}")


# -- gating products (squeeze-excitation) ---------------------------------------------------------
def _se_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x -> c = x @ W1 -> g = Sigmoid(c @ Wg) -> y = c * g -> logits = y @ W2."""
    rng = np.random.default_rng(1)
    p = {"W1": rng.standard_normal((4, 6)), "Wg": rng.standard_normal((6, 6)) * 0.5,
         "W2": rng.standard_normal((6, 3))}
    nodes = [helper.make_node("MatMul", ["input", "W1"], ["c"], name="dense"),
             helper.make_node("MatMul", ["c", "Wg"], ["gz"], name="gate_dense"),
             helper.make_node("Sigmoid", ["gz"], ["g"], name="gate"),
             helper.make_node("Mul", ["c", "g"], ["y"], name="se_mul"),
             helper.make_node("MatMul", ["y", "W2"], ["logits"], name="head")]
    return _model(nodes, p, ("N", 4)), {k: v.astype(np.float32).astype(np.float64)
                                        for k, v in p.items()}


@pytest.mark.parametrize("rule", ["zero", "pass", "gradient"])
def test_gating_mul(rule: str) -> None:
    model, p = _se_model()
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    mul_rule = {"zero": L.ZeroRule(), "pass": L.PassRule(), "gradient": L.GradientRule()}[rule]
    comp = L.Composite(L.GlobalMap(L.EpsilonRule(0.1)), L.GlobalTypeMap({"Mul": mul_rule}))
    analyzer = L.LRP(model, comp)
    # the Sigmoid belongs to the gate's dense layer (an activation after a linear op)
    assert [la.summary for la in analyzer.layers] == [
        "Dense(4 => 6, bias=false)", "Dense(6 => 6, sigmoid, bias=false)", "Mul()",
        "Dense(6 => 3, bias=false)"]
    target = np.array([0, 1, 2])
    rel = analyzer.analyze(x, target).relevance
    x64 = x.astype(np.float64)
    c = x64 @ p["W1"]
    gz = c @ p["Wg"]
    g = 1 / (1 + np.exp(-gz))
    y = c * g
    r_y = _head_relevance(y, p["W2"], target, 0.1)

    def dense_back(inp: np.ndarray, w: np.ndarray, r: np.ndarray) -> np.ndarray:
        return inp * ((r / stab(inp @ w, 0.1)) @ w.T)

    if rule == "zero":
        r_c = y * r_y / stab(y)
    elif rule == "pass":
        r_c = r_y
    else:  # gradient: both factors; the gate's share goes back through Sigmoid (pass) and dense
        r_c = g * r_y + dense_back(c, p["Wg"], c * r_y)
    expect = dense_back(x64, p["W1"], r_c)
    np.testing.assert_allclose(rel, expect, rtol=1e-5, atol=1e-6 * np.abs(expect).max())


def test_squeeze_excitation_gradient_rule_matches_zennit(tmp_path: Path) -> None:
    """torchvision's SqueezeExcitation: Zennit sends the plain gradient through ``scale * x``."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("zennit")
    from torch import nn
    from torchvision.ops import SqueezeExcitation
    from zennit.composites import EpsilonPlus

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), SqueezeExcitation(8, 4),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 5)).eval()
    path = oracle.export(model, tmp_path / "se.onnx", torch.zeros(1, 3, 8, 8))
    comp = L.Composite(*L.EpsilonPlus().primitives, L.GlobalTypeMap({"Mul": L.GradientRule()}))
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    _, target = oracle.torch_targets(model, x)
    rel = L.LRP(path, comp).analyze(x, target).relevance
    _, ref = oracle.zennit_relevance(model, x, EpsilonPlus(), target, 5)
    oracle.assert_agreement(rel, ref, "squeeze-excitation GradientRule")


# -- Pad, Slice, Split ----------------------------------------------------------------------------
W = np.arange(1, 1 + 24 * 3, dtype=np.float64).reshape(24, 3) % 7 - 3.0


def _routing_case(op: str) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    if op == "Pad":  # [N, 2, 3, 3] -> pad H (1, 0), W (1, 1) -> [N, 2, 4, 5] -> crop [N, 2, 2, 3]
        nodes = [helper.make_node("Pad", ["input", "pads"], ["p"], name="pad"),
                 helper.make_node("Slice", ["p", "s0", "s1", "ax"], ["q"], name="crop"),
                 helper.make_node("Flatten", ["q"], ["f"], name="flat"),
                 helper.make_node("MatMul", ["f", "W"], ["logits"], name="head")]
        inits = {"W": W[:12], "pads": np.array([0, 0, 1, 1, 0, 0, 0, 1], np.int64),
                 "s0": np.array([1, 1], np.int64), "s1": np.array([3, 4], np.int64),
                 "ax": np.array([2, 3], np.int64)}
        return _model(nodes, inits, ("N", 2, 3, 3)), (2, 3, 3)
    # Split along channels, the halves reordered and the second one scaled by a Relu
    nodes = [helper.make_node("Split", ["input", "sizes"], ["a", "b"], name="split", axis=1),
             helper.make_node("Relu", ["b"], ["rb"], name="relu"),
             helper.make_node("Concat", ["rb", "a"], ["cat"], name="cat", axis=1),
             helper.make_node("Flatten", ["cat"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "W"], ["logits"], name="head")]
    return _model(nodes, {"W": W, "sizes": np.array([1, 3], np.int64)}, ("N", 4, 3, 2)), (4, 3, 2)


def _int_inits(model: onnx.ModelProto) -> onnx.ModelProto:
    for t in model.graph.initializer:  # _model wrote every initializer as float32
        if t.name in ("pads", "s0", "s1", "ax", "sizes"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.int64), t.name))
    return model


@pytest.mark.parametrize("op", ["Pad", "Split"])
def test_routing_ops(op: str) -> None:
    model, shape = _routing_case(op)
    model = _int_inits(model)
    x = np.random.default_rng(3).standard_normal((2, *shape)).astype(np.float32)
    comp = L.Composite(L.GlobalMap(L.PassRule()), L.GlobalTypeMap({"MatMul": L.EpsilonRule(0.1)}))
    rel = L.LRP(model, comp).analyze(x, [0, 2]).relevance
    x64 = x.astype(np.float64)
    if op == "Pad":
        p = np.pad(x64, [(0, 0), (0, 0), (1, 0), (1, 1)])
        q = p[:, :, 1:3, 1:4]
        r_q = _head_relevance(q.reshape(2, -1), W[:12], np.array([0, 2]), 0.1).reshape(q.shape)
        r_p = np.zeros_like(p)
        r_p[:, :, 1:3, 1:4] = r_q
        expect = r_p[:, :, 1:, 1:-1]
    else:
        a, b_ = x64[:, :1], x64[:, 1:]
        cat = np.concatenate([np.maximum(b_, 0), a], axis=1)
        r = _head_relevance(cat.reshape(2, -1), W, np.array([0, 2]), 0.1).reshape(cat.shape)
        expect = np.concatenate([r[:, 3:], r[:, :3]], axis=1)
    np.testing.assert_allclose(rel, expect, rtol=1e-5, atol=1e-6 * np.abs(expect).max())
    assert abs(rel.sum() - expect.sum()) < 1e-4 * np.abs(expect).sum()


# -- ops without an emitter -----------------------------------------------------------------------
def _sin_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Sin", ["input"], ["s"], name="sine"),
             helper.make_node("MatMul", ["s", "w"], ["logits"], name="head")]
    return _model(nodes, {"w": W[:4]}, ("N", 4))


def test_unknown_op_error_suggests_pass_rule() -> None:
    with pytest.raises(L.UnsupportedOp) as err:
        L.LRP(_sin_model())
    msg = str(err.value)
    assert "'sine' (Sin)" in msg and "NameMap('sine', PassRule())" in msg
    assert "GlobalTypeMap({'Sin': PassRule()})" in msg and "\n" not in msg


def test_pass_rule_forces_an_unknown_elementwise_op() -> None:
    x = np.random.default_rng(4).standard_normal((2, 4)).astype(np.float32)
    rel = L.LRP(_sin_model(), L.Composite(L.EpsilonRule(0.1), L.NameMap("sine", L.PassRule()))
                ).analyze(x, [0, 1]).relevance
    s = np.sin(x.astype(np.float64))
    expect = _head_relevance(s, W[:4], np.array([0, 1]), 0.1)
    np.testing.assert_allclose(rel, expect, rtol=1e-5, atol=1e-6 * np.abs(expect).max())
