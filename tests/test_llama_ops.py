"""The ops a Llama export puts on the relevance path: RMSNorm (both exporters' spellings), Neg,
Expand/Tile (grouped-query attention), the SwiGLU product under CP-LRP and the rotary Slice
bounds the legacy exporter computes at run time. Each small model is compiled with an explicit
seed at its output (``output_relevance=True``), run on ONNX Runtime's CPU EP and compared with
float64 numpy formulas written from the rules' math (as in ``test_transformer_rules.py``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from test_transformer_rules import compile_run, lrp_divisions

from conftest import ort_session
from lrp_onnx import (
    LRP,
    Composite,
    EpsilonRule,
    GlobalMap,
    NameMap,
    PassRule,
    Rule,
    UniformRule,
    ZeroRule,
)
from lrp_onnx.errors import UnsupportedOp
from lrp_onnx.frontend.passes import static_slice_bounds
from lrp_onnx.testing import references as lt
from lrp_onnx.testing import transformer_refs as tr
from lrp_onnx.testing.references import Net

F32 = np.float32
BATCH = 3
RMS_EPS = 1e-6


def close(got: np.ndarray, want: np.ndarray) -> None:
    assert np.abs(want).max() > 0, "degenerate case: the reference relevance is all zero"
    lt.assert_relevance_close(got, want, F32)


def eps_of(rule: Rule) -> float | None:
    if isinstance(rule, PassRule):
        return None
    return rule.stabilizer if isinstance(rule, ZeroRule) else rule.epsilon  # type: ignore[attr-defined]


def on_lut(rule: Rule) -> Composite:
    return Composite(GlobalMap(PassRule()), NameMap("lut/*", rule))


def ints(net: Net, name: str, values: Any) -> str:
    return net.const(name, np.asarray(values), dtype=np.int64)


def same_shape(net: Net, y: str) -> None:
    """Declare ``y`` shaped like a sample of ``x`` (``Net`` would otherwise find its shape by a
    float64 run, which legacy's ``Cast(to=FLOAT)`` breaks)."""
    net._samples[y] = net.sample


# -- RMSNorm ----------------------------------------------------------------------------------
def rms_norm(net: Net, x: str, spelling: str, gamma: bool = True, square: str = "Pow") -> str:
    """Llama's RMSNorm as the dynamo (``Reciprocal``) or legacy (``Cast``, ``Div(1, ·)``,
    ``Cast``) exporter writes it, over the last axis; the square as ``Pow(x, 2)`` or, as graph
    optimizers rewrite it, ``Mul(x, x)``."""
    d = net.sample[-1]
    two = net.const("lut/two", np.array(2.0))
    if spelling == "legacy":
        x = net.node("Cast", [x], "lut/cast_in", to=onnx.TensorProto.FLOAT)
    sq = net.node("Pow", [x, two], "lut/pow") if square == "Pow" else \
        net.node("Mul", [x, x], "lut/square")
    mean = net.node("ReduceMean", [sq], "lut/mean", axes=[-1], keepdims=1)
    var = net.node("Add", [mean, net.const("lut/eps", np.array(RMS_EPS))], "lut/add")
    rms = net.node("Sqrt", [var], "lut/sqrt")
    if spelling == "legacy":
        inv = net.node("Div", [net.const("lut/one", np.array(1.0)), rms], "lut/div")
    else:
        inv = net.node("Reciprocal", [rms], "lut/reciprocal")
    y = net.node("Mul", [x, inv], "lut/mul")
    if spelling == "legacy":
        y = net.node("Cast", [y], "lut/cast_out", to=onnx.TensorProto.FLOAT)
    if gamma:
        g = net.const("lut/gamma", 1.0 + 0.3 * net.rng.standard_normal(d))
        y = net.node("Mul", [g, y], "lut/scale")
    return y


def ref_rms_norm(x: np.ndarray, gamma: np.ndarray | None, R: np.ndarray,
                 eps: float | None) -> np.ndarray:
    """LXT's RMSNorm rule (rms held constant): ``R_x = x γ R / stab(y) / rms``; PassRule: R."""
    if eps is None:
        return R
    rms = np.sqrt((x ** 2).mean(-1, keepdims=True) + RMS_EPS)
    g = np.ones(x.shape[-1]) if gamma is None else gamma
    y = g * x / rms
    return x * g * tr.quotient(R, y, eps) / rms


RMS_RULES = (ZeroRule(), EpsilonRule(epsilon=0.0), EpsilonRule(epsilon=1e-3), PassRule())


@pytest.mark.parametrize("rule", RMS_RULES, ids=repr)
@pytest.mark.parametrize("spelling", ["dynamo", "legacy"])
@pytest.mark.parametrize("gamma", [True, False], ids=["gamma", "no_gamma"])
@pytest.mark.parametrize("square", ["Pow", "Mul"])
def test_rms_norm(spelling: str, gamma: bool, square: str, rule: Rule,
                  rng: np.random.Generator) -> None:
    net = Net(rng, (4, 6))
    y = rms_norm(net, net.x, spelling, gamma, square)
    same_shape(net, y)
    x = rng.standard_normal((BATCH, 4, 6)).astype(F32)
    seed = rng.standard_normal((BATCH, 4, 6)).astype(F32)
    run = compile_run(net, y, on_lut(rule), x, seed)
    assert [la.kind for la in run.lrp.layers] == (["Cast", "RMSNorm"] if spelling == "legacy"
                                                   else ["RMSNorm"])
    want = ref_rms_norm(x.astype(np.float64), net.inits.get("lut/gamma"),
                        seed.astype(np.float64), eps_of(rule))
    close(run.out["relevance"], want)


def test_rms_norm_legacy_residual_conserves(rng: np.random.Generator) -> None:
    """Legacy's residual sum reads the first Cast's output (inside the norm's spelling): the
    Cast stays a layer of its own, the rest is one RMSNorm, and at ε = 0 (no biases)
    relevance is conserved per sample."""
    net = Net(rng, (4, 6))
    y = rms_norm(net, net.x, "legacy")
    out = net.node("Add", ["lut/cast_in", y], "lut/residual")
    same_shape(net, out)
    x = rng.standard_normal((BATCH, 4, 6)).astype(F32)
    y32 = ort_session(net.model(output=out)).run([out], {"x": x})[0]
    seed = (y32 * rng.standard_normal(y32.shape)).astype(F32)
    run = compile_run(net, out, on_lut(EpsilonRule(epsilon=0.0)), x, seed)
    assert [la.kind for la in run.lrp.layers] == ["Cast", "RMSNorm", "Add"]
    got = run.out["relevance"].astype(np.float64).reshape(BATCH, -1).sum(1)
    np.testing.assert_allclose(got, seed.astype(np.float64).reshape(BATCH, -1).sum(1),
                               rtol=1e-5, atol=1e-5 * np.abs(seed).sum(axis=(1, 2)).max())


def linear(net: Net, x: str, fin: int, fout: int, name: str) -> str:
    return net.node("MatMul", [x, net.param(f"{name}/W", (fin, fout))], f"{name}/matmul")


def _gradient_form(rng: np.random.Generator, middle: Any, targets: list[int]
                   ) -> tuple[Net, np.ndarray, np.ndarray, np.ndarray]:
    """``Linear -> middle -> Linear`` at ε = 0 with the logit as seed, compiled with no division
    by a forward value in the relevance pass: the net, x (float64), the relevance and the
    gradient of the logit by ``middle``'s output."""
    net = Net(rng, (4, 6))
    h = linear(net, net.x, 6, 6, "lin1")
    net.head(linear(net, middle(net, h), 6, 6, "lin2"), bias=None)
    lrp = LRP(net.model(), Composite(GlobalMap(EpsilonRule(epsilon=0.0))),
              normalize_output_relevance=False)
    assert lrp_divisions(lrp.model)[1] == 0
    x = rng.standard_normal((BATCH, 4, 6)).astype(F32)
    got = lrp.analyze(x, targets).relevance
    wh, _ = net.head_params  # type: ignore[misc]
    onehot = np.eye(wh.shape[0])[targets]
    g_n = (onehot @ wh).reshape(BATCH, 4, 6) @ net.inits["lin2/W"].T  # d logit / d middle
    return net, x.astype(np.float64), got, g_n


def test_rms_norm_gradient_form(rng: np.random.Generator) -> None:
    """``Linear -> RMSNorm -> Linear`` at ε = 0 with the logit as seed: the relevance pass
    divides by no forward value (the RMSNorm is recorded as ``x * t``), and equals gradient ×
    input with the rms held constant."""
    net, x64, got, g_n = _gradient_form(rng, lambda net, h: rms_norm(net, h, "dynamo"), [1, 0, 3])
    w1, gamma = net.inits["lin1/W"], net.inits["lut/gamma"]
    rms = np.sqrt(((x64 @ w1) ** 2).mean(-1, keepdims=True) + RMS_EPS)
    close(got, x64 * ((g_n * gamma / rms) @ w1.T))


def test_reciprocal_of_activation_is_refused(rng: np.random.Generator) -> None:
    """``Div(1, Sqrt(...))`` outside a matched RMSNorm has no rule: refused up front, not
    taken by the Div rule (which scales by a constant divisor)."""
    net = Net(rng, (4, 6))
    sq = net.node("Mul", [net.x, net.x], "sq")
    root = net.node("Sqrt", [net.node("Add", [sq, net.const("one", np.array(1.0))], "add")],
                    "sqrt")
    net.head(net.node("Div", [net.const("c", np.array(1.0)), root], "recip"))
    with pytest.raises(UnsupportedOp, match=r"'recip' \(ReciprocalOfActivation\)"):
        LRP(net.model(), Composite(GlobalMap(EpsilonRule(epsilon=0.0))))


# -- Neg ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", (PassRule(), ZeroRule(), EpsilonRule(epsilon=0.0)), ids=repr)
def test_neg(rule: Rule, rng: np.random.Generator) -> None:
    """``y = −x``: ``x ∂y/∂x R / y = R``, relevance passes unchanged."""
    net = Net(rng, (4, 6))
    y = net.node("Neg", [net.x], "lut/neg")
    x = rng.standard_normal((BATCH, 4, 6)).astype(F32)
    seed = rng.standard_normal((BATCH, 4, 6)).astype(F32)
    run = compile_run(net, y, on_lut(rule), x, seed)
    close(run.out["relevance"], seed.astype(np.float64))


def test_neg_gradient_form(rng: np.random.Generator) -> None:
    """``Linear -> Neg -> Linear`` at ε = 0: Neg records its input's relevance as ``x * (−g)``,
    so the first linear layer divides by nothing; the result is gradient × input."""
    net, x64, got, g_n = _gradient_form(
        rng, lambda net, h: net.node("Neg", [h], "neg"), [2, 4, 0])
    close(got, x64 * (-g_n @ net.inits["lin1/W"].T))


# -- Expand / Tile --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape_at_run_time", [False, True], ids=["const_shape", "run_time_shape"])
@pytest.mark.parametrize("rule", (PassRule(), EpsilonRule(epsilon=0.0)), ids=repr)
def test_expand_grouped_query(shape_at_run_time: bool, rule: Rule,
                              rng: np.random.Generator) -> None:
    """GQA's ``repeat_kv``: ``[N, 2, T, 4] -> Unsqueeze(2) -> Expand [N, 2, 2, T, 4] -> Reshape
    [N, 4, T, 4]``: each key/value gets the summed relevance of its copies."""
    net = Net(rng, (2, 3, 4))
    u = net.node("Unsqueeze", [net.x, ints(net, "axis2", [2])], "route/unsqueeze")
    if shape_at_run_time:  # the batch read from Shape(x), as both exporters write it
        batch = net.node("Shape", [net.x], "shape", start=0, end=1)
        shape = net.node("Concat", [batch, ints(net, "rest", [2, 2, 3, 4])], "shape_cat", axis=0)
    else:
        shape = ints(net, "shape", [1, 2, 2, 3, 4])
    e = net.node("Expand", [u, shape], "lut/expand")
    y = net.node("Reshape", [e, ints(net, "to", [0, 4, 3, 4])], "route/reshape")
    x = rng.standard_normal((BATCH, 2, 3, 4)).astype(F32)
    seed = rng.standard_normal((BATCH, 4, 3, 4)).astype(F32)
    run = compile_run(net, y, on_lut(rule), x, seed)
    want = seed.astype(np.float64).reshape(BATCH, 2, 2, 3, 4).sum(2)
    close(run.out["relevance"], want)


def test_tile(rng: np.random.Generator) -> None:
    """``Tile(x [N, 2, 3], [1, 2, 3])``: each element gets the relevance of its 6 copies."""
    net = Net(rng, (2, 3))
    y = net.node("Tile", [net.x, ints(net, "reps", [1, 2, 3])], "lut/tile")
    x = rng.standard_normal((BATCH, 2, 3)).astype(F32)
    seed = rng.standard_normal((BATCH, 4, 9)).astype(F32)
    run = compile_run(net, y, on_lut(EpsilonRule(epsilon=0.0)), x, seed)
    want = seed.astype(np.float64).reshape(BATCH, 2, 2, 3, 3).sum(axis=(1, 3))
    close(run.out["relevance"], want)


# -- the SwiGLU product -----------------------------------------------------------------------
def swiglu(net: Net, silu_first: bool) -> str:
    """``silu(x Wg) * (x Wu)`` (or the operands swapped)."""
    gate = linear(net, net.x, 6, 5, "gate")
    silu = net.node("Mul", [gate, net.node("Sigmoid", [gate], "gate/sigmoid")], "gate/silu")
    up = linear(net, net.x, 6, 5, "up")
    return net.node("Mul", [silu, up] if silu_first else [up, silu], "lut/mul")


@pytest.mark.parametrize("silu_first", [True, False], ids=["silu_first", "silu_second"])
@pytest.mark.parametrize("rule", (EpsilonRule(epsilon=0.0), ZeroRule()), ids=repr)
def test_swiglu_cp_gate(silu_first: bool, rule: Rule, rng: np.random.Generator) -> None:
    """CP-LRP (LXT's ``cp_LRP`` detaches ``gate_proj``): the SiLU operand is the gate held
    constant, in either operand order; the ``up_proj`` operand gets ``u s R / stab(s u)``."""
    net = Net(rng, (4, 6))
    y = swiglu(net, silu_first)
    x = rng.standard_normal((BATCH, 4, 6)).astype(F32)
    seed = rng.standard_normal((BATCH, 4, 5)).astype(F32)
    composite = Composite(GlobalMap(EpsilonRule(epsilon=0.0)), NameMap("lut/*", rule))
    run = compile_run(net, y, composite, x, seed, per_layer=True)
    x64 = x.astype(np.float64)
    g = x64 @ net.inits["gate/W"]
    s, u = g / (1 + np.exp(-g)), x64 @ net.inits["up/W"]
    eps = eps_of(rule)
    assert eps is not None
    want = u * s * tr.quotient(seed.astype(np.float64), s * u, eps)
    up_index, silu_index = (1, 0) if silu_first else (0, 1)
    close(run.sent("lut/mul", up_index), want)
    assert run.sent("lut/mul", silu_index, None) is None


@pytest.mark.parametrize("silu_first", [True, False], ids=["silu_first", "silu_second"])
def test_swiglu_uniform_halves(silu_first: bool, rng: np.random.Generator) -> None:
    """AttnLRP's uniform rule on the product: each operand gets half (``R / 2`` at ε = 0)."""
    net = Net(rng, (4, 6))
    y = swiglu(net, silu_first)
    x = rng.standard_normal((BATCH, 4, 6)).astype(F32)
    seed = rng.standard_normal((BATCH, 4, 5)).astype(F32)
    composite = Composite(GlobalMap(EpsilonRule(epsilon=0.0)),
                          NameMap("lut/*", UniformRule(epsilon=0.0)))
    run = compile_run(net, y, composite, x, seed, per_layer=True)
    for k in (0, 1):
        close(run.sent("lut/mul", k), seed.astype(np.float64) / 2)


# -- rotary Slice bounds computed from static dims --------------------------------------------
def rotate_half(net: Net) -> str:
    """Legacy rotate_half on the last axis: ``h = Shape(x)[2] / 2`` at run time, then
    ``Concat(−x[..., h:], x[..., :h])``."""
    dim = net.node("Gather", [net.node("Shape", [net.x], "shape"), ints(net, "i2", 2)], "dim",
                   axis=0)
    half = net.node("Div", [dim, ints(net, "two", 2)], "half")
    h = net.node("Unsqueeze", [net.node("Cast", [half], "half_cast", to=onnx.TensorProto.INT64),
                               ints(net, "ax0", [0])], "h")
    big, axis = ints(net, "big", [2**62]), ints(net, "last", [2])
    x1 = net.node("Slice", [net.x, ints(net, "zero", [0]), h, axis], "lut/x1")
    x2 = net.node("Slice", [net.x, h, big, axis], "lut/x2")
    return net.node("Concat", [net.node("Neg", [x2], "lut/neg"), x1], "lut/cat", axis=-1)


@pytest.mark.parametrize("rule", (PassRule(), EpsilonRule(epsilon=0.0)), ids=repr)
def test_rotate_half_run_time_bounds(rule: Rule, rng: np.random.Generator) -> None:
    net = Net(rng, (3, 8))
    y = rotate_half(net)
    x = rng.standard_normal((BATCH, 3, 8)).astype(F32)
    seed = rng.standard_normal((BATCH, 3, 8)).astype(F32)
    run = compile_run(net, y, on_lut(rule), x, seed)
    # the compiled model computes the original forward output
    np.testing.assert_array_equal(run.out[y], np.concatenate([-x[..., 4:], x[..., :4]], -1))
    r = seed.astype(np.float64)
    close(run.out["relevance"], np.concatenate([r[..., 4:], r[..., :4]], -1))


def test_static_slice_bounds_folds_static_dims_only() -> None:
    """A bound read from a static dim becomes a constant; one read from the run-time ``T``
    stays as it is."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", "T", 8])
    y1 = helper.make_tensor_value_info("y1", onnx.TensorProto.FLOAT, None)
    y2 = helper.make_tensor_value_info("y2", onnx.TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(np.asarray(v, np.int64), n) for n, v in
             (("i1", 1), ("i2", 2), ("two", 2), ("ax", [0]), ("zero", [0]), ("a1", [1]),
              ("a2", [2]))]
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i2"], ["d"], axis=0),
             helper.make_node("Div", ["d", "two"], ["h"]),
             helper.make_node("Unsqueeze", ["h", "ax"], ["hv"]),
             helper.make_node("Gather", ["s", "i1"], ["t"], axis=0),
             helper.make_node("Unsqueeze", ["t", "ax"], ["tv"]),
             helper.make_node("Slice", ["x", "zero", "hv", "a2"], ["y1"]),
             helper.make_node("Slice", ["x", "zero", "tv", "a1"], ["y2"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y1, y2], inits),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model = onnx.shape_inference.infer_shapes(model)
    folded = static_slice_bounds(model, "test")
    slices = [n for n in folded.graph.node if n.op_type == "Slice"]
    values = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    assert slices[0].input[2] in values and values[slices[0].input[2]].tolist() == [4]
    assert slices[1].input[2] == "tv"
    xv = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(F32)
    out = ort_session(folded).run(None, {"x": xv})
    np.testing.assert_array_equal(out[0], xv[..., :4])
    np.testing.assert_array_equal(out[1], xv)
