"""Test support: a small-model factory and numpy matrix-form LRP references.

This module imports only numpy and onnx (never another ``lrp_onnx`` module), so the references
are independent of the code they check (so a compiler bug cannot hide in its reference):

* :class:`Net` builds small ONNX models (one "layer under test" plus a fixed head that makes
  ``[N, K]`` logits) with a dynamic batch dimension ``N``, for any float dtype, from float64
  master parameters that are exactly representable in float32.
* The dense Jacobian ``W`` and bias ``b`` of a linear (or piecewise-constant-linear) sub-graph
  come from :class:`onnx.reference.ReferenceEvaluator` evaluated on the identity basis and on
  zero (as Zennit's tests do with autograd), in float64.
* ``ref_*`` are the rules written from their formulas (Zennit 0.5.1 / RelevancePropagation.jl,
  see ``docs/rules.md``) in matrix form: ``x`` is ``[N, D]``,
  the relevance ``R`` arriving at the output is ``[N, O]``, ``W`` is ``[O, D]``, ``b`` is ``[O]``.
  Every denominator uses ``stab(z) = z + eps * sign(z)`` with ``sign(0) = +1``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

#: Opset and IR version of every model built here (onnx.helper stamps IR versions that
#: onnxruntime may not read yet, so the IR version is always explicit).
OPSET = 17
IR_VERSION = 8

#: ``(rtol, atol relative to max|expected|)`` per dtype of the compiled model.
TOLERANCES: dict[np.dtype[Any], tuple[float, float]] = {
    np.dtype(np.float32): (1e-5, 1e-6),
    np.dtype(np.float64): (1e-10, 1e-12),
}

#: A float64 array (every reference computes in float64).
Array = npt.NDArray[np.float64]

_ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}


# -- the model factory ----------------------------------------------------------------------------
class Net:
    """Nodes and float64 initializers of a small model, buildable for any float dtype.

    Node names double as their first output's name. Nodes are tagged by name prefix
    (``pre/``, ``lut/`` for the layer under test, ``head/``) so sub-models can be cut out.

    Args:
        rng: numpy Generator used for every random parameter.
        sample_shape: shape of one sample of the graph input ``x`` (the batch dim is ``N``).
    """

    def __init__(self, rng: np.random.Generator, sample_shape: Sequence[int]) -> None:
        self.rng = rng
        self.sample = tuple(int(d) for d in sample_shape)
        self.x = "x"
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.head_params: tuple[np.ndarray, np.ndarray] | None = None
        self._samples: dict[str, tuple[int, ...]] = {}
        #: the default-domain opset of the built model (newer ops need a newer one)
        self.opset = OPSET

    # -- building --------------------------------------------------------------------------
    def const(self, name: str, value: Any, dtype: Any = np.float64) -> str:
        """Add an initializer; float values are rounded to float32 precision (and kept float64)."""
        arr = np.asarray(value, dtype=dtype)
        if np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32).astype(np.float64)
        self.inits[name] = arr
        return name

    def param(self, name: str, shape: Sequence[int], scale: float | None = None,
              positive: bool = False) -> str:
        """A random parameter ``normal(0, scale)``; ``scale`` defaults to ``1/sqrt(fan_in)``."""
        shape = tuple(shape)
        if scale is None:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            scale = 1.0 / np.sqrt(max(fan_in, 1))
        value = self.rng.normal(0.0, scale, size=shape)
        if positive:
            value = np.abs(value) + 0.1 * scale
        # Exact zeros would blur the structural pattern FlatRule's reference reads off W.
        value[value == 0] = scale
        return self.const(name, value)

    def node(self, op: str, inputs: Sequence[str], name: str, outputs: int = 1,
             **attrs: Any) -> str:
        """Append ``op``; its (first) output is called ``name``, which is returned."""
        outs = [name] + [f"{name}:{i}" for i in range(1, outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        self._samples.clear()
        return name

    def head(self, y: str, classes: int = 5, bias: float | None = 5.0,
             scale: float = 1.0) -> str:
        """``Flatten`` + ``Gemm(transB=1)`` to ``[N, classes]`` logits named ``logits``.

        The default head bias keeps the logits well away from zero, so the head's own
        denominator ``stab(logit)`` is well conditioned and the relevance reaching ``y`` is
        ``∝ y``. ``bias=None`` gives a bias-free head (for conservation checks); ``scale``
        multiplies the default weight scale ``1/sqrt(features)``.
        """
        flat = self.node("Flatten", [y], "head/flatten", axis=1)
        features = int(np.prod(self.sample_shape(flat)))
        w = self.param("head/W", (classes, features), scale=scale / np.sqrt(features))
        b = self.const("head/b", np.full(classes, 0.0 if bias is None else bias))
        self.head_params = (self.inits[w], self.inits[b])
        return self.node("Gemm", [flat, w] + ([b] if bias is not None else []), "logits",
                         transB=1)

    # -- models ----------------------------------------------------------------------------
    def _select(self, prefixes: Sequence[str] | None) -> list[onnx.NodeProto]:
        if prefixes is None:
            return list(self.nodes)
        return [n for n in self.nodes if any(n.name.startswith(p) for p in prefixes)]

    def model(self, dtype: Any = np.float32, *, input: str | None = None,
              output: str = "logits", prefixes: Sequence[str] | None = None,
              shapes: bool = True) -> onnx.ModelProto:
        """The model from ``input`` (default ``x``) to ``output`` over the selected nodes.

        Inputs and outputs are declared ``[N, *sample]`` (dynamic batch) when ``shapes``.
        """
        dt = np.dtype(dtype)
        elem = _ELEM[dt]
        input = input or self.x
        nodes = self._select(prefixes)
        used = {i for n in nodes for i in n.input}
        inits = [numpy_helper.from_array(v.astype(dt) if np.issubdtype(v.dtype, np.floating)
                                         else v, k)
                 for k, v in self.inits.items() if k in used]
        in_shape: list[str | int] | None = ["N", *self.sample_shape(input)] if shapes else None
        out_shape: list[str | int] | None = ["N", *self.sample_shape(output)] if shapes else None
        graph = helper.make_graph(
            nodes, "lrp_onnx_testing",
            [helper.make_tensor_value_info(input, elem, in_shape)],
            [helper.make_tensor_value_info(output, elem, out_shape)],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  ir_version=IR_VERSION)
        if shapes:
            onnx.checker.check_model(model)
        return model

    def sample_shape(self, value: str) -> tuple[int, ...]:
        """Shape of one sample of ``value`` (evaluated on a zero input of batch 1)."""
        if value == self.x:
            return self.sample
        if value not in self._samples:
            out = self.run64(np.zeros((1, *self.sample)), output=value, shapes=False)
            self._samples[value] = tuple(out.shape[1:])
        return self._samples[value]

    def run64(self, x: np.ndarray, *, input: str | None = None, output: str = "logits",
              prefixes: Sequence[str] | None = None, shapes: bool = True) -> np.ndarray:
        """Evaluate the float64 model with :class:`onnx.reference.ReferenceEvaluator`."""
        model = self.model(np.float64, input=input, output=output, prefixes=prefixes,
                           shapes=shapes)
        feeds = {input or self.x: np.asarray(x, np.float64)}
        outputs: Any = ReferenceEvaluator(model).run(None, feeds)
        return np.asarray(outputs[0])

    def linear_map(self, *, input: str, output: str,
                   prefixes: Sequence[str] = ("lut/",)) -> tuple[np.ndarray, np.ndarray]:
        """Dense Jacobian ``W`` [O, D] and bias ``b`` [O] of the affine map ``input -> output``.

        Evaluated (float64) on the identity basis and on zero; only valid for affine sub-graphs.
        """
        sample = self.sample_shape(input)
        d = int(np.prod(sample))
        basis = np.eye(d).reshape(d, *sample)
        b = self.run64(np.zeros((1, *sample)), input=input, output=output,
                       prefixes=prefixes).reshape(-1)
        y = self.run64(basis, input=input, output=output, prefixes=prefixes).reshape(d, -1)
        return (y - b).T.copy(), b


# -- stabilizer and the linear rules in matrix form ----------------------------------------------
def stabilize(z: Array, eps: float) -> Array:
    """``z + eps * sign(z)`` with ``sign(0) = +1`` (Zennit's ``stabilize``)."""
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def _pos(a: Array) -> Array:
    return np.maximum(a, 0.0)


def _neg(a: Array) -> Array:
    return np.minimum(a, 0.0)


def ref_epsilon(W: Array, b: Array, x: Array, R: Array,
                eps: float = 1e-6, zero_bias: bool = False) -> Array:
    """LRP-0 / LRP-ε: ``x ⊙ Wᵀ[R / stab(Wx + b)]``."""
    z = x @ W.T + (0.0 if zero_bias else b)
    return x * ((R / stabilize(z, eps)) @ W)


ref_zero = ref_epsilon


def ref_zplus(W: Array, b: Array, x: Array, R: Array,
              eps: float = 1e-6, zero_bias: bool = False) -> Array:
    """LRP-z⁺: ``x⁺⊙W⁺ᵀs + x⁻⊙W⁻ᵀs``, ``s = R / stab(W⁺x⁺ + W⁻x⁻ + b⁺)``."""
    xp, xn, wp, wn = _pos(x), _neg(x), _pos(W), _neg(W)
    z = xp @ wp.T + xn @ wn.T + (0.0 if zero_bias else _pos(b))
    s = R / stabilize(z, eps)
    return xp * (s @ wp) + xn * (s @ wn)


def ref_alpha_beta(W: Array, b: Array, x: Array, R: Array,
                   alpha: float, beta: float, eps: float = 1e-6,
                   zero_bias: bool = False) -> Array:
    """LRP-αβ: ``α(x⁺W⁺ᵀs⁺ + x⁻W⁻ᵀs⁺) − β(x⁺W⁻ᵀs⁻ + x⁻W⁺ᵀs⁻)``.

    ``s⁺ = R / stab(W⁺x⁺ + W⁻x⁻ + b⁺)``, ``s⁻ = R / stab(W⁻x⁺ + W⁺x⁻ + b⁻)``.
    """
    xp, xn, wp, wn = _pos(x), _neg(x), _pos(W), _neg(W)
    zp = xp @ wp.T + xn @ wn.T + (0.0 if zero_bias else _pos(b))
    zn = xp @ wn.T + xn @ wp.T + (0.0 if zero_bias else _neg(b))
    sp, sn = R / stabilize(zp, eps), R / stabilize(zn, eps)
    return alpha * (xp * (sp @ wp) + xn * (sp @ wn)) - beta * (xp * (sn @ wn) + xn * (sn @ wp))


def ref_gamma(W: Array, b: Array, x: Array, R: Array, gamma: float,
              eps: float = 1e-6, zero_bias: bool = False) -> Array:
    """RelevancePropagation.jl's LRP-γ on the raw input: ``W + γW⁺``, ``b + γb⁺``."""
    wg = W + gamma * _pos(W)
    bg = 0.0 if zero_bias else b + gamma * _pos(b)
    return x * ((R / stabilize(x @ wg.T + bg, eps)) @ wg)


def ref_generalized_gamma(W: Array, b: Array, x: Array, R: Array,
                          gamma: float, eps: float = 1e-6,
                          zero_bias: bool = False) -> Array:
    """Zennit's ``Gamma`` (Andéol et al.), sign-aware in inputs and outputs.

    ``W↑ = W+γW⁺``, ``W↓ = W+γW⁻``. Outputs with ``z = Wx+b > 0`` use
    ``s⁺ = 1[z>0]R / stab(W↑x⁺ + W↓x⁻ + b+γb⁺)`` and give ``x⁺W↑ᵀs⁺ + x⁻W↓ᵀs⁺``; outputs with
    ``z < 0`` use ``s⁻ = 1[z<0]R / stab(W↓x⁺ + W↑x⁻ + b+γb⁻)`` and give ``x⁺W↓ᵀs⁻ + x⁻W↑ᵀs⁻``.
    """
    xp, xn = _pos(x), _neg(x)
    up, down = W + gamma * _pos(W), W + gamma * _neg(W)
    b_up = 0.0 if zero_bias else b + gamma * _pos(b)
    b_down = 0.0 if zero_bias else b + gamma * _neg(b)
    z = x @ W.T + b
    sp = np.where(z > 0, R, 0.0) / stabilize(xp @ up.T + xn @ down.T + b_up, eps)
    sn = np.where(z < 0, R, 0.0) / stabilize(xp @ down.T + xn @ up.T + b_down, eps)
    return xp * (sp @ up) + xn * (sp @ down) + xp * (sn @ down) + xn * (sn @ up)


def ref_wsquare(W: Array, b: Array, x: Array, R: Array,
                eps: float = 1e-6, zero_bias: bool = False) -> Array:
    """LRP-w²: ``(W²)ᵀ[R / stab(1·W² + b²)]`` (Zennit keeps ``b²`` unless the bias is zeroed)."""
    w2 = W * W
    z = np.ones_like(x) @ w2.T + (0.0 if zero_bias else b * b)
    return (R / stabilize(z, eps)) @ w2


def ref_flat(W: Array, b: Array, x: Array, R: Array,
             eps: float = 1e-6) -> Array:
    """LRP-flat: ``1ᵀ[R / stab(n)]`` over the connection pattern of W (bias zeroed).

    The pattern is read off the Jacobian (``W != 0``); :class:`Net` never draws exact-zero
    weights, so this equals running the op with all-ones weights (padding not counted).
    """
    ones: Array = (W != 0).astype(np.float64)
    s: Array = R / stabilize(np.ones_like(x) @ ones.T, eps)
    return s @ ones


def ref_zbox(W: Array, b: Array, x: Array, R: Array, low: Array,
             high: Array, eps: float = 1e-6, zero_bias: bool = False) -> Array:
    """LRP-z^B: ``x⊙Wᵀs − l⊙W⁺ᵀs − h⊙W⁻ᵀs``, ``s = R / stab(Wx+b − (W⁺l+b⁺) − (W⁻h+b⁻))``.

    ``low``/``high`` are flat ``[D]`` (one sample's bounds, already broadcast).
    """
    wp, wn = _pos(W), _neg(W)
    bb = np.zeros_like(b) if zero_bias else b
    den = (x @ W.T + bb) - (low @ wp.T + _pos(bb)) - (high @ wn.T + _neg(bb))
    s = R / stabilize(den, eps)
    return x * (s @ W) - low * (s @ wp) - high * (s @ wn)


# -- non-linear layers ----------------------------------------------------------------------------
def ref_z_map(J: Array, x: Array, R: Array, eps: float = 1e-6) -> Array:
    """z-rule of a bias-free linear map without parameters (average pools, means):
    ``x ⊙ Jᵀ[R / stab(Jx)]``."""
    return x * ((R / stabilize(x @ J.T, eps)) @ J)


def ref_route(J: Array, R: Array) -> Array:
    """Routing ops (reshape, transpose, flatten, dropout): ``Jᵀ R`` for a 0/1 selection J."""
    if not (np.isin(J, (0.0, 1.0)).all() and (J.sum(axis=1) <= 1).all()):
        raise ValueError("ref_route needs a 0/1 Jacobian with one input per output")
    return R @ J


def ref_add(inputs: Sequence[Array], R: Array, eps: float = 1e-6) -> list[Array]:
    """Proportional split of ``y = Σ_k x_k`` (numpy broadcasting): ``R_k = x_k R / stab(y)``,
    summed back over the axes ``x_k`` was broadcast along."""
    y: Array = np.zeros(())
    for v in inputs:
        y = y + v
    s = R / stabilize(y, eps)
    out = []
    for v in inputs:
        r = v * s
        while r.ndim > v.ndim:
            r = r.sum(axis=0)
        axes = tuple(i for i, d in enumerate(v.shape) if d == 1 and r.shape[i] != 1)
        out.append(r.sum(axis=axes, keepdims=True) if axes else r)
    return out


def ref_concat(sizes: Sequence[int], R: Array, axis: int) -> list[Array]:
    """Concat: each input gets back its slice of R."""
    edges = np.cumsum([0, *sizes])
    index = [slice(None)] * R.ndim
    parts = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        index[axis] = slice(int(lo), int(hi))
        parts.append(R[tuple(index)])
    return parts


def pool_windows(in_spatial: Sequence[int], out_spatial: Sequence[int], kernel: Sequence[int],
                 strides: Sequence[int], pads: Sequence[int],
                 dilations: Sequence[int] | None = None) -> dict[tuple[int, ...],
                                                                 list[tuple[int, ...]]]:
    """In-bounds input positions of each output window, in row-major kernel scan order.

    ONNX geometry: tap ``t`` of output ``o`` reads ``o*stride - pad_begin + t*dilation``; taps
    in the padding are left out (``ceil_mode`` windows simply overhang).
    """
    nd = len(kernel)
    dil = list(dilations) if dilations is not None else [1] * nd
    windows = {}
    for o in itertools.product(*(range(n) for n in out_spatial)):
        taps = []
        for t in itertools.product(*(range(k) for k in kernel)):
            p = tuple(o[i] * strides[i] - pads[i] + t[i] * dil[i] for i in range(nd))
            if all(0 <= p[i] < in_spatial[i] for i in range(nd)):
                taps.append(p)
        windows[o] = taps
    return windows


def ref_maxpool(x: Array, R: Array, kernel: Sequence[int], strides: Sequence[int],
                pads: Sequence[int], dilations: Sequence[int] | None = None,
                eps: float | None = 1e-6) -> tuple[Array, Array]:
    """Winner-take-all z-rule: ``R_j = x_j Σ_{i: argmax(i)=j} R_i / stab(y_i)``; with
    ``eps=None`` (ZeroRule) the exact routing ``R_j = Σ_{i: argmax(i)=j} R_i``.

    ``x`` is ``[N, C, *spatial]``, ``R`` ``[N, C, *out_spatial]``. The winner of a window is its
    first maximum in scan order (the forward's ``Indices``, as in PyTorch and ONNX Runtime).
    Returns ``(R_in, y)``; ``y`` is the max pool recomputed here, to check the geometry.
    """
    n, c = x.shape[:2]
    windows = pool_windows(x.shape[2:], R.shape[2:], kernel, strides, pads, dilations)
    r_in = np.zeros_like(x, dtype=np.float64)
    y = np.zeros(R.shape, dtype=np.float64)
    for o, taps in windows.items():
        for b_, ch in itertools.product(range(n), range(c)):
            vals = [x[(b_, ch, *p)] for p in taps]
            j = taps[int(np.argmax(vals))]
            y[(b_, ch, *o)] = x[(b_, ch, *j)]
            if eps is None:
                r_in[(b_, ch, *j)] += R[(b_, ch, *o)]
            else:
                share = R[(b_, ch, *o)] / stabilize(np.asarray(y[(b_, ch, *o)]), eps)
                r_in[(b_, ch, *j)] += x[(b_, ch, *j)] * share
    return r_in, y


def ref_global_maxpool(x: Array, R: Array, eps: float | None = 1e-6) -> tuple[Array, Array]:
    """GlobalMaxPool, ties sharing equally: ``R_j = [x_j = y_c] R_c / ties_c`` (``eps=None``,
    ZeroRule) or ``x_j [x_j = y_c] R_c / (ties_c stab(y_c))``. Returns ``(R_in, y)``."""
    axes = tuple(range(2, x.ndim))
    y = x.max(axis=axes, keepdims=True)
    mask = (x == y).astype(np.float64)
    share = R.reshape(y.shape) / mask.sum(axis=axes, keepdims=True)
    r_in = mask * share if eps is None else x * mask * share / stabilize(y, eps)
    return r_in, y


def ref_head(W: Array, b: Array, y: Array, target: Array,
             normalize: bool = True, eps: float = 1e-6) -> Array:
    """Relevance reaching ``y`` from a ``Flatten`` + ``Gemm(transB=1)`` head under ZeroRule.

    The seed is one-hot at ``target`` with value 1 (``normalize``) or the target logit.
    """
    flat = y.reshape(len(y), -1)
    logits = flat @ W.T + b
    seed = np.zeros_like(logits)
    rows = np.arange(len(y))
    seed[rows, target] = 1.0 if normalize else logits[rows, target]
    return ref_epsilon(W, b, flat, seed, eps).reshape(y.shape)


# -- comparison ------------------------------------------------------------------------------------
def assert_relevance_close(actual: np.ndarray, expected: np.ndarray, dtype: Any,
                           rtol: float | None = None, atol_scale: float | None = None) -> None:
    """Assert ``actual`` (from the compiled model) matches the float64 ``expected``.

    Tolerances come from :data:`TOLERANCES` for ``dtype`` (float32: ``rtol=1e-5``,
    ``atol=1e-6 * max|expected|``); a caller that overrides them must say why next to the call.
    """
    dt = np.dtype(dtype)
    default_rtol, default_atol = TOLERANCES[dt]
    rtol = default_rtol if rtol is None else rtol
    atol_scale = default_atol if atol_scale is None else atol_scale
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.dtype == dt, f"relevance dtype {actual.dtype}, expected {dt}"
    assert actual.shape == expected.shape, f"relevance shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), "relevance has non-finite entries"
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=rtol,
                               atol=atol_scale * scale)
