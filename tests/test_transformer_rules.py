"""The transformer ops x rules table: compile -> ONNX Runtime (CPU) -> compare with the float64
references of :mod:`lrp_onnx.testing.transformer_refs`.

Each model is the op under test (nodes ``lut/*``, which get the rule under test through a
``NameMap``) on pieces of the input ``x`` cut out by ``Slice``/``Transpose`` nodes (``route/*``,
PassRule, exact routing). It is compiled with ``output_relevance=True``, so the relevance
arriving at the op's output is a known random tensor: the seed. With ``per_layer=True`` the
relevance the op sends to each operand is read directly as well.

Conditioning. ORT computes each denominator ``z`` in float32; ``R / stab(z)`` with an arbitrary
(random) ``R`` then errs by ``|R| δz / z²``, where ``δz`` is about 1e-7 times the sum of the
magnitudes of the terms of ``z`` (attnlrp.md §3.3 item 3; a relevance arriving as ``z ⊙ g``, as
every rule sends it, has no such problem). A single rounding (``a b``, ``x / c``) has a relative
``δz`` and is well conditioned. For the sums, the inputs are dyadic rationals whose sums are
exact in float32 and never 0 (``a − b``, ``A Bᵀ``) or keep the sum away from 0: V's columns
have one sign each under a convex attention (``A V``), ``W2 > 0`` after a softmax, and ``β``
keeps the LayerNorm's ``|y| ≥ 0.5``. So the float32 tolerances check the rules, not the
conditioning of random seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pytest

from conftest import ort_session
from lrp_onnx import (
    CPLRP,
    LRP,
    AttnLRP,
    Composite,
    EpsilonRule,
    GlobalMap,
    NameMap,
    PassRule,
    Rule,
    UniformRule,
    ZeroRule,
)
from lrp_onnx.emit.contract import per_layer_name
from lrp_onnx.testing import references as lt
from lrp_onnx.testing import transformer_refs as tr
from lrp_onnx.testing.references import Net

BATCH = 3
F32 = np.float32
Refs = dict[str, np.ndarray]
#: ``make(rng, shape)``: a float64 input, exactly representable in float32 after rounding.
Inputs = Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]


# -- inputs -----------------------------------------------------------------------------------
def normal(scale: float = 1.0, offset: float = 0.0) -> Inputs:
    def make(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        return offset + scale * rng.standard_normal(shape)
    return make


def odd_quarters(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Odd multiples of 1/4 in [-7/4, 7/4]: a sum of an odd number of products of two of them
    is an odd multiple of 1/16, exact in float32 and never 0."""
    return (2 * rng.integers(-4, 4, size=shape) + 1) / 4.0


