"""Float64 numpy references for the transformer rules (AttnLRP, CP-LRP and the LN rule).

Like :mod:`lrp_onnx.testing.references`, this module imports numpy only (never another
``lrp_onnx`` module), so a compiler bug cannot hide in its own reference. Each function is
written from the rule's formula (Achtibat et al., ICML 2024, Prop. 3.1-3.4; Ali et al., ICML
2022), not from the emitters: where a closed form exists, the reference takes the other road
(dense per-row matrices for the LN rule, the per-product decomposition for the bilinear rules).

Conventions. ``R`` is the relevance arriving at the op's output, shaped like it; the result is
shaped like the input(s). Every denominator is ``stab(z) = z + eps * sign(z)`` with
``sign(0) = +1``; ``eps = 0`` is the limit ε → 0: ``R / z``, with ``0 / 0 := 0`` (the relevance
at a zero value is zero for these rules, so the tests only put ``R = 0`` where ``z = 0``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

#: A float64 array (every reference computes in float64).
Array = npt.NDArray[np.float64]


def _f64(a: Any) -> Array:
    return np.asarray(a, dtype=np.float64)


def quotient(R: Array, z: Array, eps: float) -> Array:
    """``R / stab(z)``; with ``eps = 0``: ``R / z`` where ``z != 0`` and ``0`` where ``z == 0``."""
    R, z = _f64(R), _f64(z)
    if eps == 0.0:
        safe = np.where(z == 0.0, 1.0, z)
        return np.where(z == 0.0, 0.0, R / safe)
    return R / (z + eps * np.where(z >= 0.0, 1.0, -1.0))


def sum_to_shape(r: Array, shape: Sequence[int]) -> Array:
    """Sum ``r`` over the axes an operand of ``shape`` was broadcast along (numpy rules)."""
    shape = tuple(int(d) for d in shape)
    while r.ndim > len(shape):
        r = r.sum(axis=0)
    axes = tuple(i for i, d in enumerate(shape) if d == 1 and r.shape[i] != 1)
    return r.sum(axis=axes, keepdims=True) if axes else r


# -- Softmax (Prop. 3.1) ---------------------------------------------------------------------------
def softmax(x: Array, axis: int = -1) -> Array:
    """``exp(x) / sum(exp(x))`` along ``axis``; ``-inf`` entries give exactly 0."""
    x = _f64(x)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return np.asarray(e / e.sum(axis=axis, keepdims=True), dtype=np.float64)


def ref_softmax_rule(x: Array, R: Array, axis: int = -1) -> Array:
    """Softmax rule ``R_x = x ⊙ (R − s ⊙ Σ_axis R)``, ``s = softmax(x)``; ``-inf`` x give 0.

    This is the z-rule ``x ⊙ Jᵀ(R / s)`` with ``J = diag(s) − s sᵀ`` (Jᵀ(R/s) = R − s Σ R, so
    no division by ``s`` is needed): a first-order Taylor expansion at ``x`` whose bias term
    absorbs ``Σ_i R_i E_s[x]``. Masked inputs (``-inf``) have ``s = 0`` and get nothing (the
    formula would give ``-inf * 0``).
    """
    x, R = _f64(x), _f64(R)
    s = softmax(x, axis)
    x0 = np.where(np.isneginf(x), 0.0, x)
    return np.asarray(x0 * (R - s * R.sum(axis=axis, keepdims=True)), dtype=np.float64)


# -- LayerNormalization (Prop. 3.4, the LN rule) ---------------------------------------------------
def layer_norm(x: Array, gamma: Array, beta: Array, eps_ln: float,
               axis: int = -1) -> tuple[Array, Array]:
    """ONNX ``LayerNormalization`` over the axes ``axis..-1``: ``(y, σ)`` with
    ``y = γ (x − μ) / σ + β`` and ``σ = sqrt(var(x) + eps_ln)`` (population variance, kept
    dims)."""
    x = _f64(x)
    axes = tuple(range(axis % x.ndim, x.ndim))
    mu = x.mean(axis=axes, keepdims=True)
    sigma = np.sqrt(((x - mu) ** 2).mean(axis=axes, keepdims=True) + eps_ln)
    return _f64(gamma) * (x - mu) / sigma + _f64(beta), sigma


def ref_layernorm_rule(x: Array, gamma: Array, beta: Array, R: Array, eps_ln: float,
                       axis: int = -1, eps: float = 1e-6) -> Array:
    """LN rule: the ε-rule on ``y = W x + β`` with ``σ`` held constant.

    Per normalized row (the ``D`` elements of axes ``axis..-1``) ``W = diag(γ / σ) C`` with the
    centring matrix ``C = I − 11ᵀ / D``, so ``R_x = x ⊙ Wᵀ (R / stab(y))``; in closed form
    ``R_x = x ⊙ (gv − mean(gv)) / σ``, ``gv = γ ⊙ R / stab(y)``. ``Σ R_x = Σ R (y − β) / y``:
    ``β`` absorbs its share. ``y`` and ``σ`` are recomputed here from ``x`` (float64).
    """
    x, R = _f64(x), _f64(R)
    y, sigma = layer_norm(x, gamma, beta, eps_ln, axis)
    first = axis % x.ndim
    lead, dims = x.shape[:first], x.shape[first:]
    d = int(np.prod(dims))
    rows = int(np.prod(lead))
    g = np.broadcast_to(_f64(gamma), dims).reshape(d)
    centre = np.eye(d) - np.full((d, d), 1.0 / d)
    q = quotient(R, y, eps).reshape(rows, d)
    xs, ss = x.reshape(rows, d), sigma.reshape(rows)
    out = np.empty((rows, d))
    for r in range(rows):
        W = (g / ss[r])[:, None] * centre  # dy/dx with σ held constant
        out[r] = xs[r] * (W.T @ q[r])
    return out.reshape(x.shape)


# -- products of activations (Prop. 3.2 / 3.3) and CP-LRP ------------------------------------------
def _product_terms(A: Array, B: Array, S: Array) -> Array:
    """``A_ji B_ip S_jp`` for every product in ``O = A B`` (batch dims broadcast): the share of
    each product term, shaped ``[..., j, i, p]``."""
    return np.asarray(A[..., :, :, None] * B[..., None, :, :] * S[..., :, None, :],
                      dtype=np.float64)


def ref_bilinear_uniform(A: Array, B: Array, R: Array, eps: float) -> tuple[Array, Array]:
    """Uniform rule on ``O = A B`` (matmul of two activations): ``(R_A, R_B)``.

    ``O_jp = Σ_i A_ji B_ip``: each product term gets the ε-share ``A_ji B_ip R_jp / stab(2 O_jp)``
    (the ε-rule on the sum with half of each term's relevance to each factor), so
    ``R_A[j,i] = Σ_p`` and ``R_B[i,p] = Σ_j`` of it; ``Σ R_A + Σ R_B = Σ R`` at ``eps = 0``.
    Operands broadcast over batch dims; relevance is summed back to each operand's shape.
    """
    A, B, R = _f64(A), _f64(B), _f64(R)
    out = np.matmul(A, B)
    terms = _product_terms(A, B, quotient(R, 2.0 * out, eps))
    return sum_to_shape(terms.sum(axis=-1), A.shape), sum_to_shape(terms.sum(axis=-3), B.shape)


def ref_bilinear_cp(A: Array, V: Array, R: Array, eps: float) -> Array:
    """CP-LRP on ``O = A V`` with the attention ``A`` held constant: the ε-rule of the linear map
    ``V ↦ A V``: ``R_V[i,p] = Σ_j A_ji V_ip R_jp / stab(O_jp)`` (all of R; ``A`` gets none)."""
    A, V, R = _f64(A), _f64(V), _f64(R)
    out = np.matmul(A, V)
    terms = _product_terms(A, V, quotient(R, out, eps))
    return sum_to_shape(terms.sum(axis=-3), V.shape)


def ref_mul_uniform(a: Array, b: Array, R: Array, eps: float) -> tuple[Array, Array]:
    """Uniform rule on ``y = a ⊙ b`` (two activations): ``R_a = R_b = a b R / stab(2 a b)``
    (``R / 2`` each at ``eps = 0``), summed to each operand's shape."""
    a, b, R = _f64(a), _f64(b), _f64(R)
    y = a * b
    share = y * quotient(R, 2.0 * y, eps)
    return sum_to_shape(share, a.shape), sum_to_shape(share, b.shape)


def ref_mul_const(x: Array, c: Array, R: Array, eps: float) -> Array:
    """ε-rule on a scaling ``y = x ⊙ c`` by a constant: ``R_x = x c R / stab(x c)``."""
    x, c, R = _f64(x), _f64(c), _f64(R)
    y = x * c
    return sum_to_shape(y * quotient(R, y, eps), x.shape)


# -- differences, quotients, gathers ---------------------------------------------------------------
def ref_sub(a: Array, b: Array, R: Array, eps: float) -> tuple[Array, Array]:
    """Signed proportional split of ``y = a − b = a + (−b)``: ``R_a = a R / stab(y)``,
    ``R_b = −b R / stab(y)``, summed to each operand's shape."""
    a, b, R = _f64(a), _f64(b), _f64(R)
    q = quotient(R, a - b, eps)
    return sum_to_shape(a * q, a.shape), sum_to_shape(-b * q, b.shape)


def ref_div_const(x: Array, c: Array, R: Array, eps: float) -> Array:
    """ε-rule on the scaling ``y = x / c`` by a constant: ``R_x = (x / c) R / stab(x / c)``."""
    x, c, R = _f64(x), _f64(c), _f64(R)
    y = x / c
    return sum_to_shape(y * quotient(R, y, eps), x.shape)


def ref_gather(x_shape: Sequence[int], indices: Any, axis: int, R: Array) -> Array:
    """``Gather`` with constant ``indices`` along ``axis``: each output element's relevance goes
    back to the element it copied, summed where an index repeats (scatter-add); negative
    indices count from the end; a scalar index removed ``axis`` from the output."""
    shape = tuple(int(d) for d in x_shape)
    axis %= len(shape)
    idx = np.asarray(indices, dtype=np.int64)
    R = _f64(R)
    if idx.ndim == 0:
        R = np.expand_dims(R, axis)
    flat = idx.reshape(-1) % shape[axis]
    out = np.zeros(shape)
    moved_out = np.moveaxis(out, axis, 0)  # a view: writes land in ``out``
    moved_r = np.moveaxis(R, axis, 0)
    for k, i in enumerate(flat):
        moved_out[i] += moved_r[k]
    return out