def quarters(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Multiples of 1/4 in [-2, 2] (0 included)."""
    return rng.integers(-8, 9, size=shape) / 4.0


def odd_eighths(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Odd multiples of 1/8: never equal to a multiple of 1/4, so ``quarters − odd_eighths`` is
    exact and never 0."""
    return (2 * rng.integers(-8, 8, size=shape) + 1) / 8.0


def split_inputs(make_a: Inputs, make_b: Inputs, n: int) -> Inputs:
    """``x`` whose first ``n`` entries along the first sample axis come from ``make_a``, the
    rest from ``make_b``."""
    def make(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        a_shape, b_shape = list(shape), list(shape)
        a_shape[1], b_shape[1] = n, shape[1] - n
        return np.concatenate([make_a(rng, tuple(a_shape)), make_b(rng, tuple(b_shape))],
                              axis=1)
    return make


def signed_columns(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Scores in the first ``T`` columns, then a V whose columns have one sign each with
    ``|V| ∈ [0.5, 1.5]`` (so ``|A V| ≥ 0.5`` for any attention ``A``): ``[..., T, T + K]``."""
    t = shape[-2]
    x = rng.standard_normal(shape)
    v = rng.uniform(0.5, 1.5, size=shape[:-1] + (shape[-1] - t,))
    signs = np.where(np.arange(shape[-1] - t) % 2 == 0, 1.0, -1.0)
    x[..., t:] = v * signs
    return x


# -- model pieces -----------------------------------------------------------------------------
def ints(net: Net, values: list[int]) -> str:
    return net.const(f"route/i{len(net.inits)}", np.asarray(values), dtype=np.int64)


def cut(net: Net, x: str, lo: int, hi: int, axis: int, name: str) -> str:
    """``x[lo:hi]`` along ``axis`` (a route node, PassRule)."""
    return net.node("Slice", [x, ints(net, [lo]), ints(net, [hi]), ints(net, [axis])],
                    f"route/{name}")


def swap_last(net: Net, x: str, rank: int, name: str) -> str:
    perm = list(range(rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    return net.node("Transpose", [x], f"route/{name}", perm=perm)


# -- the case table ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One op under test.

    ``build(net)`` adds the nodes on ``net.x`` and returns the output; ``ref(net, x, R, eps)``
    returns the expected relevance at ``x`` (key ``"x"``) and, by node name, what that ``lut/``
    node sends to its inputs (``"lut/matmul:0"`` for input 0); ``eps`` is ``None`` for
    PassRule. A ref may add ``"scale"``: the magnitude the atol is relative to, where it is not
    ``max |expected|`` (a result that is a small difference of large terms). ``tol`` maps a rule
    repr to ``(rtol, atol_scale)`` where the default float32 tolerance does not hold, with the
    measured cause next to it. ``seed``: ``"random"`` (the seed R is standard normal) or
    ``"proportional"`` (``R = y ⊙ g``, g standard normal, as every rule sends it: the model gets
    ORT's float32 ``y`` times g, the reference the float64 ``y`` times g). ``composite(rule)``
    assigns the rules (default: the rule on ``lut/*``, PassRule on the routing nodes).
    """

    id: str
    op: str
    sample: tuple[int, ...]
    build: Callable[[Net], str]
    ref: Callable[[Net, np.ndarray, np.ndarray, float | None], Refs]
    rules: tuple[Rule, ...]
    inputs: Inputs = normal()
    tol: dict[str, tuple[float, float]] = field(default_factory=dict)
    seed: str = "random"
    composite: Callable[[Rule], Composite] | None = None


def rule_eps(rule: Rule) -> float:
    eps = eps_of(rule)
    assert eps is not None
    return eps


def eps_of(rule: Rule) -> float | None:
    """The stabilizer a rule puts in its denominators (``None``: PassRule)."""
    if isinstance(rule, PassRule):
        return None
    if isinstance(rule, ZeroRule):
        return rule.stabilizer
    assert isinstance(rule, (EpsilonRule, UniformRule))
    return rule.epsilon


Z_RULES = (ZeroRule(), EpsilonRule(epsilon=0.0))
ROUTE_RULES = (PassRule(), EpsilonRule(epsilon=0.0))


# LayerNormalization ------------------------------------------------------------------------
LN_EPS = 1e-5


def layernorm(axis: int) -> Callable[[Net], str]:
    def build(net: Net) -> str:
        dims = net.sample[axis % (len(net.sample) + 1) - 1:]
        d = int(np.prod(dims))
        gamma = net.rng.uniform(0.5, 1.5, size=dims) * net.rng.choice([-1.0, 1.0], size=dims)
        # |γ x̂| ≤ |γ| sqrt(D − 1): this β keeps |y| ≥ 0.5, with both signs
        beta = net.rng.choice([-1.0, 1.0], size=dims) * (np.abs(gamma) * np.sqrt(d - 1) + 0.5)
        g, b = net.const("lut/gamma", gamma), net.const("lut/beta", beta)
        return net.node("LayerNormalization", [net.x, g, b], "lut/ln", axis=axis,
                        epsilon=LN_EPS)
    return build


def layernorm_ref(axis: int) -> Callable:
    def ref(net: Net, x: np.ndarray, R: np.ndarray, eps: float | None) -> Refs:
        if eps is None:
            return {"x": R}
        y, _ = tr.layer_norm(x, net.inits["lut/gamma"], net.inits["lut/beta"], LN_EPS, axis)
        assert np.abs(y).min() >= 0.5  # the conditioning the module docstring relies on
        return {"x": tr.ref_layernorm_rule(x, net.inits["lut/gamma"], net.inits["lut/beta"], R,
                                           LN_EPS, axis, eps)}
    return ref


LN_RULES = (ZeroRule(), EpsilonRule(epsilon=1e-3), EpsilonRule(epsilon=0.0), PassRule())

# Softmax -------------------------------------------------------------------------------------
def softmax_chain(mask: float | None = None, axis: int = -1) -> Callable[[Net], str]:
    """``[Add(causal mask) ->] Softmax(axis) -> MatMul(W2)``: inside the graph, not a stripped
    head. ``W2 > 0`` keeps ``o = s W2`` away from 0 (≥ 0.5 for the last axis), so ``R / o`` is
    well conditioned."""
    def build(net: Net) -> str:
        t = net.sample[-1]
        x = net.x
        if mask is not None:
            causal = np.where(np.triu(np.ones((t, t)), 1) > 0, mask, 0.0)
            x = net.node("Add", [x, net.const("lut/mask", causal)], "lut/mask_add")
        s = net.node("Softmax", [x], "lut/softmax", axis=axis)
        w2 = net.const("lut/W2", net.rng.uniform(0.5, 1.5, size=(t, 4)))
        return net.node("MatMul", [s, w2], "lut/matmul")
    return build


def softmax_ref(axis: int = -1) -> Callable:
    def ref(net: Net, x: np.ndarray, R: np.ndarray, eps: float | None) -> Refs:
        assert eps is not None
        mask = net.inits.get("lut/mask")
        a = x if mask is None else x + mask
        s = tr.softmax(a, axis)
        w2 = net.inits["lut/W2"]
        r_s = s * (tr.quotient(R, s @ w2, eps) @ w2.T)  # ε-rule of the MatMul
        r_a = tr.ref_softmax_rule(a, r_s, axis)
        r_x = r_a if mask is None else x * tr.quotient(r_a, a, eps)  # the mask absorbs its share
        # the rule's result is a difference of terms of this size (see SOFTMAX_SCALES)
        a0 = np.where(np.isinf(a), 0.0, a)
        scale = np.abs(a0) * (np.abs(r_s) + s * np.abs(r_s.sum(axis=axis, keepdims=True)))
        return {"x": r_x, "lut/softmax:0": r_a, "scale": np.asarray(scale.max())}
    return ref


# BilinearMatMul ------------------------------------------------------------------------------
def bilinear_qk(net: Net) -> str:
    """``O = A Bᵀ`` with ``A, B`` the two halves of the last axis (``Q Kᵀ``)."""
    rank, k = len(net.sample) + 1, net.sample[-1] // 2
    a = cut(net, net.x, 0, k, -1, "a")
    b = swap_last(net, cut(net, net.x, k, 2 * k, -1, "b"), rank, "bT")
    return net.node("MatMul", [a, b], "lut/matmul")


def bilinear_qk_ref(net: Net, x: np.ndarray, R: np.ndarray, eps: float | None) -> Refs:
    assert eps is not None
    k = x.shape[-1] // 2
    a, b = x[..., :k], np.swapaxes(x[..., k:], -1, -2)
    r_a, r_b = tr.ref_bilinear_uniform(a, b, R, eps)
    return {"x": np.concatenate([r_a, np.swapaxes(r_b, -1, -2)], axis=-1),
            "lut/matmul:0": r_a, "lut/matmul:1": r_b}


def bilinear_broadcast(heads_a: int) -> Callable[[Net], str]:
    """``A = x[:, :heads_a]``, ``B = x[:, heads_a:]ᵀ`` with 1 head in one of them, broadcast
    over the other's heads (``x [N, 3, T, K]``)."""
    def build(net: Net) -> str:
        a = cut(net, net.x, 0, heads_a, 1, "a")
        b = swap_last(net, cut(net, net.x, heads_a, net.sample[0], 1, "b"), 4, "bT")
        return net.node("MatMul", [a, b], "lut/matmul")
    return build


def bilinear_broadcast_ref(heads_a: int) -> Callable:
    def ref(net: Net, x: np.ndarray, R: np.ndarray, eps: float | None) -> Refs:
        assert eps is not None
        a, b = x[:, :heads_a], np.swapaxes(x[:, heads_a:], -1, -2)
        r_a, r_b = tr.ref_bilinear_uniform(a, b, R, eps)
        return {"x": np.concatenate([r_a, np.swapaxes(r_b, -1, -2)], axis=1),
                "lut/matmul:0": r_a, "lut/matmul:1": r_b}
    return ref


def attention_av(net: Net) -> str:
    """``O = Softmax(S) V`` with ``S, V`` cut from ``x [..., T, T + K]``."""
    t = net.sample[-2]
    a = net.node("Softmax", [cut(net, net.x, 0, t, -1, "scores")], "lut/softmax", axis=-1)
    v = cut(net, net.x, t, net.sample[-1], -1, "v")
    return net.node("MatMul", [a, v], "lut/matmul")


def attention_cp_ref(net: Net, x: np.ndarray, R: np.ndarray, eps: float | None) -> Refs:
    """CP-LRP: the attention is held constant; the scores get nothing."""
    assert eps is not None
    t = x.shape[-2]
    a, v = tr.softmax(x[..., :t]), x[..., t:]
    r_v = tr.ref_bilinear_cp(a, v, R, eps)
    return {"x": np.concatenate([np.zeros_like(a), r_v], axis=-1), "lut/matmul:1": r_v}


def attention_uniform_ref(net: Net, x: np.ndarray, R: np.ndarray, eps: float | None) -> Refs:
    """AttnLRP: uniform on ``A V``, then the softmax rule on the scores."""
    assert eps is not None
    t = x.shape[-2]
    scores, v = x[..., :t], x[..., t:]
    r_a, r_v = tr.ref_bilinear_uniform(tr.softmax(scores), v, R, eps)
    return {"x": np.concatenate([tr.ref_softmax_rule(scores, r_a), r_v], axis=-1),
            "lut/matmul:0": r_a, "lut/matmul:1": r_v}


UNIFORM_RULES = (UniformRule(epsilon=0.0), UniformRule(epsilon=1e-3))


# Mul / Sub / Div -----------------------------------------------------------------------------
def two_operands(op: str, split: int) -> Callable[[Net], str]:
    """``op(x[:, :split], x[:, split:])`` along the first sample axis (broadcast when the
    parts' sizes differ and one is 1)."""
    def build(net: Net) -> str:
        a = cut(net, net.x, 0, split, 1, "a")
        b = cut(net, net.x, split, net.sample[0], 1, "b")
        return net.node(op, [a, b], f"lut/{op.lower()}")
    return build


def two_operands_ref(ref: Callable, op: str, split: int) -> Callable:
    def make(net: Net, x: np.ndarray, R: np.ndarray, eps: float | None) -> Refs:
        assert eps is not None
        r_a, r_b = ref(x[:, :split], x[:, split:], R, eps)
        name = f"lut/{op.lower()}"
        return {"x": np.concatenate([r_a, r_b], axis=1), f"{name}:0": r_a, f"{name}:1": r_b}
    return make


def with_const(op: str, value: np.ndarray, const_first: bool = False) -> Callable[[Net], str]:
    def build(net: Net) -> str:
        c = net.const("lut/c", value)
        return net.node(op, [c, net.x] if const_first else [net.x, c], f"lut/{op.lower()}")
    return build


def with_const_ref(ref: Callable, const_first: bool = False) -> Callable:
    def make(net: Net, x: np.ndarray, R: np.ndarray, eps: float | None) -> Refs:
        if eps is None:
            return {"x": R}
        c = net.inits["lut/c"]
        if const_first:  # c − x: x is the subtrahend
            return {"x": ref(c, x, R, eps)[1]}
        return {"x": ref(x, c, R, eps)}
    return make


#: A constant subtrahend/minuend that no multiple of 1/4 equals.
ODD_EIGHTHS = np.array([0.375, -0.625, 1.125, -0.125, 0.875])


def sub_ref(a: np.ndarray, b: np.ndarray, R: np.ndarray, eps: float) -> np.ndarray:
    return tr.ref_sub(a, b, R, eps)[0]


# Gather --------------------------------------------------------------------------------------
def gather(indices: Any, axis: int, via_axis0: bool = False) -> Callable[[Net], str]:
    """``Gather(x, indices, axis)``; ``via_axis0``: on ``x`` with its batch and first sample
    axes swapped (so that axis 0 has a static size), swapped back afterwards."""
    def build(net: Net) -> str:
        idx = net.const("lut/indices", np.asarray(indices), dtype=np.int64)
        x = net.node("Transpose", [net.x], "route/swap", perm=[1, 0, 2]) if via_axis0 else net.x
        y = net.node("Gather", [x, idx], "lut/gather", axis=axis)
        if via_axis0 and np.ndim(indices) == 1:
            y = net.node("Transpose", [y], "route/back", perm=[1, 0, 2])
        return y
    return build


def gather_ref(indices: Any, axis: int, via_axis0: bool = False) -> Callable:
    def ref(net: Net, x: np.ndarray, R: np.ndarray, eps: float | None) -> Refs:
        if not via_axis0:
            return {"x": tr.ref_gather(x.shape, indices, axis, R)}
        moved = x.swapaxes(0, 1)
        r = R.swapaxes(0, 1) if np.ndim(indices) == 1 else R
        return {"x": tr.ref_gather(moved.shape, indices, axis, r).swapaxes(0, 1)}
    return ref


def identity_ref(net: Net, x: np.ndarray, R: np.ndarray, eps: float | None) -> Refs:
    return {"x": R}  # the identity rule: elementwise activations pass R


def unary(op: str, *consts: float) -> Callable[[Net], str]:
    def build(net: Net) -> str:
        extra = [net.const(f"lut/c{i}", np.asarray(v)) for i, v in enumerate(consts)]
        return net.node(op, [net.x, *extra], f"lut/{op.lower()}")
    return build


# Softmax tolerance (attnlrp.md §3.3 item 1: float32 error grows with |x|). The rule's result
# ``x ⊙ (R − s Σ R)`` is a difference of terms of size ``|x| (|R| + s |Σ R|)``; at the peak of a
# peaked softmax ``R ≈ s Σ R`` cancels (float32 even rounds s to exactly 1.0), so the exact
# result is far smaller than those terms and no float32 evaluation gets it to a relative
# 1e-6. Measured over the 6 seeds of ``--extended`` (ZeroRule / EpsilonRule(0)):
#   max |err| / max |expected|:              |x|~1: 2.0e-6, ~10: 1.4e-5, ~100: 1.0
#   max |err| / max |x| (|R| + s |Σ R|):     |x|~1: 8.4e-8, ~10: 6.4e-8, ~100: 2.4e-8
# (at |x|~100 every row of 5 saturates and the exact result is ~1e-7 of those terms). So the
# softmax rows keep the default rtol and atol = 1e-6 but relative to that cancellation scale
# (the ref's "scale"), which holds at every |x| with a 12x margin (1.4 ulp measured).
SOFTMAX_SCALES = (1.0, 10.0, 100.0)

# LayerNormalization at a common offset μ = 300 (std 2): ORT's float32 forward rounds x − μ at
# |μ| 2^-24 ≈ 1.8e-5, i.e. ~9e-6 relative in x̂ and in InvStdDev. With a random seed the explicit
# R / y of the rule (|y| ≥ 0.5, |γ| ≤ 1.5) amplifies that by |γ| / |y| ≤ 3 (attnlrp.md §3.3
# item 3): measured max |err| / max |expected| 2.1e-5 over 6 seeds, hence 3e-5. With the seed
# proportional to y (R / y = g exactly) only InvStdDev's error remains: measured 7.9e-6 (the
# seed itself, float32 y times g against float64 y times g, differs by 3.7e-6), hence 2e-5.
LN_OFFSET_TOL = {repr(r): (3e-5, 3e-5) for r in (ZeroRule(), EpsilonRule(epsilon=1e-3),
                                                EpsilonRule(epsilon=0.0))}
LN_OFFSET_PROPORTIONAL_TOL = {repr(r): (2e-5, 2e-5) for r in LN_RULES}

CASES: list[Case] = [
    *[Case(f"ln_axis{axis}", "LayerNormalization", sample, layernorm(axis), layernorm_ref(axis),
           LN_RULES) for axis, sample in ((-1, (4, 6)), (-2, (2, 4, 6)))],
    # a large common offset (see LN_OFFSET_TOL)
    Case("ln_offset300", "LayerNormalization", (4, 6), layernorm(-1), layernorm_ref(-1),
         LN_RULES, inputs=normal(2.0, 300.0), tol=LN_OFFSET_TOL),
    Case("ln_offset300_proportional", "LayerNormalization", (4, 6), layernorm(-1),
         layernorm_ref(-1), LN_RULES, inputs=normal(2.0, 300.0), seed="proportional",
         tol=LN_OFFSET_PROPORTIONAL_TOL),
    *[Case(f"softmax_x{scale:g}", "Softmax", (2, 5, 5), softmax_chain(), softmax_ref(),
           Z_RULES, inputs=normal(scale)) for scale in SOFTMAX_SCALES],
    Case("softmax_axis2", "Softmax", (2, 5, 5), softmax_chain(axis=2), softmax_ref(2), Z_RULES),
    Case("softmax_mask_inf", "Softmax", (2, 5, 5), softmax_chain(-np.inf), softmax_ref(),
         Z_RULES),
    Case("softmax_mask_finfo_min", "Softmax", (2, 5, 5),
         softmax_chain(float(np.finfo(np.float32).min)), softmax_ref(), Z_RULES),
    Case("bilinear_rank3", "BilinearMatMul", (4, 6), bilinear_qk, bilinear_qk_ref, UNIFORM_RULES,
         inputs=odd_quarters),
    Case("bilinear_rank4", "BilinearMatMul", (2, 4, 6), bilinear_qk, bilinear_qk_ref,
         UNIFORM_RULES, inputs=odd_quarters),
    *[Case(f"bilinear_broadcast_{which}", "BilinearMatMul", (3, 4, 3),
           bilinear_broadcast(heads), bilinear_broadcast_ref(heads), UNIFORM_RULES,
           inputs=odd_quarters) for which, heads in (("b", 2), ("a", 1))],
    Case("bilinear_cp_rank3", "BilinearMatMul", (4, 7), attention_av, attention_cp_ref, Z_RULES,
         inputs=signed_columns),
    Case("bilinear_cp_rank4", "BilinearMatMul", (2, 4, 7), attention_av, attention_cp_ref,
         Z_RULES, inputs=signed_columns),
    Case("bilinear_attn_uniform", "BilinearMatMul", (2, 4, 7), attention_av,
         attention_uniform_ref, UNIFORM_RULES, inputs=signed_columns,
         composite=lambda rule: Composite(
             GlobalMap(PassRule()), NameMap("lut/*", EpsilonRule(epsilon=rule_eps(rule))),
             NameMap("lut/matmul", rule))),
    Case("mul_two_activations", "Mul", (2, 5), two_operands("Mul", 1),
         two_operands_ref(tr.ref_mul_uniform, "Mul", 1), UNIFORM_RULES),
    Case("mul_broadcast", "Mul", (4, 5), two_operands("Mul", 1),
         two_operands_ref(tr.ref_mul_uniform, "Mul", 1), UNIFORM_RULES),
    Case("mul_const", "Mul", (3, 5), with_const("Mul", np.array([2.0, -0.5, 3.0, -7.0, 0.3])),
         with_const_ref(tr.ref_mul_const), (*Z_RULES, PassRule())),
    Case("mul_scalar", "Mul", (3, 5), with_const("Mul", np.array(0.125)),
         with_const_ref(tr.ref_mul_const), Z_RULES),
    Case("sub_data", "Sub", (2, 5), two_operands("Sub", 1),
         two_operands_ref(tr.ref_sub, "Sub", 1), (*Z_RULES, EpsilonRule(epsilon=0.1)),
         inputs=split_inputs(quarters, odd_eighths, 1)),
    Case("sub_broadcast", "Sub", (4, 5), two_operands("Sub", 1),
         two_operands_ref(tr.ref_sub, "Sub", 1), Z_RULES,
         inputs=split_inputs(odd_eighths, quarters, 1)),
    Case("sub_const", "Sub", (3, 5), with_const("Sub", ODD_EIGHTHS), with_const_ref(sub_ref),
         Z_RULES, inputs=quarters),
    Case("sub_const_first", "Sub", (3, 5), with_const("Sub", ODD_EIGHTHS, const_first=True),
         with_const_ref(tr.ref_sub, const_first=True), Z_RULES, inputs=quarters),
    Case("div_const", "Div", (3, 5), with_const("Div", np.array([3.0, -0.5, 2.0, -7.0, 0.3])),
         with_const_ref(tr.ref_div_const), (*Z_RULES, PassRule())),
    Case("div_scalar", "Div", (3, 5), with_const("Div", np.array(6.0)),
         with_const_ref(tr.ref_div_const), (*Z_RULES, PassRule())),
    Case("gather_scalar_axis1", "Gather", (4, 5), gather(2, 1), gather_ref(2, 1), ROUTE_RULES),
    Case("gather_range_last", "Gather", (4, 5), gather([1, 2, 3], -1), gather_ref([1, 2, 3], -1),
         ROUTE_RULES),
    Case("gather_repeated_unsorted", "Gather", (4, 5), gather([3, 0, 3, 1], 1),
         gather_ref([3, 0, 3, 1], 1), ROUTE_RULES),
    Case("gather_negative_last", "Gather", (4, 5), gather([-1, 0], 2), gather_ref([-1, 0], 2),
         ROUTE_RULES),
    Case("gather_axis0", "Gather", (4, 5), gather([2, 0, 2], 0, True),
         gather_ref([2, 0, 2], 0, True), ROUTE_RULES),
    Case("gather_axis0_scalar", "Gather", (4, 5), gather(-3, 0, True), gather_ref(-3, 0, True),
         ROUTE_RULES),
    Case("erf", "Erf", (3, 5), unary("Erf"), identity_ref, (*ROUTE_RULES, ZeroRule())),
    Case("pow", "Pow", (3, 5), unary("Pow", 3.0), identity_ref, (*ROUTE_RULES, ZeroRule())),
]


# -- the harness ------------------------------------------------------------------------------
@dataclass
class Run:
    net: Net
    lrp: LRP
    x: np.ndarray  # float32 input
    seed: np.ndarray  # float32 seed at the output
    out: dict[str, np.ndarray]  # every output of the compiled model

    def sent(self, node: str, k: int, default: Any = KeyError) -> Any:
        """The relevance the layer named ``node`` sends to its ``k``-th input (``default``
        where it sends none)."""
        layer = next(la for la in self.lrp.layers if la.name == node)
        name = per_layer_name(layer, k, len(layer.inputs))
        if name not in self.out and default is not KeyError:
            return default
        return self.out[name]


def compile_run(net: Net, output: str, composite: Composite, x: np.ndarray, seed: np.ndarray,
                **kwargs: Any) -> Run:
    """Compile ``net`` up to ``output`` with an explicit seed and run it on the CPU EP."""
    lrp = LRP(net.model(output=output), composite, output_relevance=True, **kwargs)
    names = [o.name for o in lrp.model.graph.output]
    values = ort_session(lrp.model).run(names, {"x": x, "output_relevance": seed})
    return Run(net, lrp, x, seed, dict(zip(names, values)))


def default_composite(rule: Rule) -> Composite:
    return Composite(GlobalMap(PassRule()), NameMap("lut/*", rule))


def run_case(case: Case, rule: Rule, rng: np.random.Generator) -> tuple[Run, Refs]:
    net = Net(rng, case.sample)
    y = case.build(net)
    x = case.inputs(rng, (BATCH, *case.sample)).astype(F32)
    x64 = x.astype(np.float64)
    y64 = net.run64(x64, output=y)
    g = rng.standard_normal(y64.shape)
    if case.seed == "proportional":
        y32 = ort_session(net.model(output=y)).run([y], {"x": x})[0]
        seed, r64 = (y32 * g).astype(F32), y64 * g
    else:
        seed = g.astype(F32)
        r64 = seed.astype(np.float64)
    composite = (case.composite or default_composite)(rule)
    run = compile_run(net, y, composite, x, seed, per_layer=True)
    # the forward output is the model's own: check it (and the reference's model) in float64
    np.testing.assert_allclose(run.out[y], y64, rtol=1e-5, atol=1e-5 * np.abs(y64).max())
    return run, case.ref(net, x64, r64, eps_of(rule))


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """``max |got − want| / max |want|`` (the measure the tolerances above quote)."""
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def check(run: Run, refs: Refs, tol: tuple[float, float] | None = None) -> None:
    rtol, atol = tol if tol is not None else lt.TOLERANCES[np.dtype(F32)]
    assert np.abs(refs["x"]).max() > 0, "degenerate case: the reference relevance is all zero"
    for key, want in refs.items():
        if key == "scale":
            continue
        got = run.out["relevance"] if key == "x" else run.sent(*split_key(key))
        # atol relative to the given magnitude where there is one, else to max |want|
        base = float(refs["scale"]) if "scale" in refs else float(np.abs(want).max())
        atol_scale = atol * base / max(float(np.abs(want).max()), 1e-300)
        lt.assert_relevance_close(got, want, F32, rtol, atol_scale)


def split_key(key: str) -> tuple[str, int]:
    node, k = key.rsplit(":", 1)
    return node, int(k)


PARAMS = [pytest.param(case, rule, id=f"{case.id}-{rule!r}")
          for case in CASES for rule in case.rules]


@pytest.mark.parametrize(("case", "rule"), PARAMS)
def test_transformer_op(case: Case, rule: Rule, rng: np.random.Generator) -> None:
    run, refs = run_case(case, rule, rng)
    check(run, refs, case.tol.get(repr(rule)))


# -- properties of the rows above -------------------------------------------------------------
def per_sample_sum(r: np.ndarray) -> np.ndarray:
    return r.astype(np.float64).reshape(len(r), -1).sum(axis=1)


def per_sample_abs(r: np.ndarray) -> np.ndarray:
    return np.abs(r.astype(np.float64)).reshape(len(r), -1).sum(axis=1)


CONSERVING = [pytest.param(c, r, id=f"{c.id}-{r!r}") for c in CASES
              if c.op in ("BilinearMatMul", "Mul") and c.composite is None and c.id != "mul_const"
              and c.id != "mul_scalar" for r in c.rules if eps_of(r) == 0.0]


@pytest.mark.parametrize(("case", "rule"), CONSERVING)
def test_products_conserve(case: Case, rule: Rule, rng: np.random.Generator) -> None:
    """At ε = 0, per sample: ``Σ R_A + Σ R_B = Σ R`` (uniform), ``Σ R_V = Σ R`` (CP), on the
    relevance the compiled model sends to the two operands; a Mul of two activations of one
    shape sends ``R / 2`` to each."""
    run, _ = run_case(case, rule, rng)
    node = "lut/matmul" if case.op == "BilinearMatMul" else "lut/mul"
    # CP: the attention operand (input 0) gets nothing, so there is no output for it
    sent = [r for r in (run.sent(node, k, None) for k in (0, 1)) if r is not None]
    # float32 rounding of each of the summed terms: 1e-6 of their magnitudes
    np.testing.assert_allclose(sum(per_sample_sum(r) for r in sent), per_sample_sum(run.seed),
                               rtol=0, atol=1e-6 * per_sample_abs(run.seed).max())
    if case.op == "Mul" and sent[0].shape == sent[1].shape == run.seed.shape:
        for r in sent:
            np.testing.assert_allclose(r, run.seed / 2, rtol=1e-6)


MASKED = [pytest.param(c, r, id=f"{c.id}-{r!r}") for c in CASES
          if c.id.startswith("softmax_mask") for r in c.rules]


@pytest.mark.parametrize(("case", "rule"), MASKED)
def test_masked_scores_get_no_relevance(case: Case, rule: Rule,
                                        rng: np.random.Generator) -> None:
    """A ``-inf`` (or ``finfo.min``) mask before the softmax: every relevance is finite and the
    masked scores get exactly 0, at the softmax input and at the model input."""
    run, _ = run_case(case, rule, rng)
    for value in run.out.values():
        assert np.all(np.isfinite(value))
    masked = np.broadcast_to(run.net.inits["lut/mask"] < 0, run.x.shape)
    assert masked.any()
    assert np.all(run.out["relevance"][masked] == 0)
    assert np.all(run.sent("lut/softmax", 0)[masked] == 0)
    assert np.abs(run.out["relevance"][~masked]).max() > 0


# -- the gradient form: EpsilonRule(epsilon=0) --------------------------------------------------
TARGETS = np.array([1, 4, 0], dtype=np.int64)


def linear(net: Net, x: str, fin: int, fout: int, name: str) -> str:
    z = net.node("MatMul", [x, net.param(f"{name}/W", (fin, fout))], f"{name}/matmul")
    return net.node("Add", [z, net.param(f"{name}/b", (fout,), scale=0.5)], f"{name}/add")


def linear_ln_linear(rng: np.random.Generator) -> Net:
    """Linear -> LayerNorm -> Linear, plus a residual Add around the last two, and the head."""
    net = Net(rng, (4, 6))
    h = linear(net, net.x, 6, 6, "lin1")
    gamma = net.const("ln/gamma", rng.uniform(0.5, 1.5, size=6))
    n = net.node("LayerNormalization", [h, gamma, net.param("ln/beta", (6,), scale=0.3)],
                 "ln/ln", axis=-1, epsilon=LN_EPS)
    o = linear(net, n, 6, 6, "lin2")
    net.head(net.node("Add", [o, h], "res/add"))
    return net


def lrp_divisions(model: onnx.ModelProto) -> tuple[int, int]:
    """``Div`` nodes of the relevance pass (``lrp/`` nodes): ``(all, by a value that is not
    a constant)`` (the Div-by-constant rule divides by its constant, which is no denominator)."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    divs = [n for n in model.graph.node if n.name.startswith("lrp/") and n.op_type == "Div"]
    return len(divs), sum(1 for n in divs if n.input[1] not in consts)


def chain_reference(net: Net, x: np.ndarray, eps: float) -> np.ndarray:
    """float64 ε-rule through the chain of :func:`linear_ln_linear` (rows of ``[N*T, D]``)."""
    rows = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    w1, b1 = net.inits["lin1/W"].T, net.inits["lin1/b"]
    w2, b2 = net.inits["lin2/W"].T, net.inits["lin2/b"]
    h = x @ w1.T + b1
    n, _ = tr.layer_norm(h, net.inits["ln/gamma"], net.inits["ln/beta"], LN_EPS)
    o = n @ w2.T + b2
    w_head, b_head = net.head_params
    r_res = lt.ref_head(w_head, b_head, o + h, TARGETS, eps=eps)
    q = tr.quotient(r_res, o + h, eps)  # residual: proportional split
    r_o, r_h = o * q, h * q
    r_n = lt.ref_epsilon(w2, b2, rows(n), rows(r_o), eps).reshape(n.shape)
    r_h = r_h + tr.ref_layernorm_rule(h, net.inits["ln/gamma"], net.inits["ln/beta"], r_n,
                                      LN_EPS, eps=eps)
    return lt.ref_epsilon(w1, b1, rows(x), rows(r_h), eps).reshape(x.shape)


def scaled_softmax_gather(rng: np.random.Generator) -> Net:
    """Linear -> Mul(const) -> Div(const) -> Sub(const) -> Softmax -> MatMul -> Gather, and the
    head: the other ops of this file that pass the gradient form on."""
    net = Net(rng, (4, 6))
    h = linear(net, net.x, 6, 6, "lin1")
    h = net.node("Mul", [h, net.const("ops/c", rng.uniform(0.5, 2.0, size=6))], "ops/mul")
    h = net.node("Div", [h, net.const("ops/d", np.asarray(3.0))], "ops/div")
    h = net.node("Sub", [h, net.param("ops/s", (6,), scale=0.5)], "ops/sub")
    h = net.node("Softmax", [h], "ops/softmax", axis=-1)
    h = net.node("MatMul", [h, net.param("lin2/W", (6, 6))], "lin2/matmul")
    net.head(net.node("Gather", [h, net.const("ops/i", np.array([3, 0, 3]), dtype=np.int64)],
                      "ops/gather", axis=1))
    return net


@pytest.mark.parametrize("chain", [linear_ln_linear, scaled_softmax_gather],
                         ids=lambda f: f.__name__)
def test_epsilon_zero_is_the_gradient_form(chain: Callable[[np.random.Generator], Net],
                                           rng: np.random.Generator) -> None:
    """EpsilonRule(0) through a chain equals EpsilonRule(1e-12) to float32 tolerance (and,
    for Linear -> LayerNorm -> Linear with a residual Add, the float64 reference at ε = 0), and
    is emitted with fewer divisions: only the seed's, at the head."""
    net = chain(rng)
    x = rng.standard_normal((BATCH, 4, 6)).astype(F32)
    feeds = {"x": x, "target": TARGETS}
    results, divs = {}, {}
    for eps in (0.0, 1e-12):
        model = LRP(net.model(), Composite(GlobalMap(EpsilonRule(epsilon=eps)))).model
        results[eps] = ort_session(model).run(["relevance"], feeds)[0]
        divs[eps] = lrp_divisions(model)
    lt.assert_relevance_close(results[0.0], results[1e-12].astype(np.float64), F32)
    if chain is linear_ln_linear:
        lt.assert_relevance_close(results[0.0], chain_reference(net, x.astype(np.float64), 0.0),
                                  F32)
    assert divs[0.0][0] < divs[1e-12][0], divs
    assert divs[0.0][1] <= 1, divs  # the one-hot seed is not of the form logits * g


#: A Gemm whose first output is exactly 0 on every row of ZERO_X (dyadic values: exact in
#: float32 too), with a bias there, and the other outputs away from 0.
ZERO_W = np.array([[1.0, -1.0, 0.5, -0.5], [1.0, 2.0, 0.0, 1.0], [-1.0, 0.5, 1.0, 0.25]])
ZERO_B = np.array([0.5, 0.5, -0.25])
ZERO_X = np.array([[1.0, 1.5, 2.0, 2.0], [2.0, 2.0, 1.0, 2.0], [0.5, 0.5, 1.0, 2.0]], dtype=F32)


def zero_gemm(rng: np.random.Generator) -> tuple[Net, str, np.ndarray]:
    net = Net(rng, (4,))
    y = net.node("Gemm", [net.x, net.const("lut/W", ZERO_W), net.const("lut/C", ZERO_B)],
                 "lut/gemm", transB=1)
    z = ZERO_X.astype(np.float64) @ ZERO_W.T + ZERO_B
    assert np.all(z[:, 0] == 0) and np.all(z[:, 1:] != 0)
    return net, y, z


def test_zero_preactivation_under_epsilon_zero(rng: np.random.Generator) -> None:
    """An exact ``z = 0`` (with ``R = 0`` there) under EpsilonRule(0) gives finite relevance:
    explicitly (the seed's ``R / z``, with ``0 / 0 := 0``, equal to the reference) and in the
    gradient form (relevance arriving as ``z * g`` from a head above)."""
    net, y, z = zero_gemm(rng)
    rule = Composite(GlobalMap(EpsilonRule(epsilon=0.0)))
    seed = rng.standard_normal((3, 3)).astype(F32)
    seed[:, 0] = 0.0
    run = compile_run(net, y, rule, ZERO_X, seed)
    assert np.all(np.isfinite(run.out["relevance"]))
    want = ZERO_X * (tr.quotient(seed.astype(np.float64), z, 0.0) @ ZERO_W)
    lt.assert_relevance_close(run.out["relevance"], want, F32)

    net.head(y)
    got = ort_session(LRP(net.model(), rule).model).run(
        ["relevance"], {"x": ZERO_X, "target": TARGETS})[0]
    assert np.all(np.isfinite(got))


def test_zero_preactivation_gradient_form_is_gradient_times_input(
        rng: np.random.Generator) -> None:
    """At an exact zero ``z_0 = 0``, ε = 0 in the gradient form passes the factor ``g_0`` on, as
    LXT's gradient × input does (the unit sends ``x_i W_0i g_0``: with a bias ``b_0`` that is
    ``-b_0 g_0``, created where the limit ε → 0 would give 0); a positive ε, however small,
    gives the limit ``0 / 0 := 0`` (docs/transformers.md, EpsilonRule's docstring)."""
    net, y, z = zero_gemm(rng)
    net.head(y)
    results = {}
    for eps in (0.0, 1e-12):
        model = LRP(net.model(), Composite(GlobalMap(EpsilonRule(epsilon=eps)))).model
        results[eps] = ort_session(model).run(["relevance"],
                                               {"x": ZERO_X, "target": TARGETS})[0]
    w_head, b_head = net.head_params
    r_z = lt.ref_head(w_head, b_head, z, TARGETS, eps=0.0)
    assert np.all(r_z[:, 0] == 0)
    limit = ZERO_X * (tr.quotient(r_z, z, 0.0) @ ZERO_W)
    lt.assert_relevance_close(results[1e-12], limit, F32)  # the explicit form: as the limit
    logit = (z @ w_head.T + b_head)[np.arange(len(z)), TARGETS]
    # the seed 1 at the logit is R / logit at it: the gradient d logit / d z over the logit
    gradient = w_head[TARGETS] / logit[:, None]
    assert gradient.shape == r_z.shape
    lt.assert_relevance_close(results[0.0], ZERO_X * (gradient @ ZERO_W), F32)
    assert not np.allclose(results[0.0], limit)  # the two differ exactly at the zero unit


# -- AttnLRP and CP-LRP on an attention block --------------------------------------------------
def attention_block(rng: np.random.Generator, t: int = 4, d: int = 6) -> Net:
    """LayerNorm (β = 0) -> bias-free q, k, v -> (q d^-1/4) kᵀ / d^1/4 -> Softmax -> A v ->
    bias-free out-projection -> residual Add -> bias-free head. The scaling is split into a Mul
    and a Div, as exporters write either (AttnLRP puts UniformRule on the Mul)."""
    net = Net(rng, (t, d))
    gamma = net.const("ln/gamma", rng.uniform(0.5, 1.5, size=d))
    ln = net.node("LayerNormalization", [net.x, gamma, net.const("ln/beta", np.zeros(d))],
                  "ln/ln", axis=-1, epsilon=LN_EPS)
    q, k, v = (net.node("MatMul", [ln, net.param(f"{p}/W", (d, d))], f"{p}/matmul")
               for p in ("q", "k", "v"))
    kt = net.node("Transpose", [k], "k/transpose", perm=[0, 2, 1])
    q = net.node("Mul", [q, net.const("q/scale", np.asarray(d ** -0.25))], "q/scale_mul")
    scores = net.node("MatMul", [q, kt], "attn/scores")
    scaled = net.node("Div", [scores, net.const("attn/scale", np.asarray(d ** 0.25))],
                      "attn/scale_div")
    a = net.node("Softmax", [scaled], "attn/softmax", axis=-1)
    ctx = net.node("MatMul", [a, v], "attn/context")
    out = net.node("MatMul", [ctx, net.param("o/W", (d, d))], "o/matmul")
    net.head(net.node("Add", [out, net.x], "res/add"), classes=5, bias=None, scale=2.0)
    return net


def explain_block(rng: np.random.Generator, composite: Composite) -> tuple[Run, np.ndarray]:
    """The block explained for its top class with seed = that logit; returns the run and the
    explained logits (float64)."""
    net = attention_block(rng)
    x = rng.standard_normal((BATCH, *net.sample)).astype(F32)
    logits = net.run64(x.astype(np.float64))
    top = logits.argmax(axis=1)
    explained = logits[np.arange(BATCH), top]
    assert np.all(np.abs(explained) > 0.1)
    lrp = LRP(net.model(), composite, normalize_output_relevance=False, per_layer=True)
    names = [o.name for o in lrp.model.graph.output]
    values = ort_session(lrp.model).run(names, {"x": x, "target": top.astype(np.int64)})
    run = Run(net, lrp, x, np.zeros(0, F32), dict(zip(names, values)))
    return run, explained


def test_cplrp_conserves_on_attention_block(rng: np.random.Generator) -> None:
    """CP-LRP (attention held constant, ε = 0, no biases, β = 0): Σ R_input = the logit."""
    run, logit = explain_block(rng, CPLRP())
    kinds = {la.name: la.kind for la in run.lrp.layers}
    assert kinds["attn/context"] == "BilinearMatMul" and kinds["attn/scores"] == "BilinearMatMul"
    np.testing.assert_allclose(per_sample_sum(run.out["relevance"]), logit, rtol=1e-5)
    # nothing reaches the scores: the softmax sends no relevance at all
    softmax = next(la for la in run.lrp.layers if la.name == "attn/softmax")
    assert per_layer_name(softmax, 0, 1) not in run.out


def test_attnlrp_deficit_is_the_softmax_absorption(rng: np.random.Generator) -> None:
    """AttnLRP (ε = 0, no biases, β = 0) conserves everywhere but at the softmax, whose rule
    absorbs ``Σ_i R_i E_s[x]``: logit − Σ R_input = Σ R(softmax out) − Σ R(softmax in)."""
    run, logit = explain_block(rng, AttnLRP())
    absorbed = (per_sample_sum(run.sent("attn/context", 0))
                - per_sample_sum(run.sent("attn/softmax", 0)))
    deficit = logit - per_sample_sum(run.out["relevance"])
    assert np.abs(absorbed).max() > 0.01 * np.abs(logit).max()  # not vacuous
    np.testing.assert_allclose(deficit, absorbed, rtol=0, atol=1e-5 * np.abs(logit).max())


# -- the references themselves ------------------------------------------------------------------
def test_references_match_their_other_forms(rng: np.random.Generator) -> None:
    """Each float64 reference equals the rule's other form and its sum identity (Achtibat et
    al. 2024): the references are checked before anything is checked against them."""
    x, R = rng.standard_normal((3, 4, 6)), rng.standard_normal((3, 4, 6))
    gamma, beta = rng.uniform(0.5, 1.5, 6), rng.standard_normal(6)
    y, sigma = tr.layer_norm(x, gamma, beta, LN_EPS)
    r_ln = tr.ref_layernorm_rule(x, gamma, beta, R, LN_EPS, eps=0.0)
    gv = gamma * R / y
    np.testing.assert_allclose(r_ln, x * (gv - gv.mean(-1, keepdims=True)) / sigma, rtol=1e-10)
    np.testing.assert_allclose(r_ln.sum(-1), (R * (y - beta) / y).sum(-1), rtol=1e-9)

    s = tr.softmax(x)
    r_sm = tr.ref_softmax_rule(x, R)
    jac = np.einsum("...i,ij->...ij", s, np.eye(6)) - s[..., :, None] * s[..., None, :]
    np.testing.assert_allclose(r_sm, x * np.einsum("...ij,...i->...j", jac, R / s), rtol=1e-9,
                               atol=1e-12)
    expect_x = (s * x).sum(-1, keepdims=True)
    np.testing.assert_allclose(r_sm.sum(-1), (R * (x - expect_x)).sum(-1), rtol=1e-9)

    a, b, r_o = rng.standard_normal((3, 2, 4, 5)), rng.standard_normal((3, 1, 5, 4)), \
        rng.standard_normal((3, 2, 4, 4))
    r_a, r_b = tr.ref_bilinear_uniform(a, b, r_o, 0.0)
    q = r_o / (2 * (a @ b))
    np.testing.assert_allclose(r_a, a * (q @ np.swapaxes(b, -1, -2)), rtol=1e-10)
    np.testing.assert_allclose(r_b, (b * (np.swapaxes(a, -1, -2) @ q)).sum(1, keepdims=True),
                               rtol=1e-10)
    np.testing.assert_allclose(r_a.sum() + r_b.sum(), r_o.sum(), rtol=1e-10)
    r_v = tr.ref_bilinear_cp(s[:, :, :4], b[:, 0, :4], r_o[:, 0], 0.0)
    np.testing.assert_allclose(r_v.sum(), r_o[:, 0].sum(), rtol=1e-10)

    r_g = tr.ref_gather((3, 4, 6), [3, 0, 3], 1, R[:, :3])
    np.testing.assert_array_equal(r_g[:, 3], R[:, 0] + R[:, 2])
    np.testing.assert_array_equal(r_g[:, [1, 2]], 0.0)
