"""The one generic engine for every linear-type rule on every linear op.

``emit_linear`` turns a rule's :class:`~lrp_onnx.rules.core.Group` s into ONNX ops using a
:class:`LinearOp` (how one op type runs forward with modified parameters, and its transpose).
Modified parameters are computed once at compile time in float64 numpy and stored as new
initializers; only input modifiers (``x⁺``, ``x⁻``) become runtime ops.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from lrp_onnx.emit.builder import Builder
from lrp_onnx.emit.denominators import divide, negative, positive
from lrp_onnx.frontend.layers import Layer
from lrp_onnx.rules.core import ID, NEG, POS, LinearRule, Mod, Sel, Term


class LinearOp(abc.ABC):
    """A linear layer seen as ``f(x; W, b)``: effective parameters, forward, transpose.

    Subclasses set ``weight`` (effective weight in the op's own layout, float64), ``bias``
    (effective bias broadcastable like the output's feature axis, float64, or ``None``) and
    ``weight_tensor`` (the model's own initializer when it can be reused unmodified, else
    ``None``), and implement :meth:`forward` and :meth:`transpose`.
    """

    bias: np.ndarray | None
    weight_tensor: gs.Constant | None = None
    bias_tensor: gs.Tensor | None = None
    #: The model's weight initializer and the (small) factor that makes it the effective weight
    #: (folded BatchNorm, Gemm's alpha), for modifiers emitted as ops on it; ``None``: this op
    #: only has numpy parameters (:class:`~lrp_onnx.emit.ops.linear_ops.BatchNormOp`).
    weight_source: gs.Constant | None = None
    weight_scale: np.ndarray | None = None

    def __init__(self, b: Builder, layer: Layer) -> None:
        self.b = b
        self.layer = layer
        self.graph = b.graph
        self._weight: np.ndarray | None = None
        self._weight_fn: Callable[[], np.ndarray] | None = None

    @property
    def weight(self) -> np.ndarray:
        """The effective weight in float64, computed on first use: rules that only use the
        model's own weight tensor never load it into Python."""
        if self._weight is None:
            assert self._weight_fn is not None
            self._weight, self._weight_fn = self._weight_fn(), None
        return self._weight

    @weight.setter
    def weight(self, value: np.ndarray | Callable[[], np.ndarray]) -> None:
        """An array, or a function computing it (called at most once, when needed)."""
        if callable(value):
            self._weight, self._weight_fn = None, value
        else:
            self._weight, self._weight_fn = value, None

    @property
    def key(self) -> str:
        """Cache key for this layer's modified parameters."""
        return f"layer:{self.layer.name}"

    def param(self, which: str, mod: Mod) -> gs.Tensor | None:
        """The ``which`` (``"w"`` or ``"b"``) parameter modified by ``mod``, as a tensor."""
        if which == "b":
            if self.bias is None or mod.kind == "zero":
                return None
            if mod.kind == "id" and self.bias_tensor is not None:
                return self.bias_tensor
            source = self.bias
        else:
            if mod.kind == "id" and self.weight_tensor is not None:
                return self.weight_tensor
            if self.weight_source is not None and self.b.options.modifiers_as_ops:
                shape = [int(d) for d in self.weight_source.shape]
                return self.b.cached((self.key, which, mod), lambda: modify(
                    self.b, self.effective_weight(), mod, shape))
            source = self.weight
        tag = ("W" if which == "w" else "b") + mod.tag
        return self.b.cached(
            (self.key, which, mod),
            lambda: self.b.const(self.prepare(which, mod(source)), tag),
        )

    def effective_weight(self) -> gs.Tensor:
        """The effective weight as a tensor: the model's initializer, times ``weight_scale``
        (one ``Mul`` on constants, which ONNX Runtime folds when it creates the session)."""
        assert self.weight_source is not None
        if self.weight_scale is None:
            return self.weight_source
        scale = self.weight_scale
        return self.b.cached((self.key, "w_eff"), lambda: self.b.op(
            "Mul", self.weight_source, self.b.const(scale, "W/scale"), tag="W_eff"))

    def prepare(self, which: str, value: np.ndarray) -> np.ndarray:
        """Hook to lay a modified parameter out for :meth:`forward` (default: unchanged)."""
        return value

    @abc.abstractmethod
    def forward(self, x: gs.Tensor, w: gs.Tensor, bias: gs.Tensor | None) -> gs.Tensor:
        """Emit ``f(x; w, bias)``; ``x`` may have batch 1 (constant inputs) and broadcasts."""

    @abc.abstractmethod
    def transpose(self, s: gs.Tensor, w: gs.Tensor) -> gs.Tensor:
        """Emit ``J_f(w)^T s``, shaped like the layer input."""


def _select(b: Builder, layer: Layer, x: gs.Tensor, sel: Sel, rule: LinearRule,
            cache: dict[Sel, Any]) -> gs.Tensor | None:
    """The input a term reads; ``None`` means identically zero (``x⁻`` of a non-negative x)."""
    if sel in cache:
        return cache[sel]
    nonneg = b.options.sign_analysis and b.graph.is_nonneg(x)
    sample = b.graph.shape(x, layer.primary)[1:]
    out: gs.Tensor | None
    if sel is Sel.X:
        out = x
    elif sel is Sel.POS:
        out = x if nonneg else positive(b, x)
    elif sel is Sel.NEG:
        out = None if nonneg else negative(b, x)
    elif sel is Sel.ONES:
        if None in sample:  # ones shaped like one sample, its size known at run time
            out = b.filled_like(_first(b, x), b.scalar(1.0), tag="ones")
        else:
            dims = [int(d) for d in sample if d is not None]
            out = b.cached(("ones", tuple(dims), b.dtype.str),
                           lambda: b.const(np.ones([1, *dims]), "ones"))
    elif sel in (Sel.LOW, Sel.HIGH):
        bound = np.asarray(getattr(rule, "low" if sel is Sel.LOW else "high"), dtype=np.float64)
        known = [1 if d is None else d for d in sample]
        try:
            full = np.broadcast_to(bound, [1, *known])
            lead = [1] * (len(known) + 1 - bound.ndim)
            if any(d != 1 and size is None for d, size in zip([*lead, *bound.shape],
                                                              [1, *sample])):
                raise ValueError  # varies along an axis whose size is known only at run time
        except ValueError:
            from lrp_onnx.errors import RuleNotApplicable

            shown = tuple("?" if d is None else d for d in sample)
            raise RuleNotApplicable(
                f"{rule!r} on layer '{layer.name}': bound of shape {bound.shape} does not "
                f"broadcast to one sample of its input '{x.name}', shape {shown}"
            ) from None
        if None in sample:  # per-channel bound, broadcast over H/W at run time
            out = b.filled_like(_first(b, x), b.const(full, sel.value), tag=sel.value)
        else:
            out = b.const(full, sel.value)
    else:  # pragma: no cover - enum is closed
        raise AssertionError(sel)
    cache[sel] = out
    return out


def _first(b: Builder, x: gs.Tensor) -> gs.Tensor:
    """``x[:1]``, shared by the terms of a layer that read one sample's shape."""
    return b.cached(("first", x.name), lambda: b.first_sample(x, tag="x1"))


def emit_linear(b: Builder, rule: LinearRule, op: LinearOp, r_out: gs.Tensor) -> gs.Tensor:
    """Relevance at the layer input for ``rule`` on the linear layer ``op``.

    ``R_in = sum_g coeff_g sum_k sign_k sel_k(x) * f_k^T(R / stab(sum_k sign_k z_k))``.
    Terms reading ``x⁻`` are dropped when x is provably non-negative, and the unmodified
    single-term group (Zero/Epsilon) reuses the forward pass's own pre-activation as z.
    """
    layer = op.layer
    x = layer.inputs[0]
    selected: dict[Sel, Any] = {}
    # Contributions grouped by the input they are multiplied with: {sel: [(coeff, tensor)]}.
    parts: dict[Sel | None, list[tuple[float, gs.Tensor]]] = {}
    z_plain = layer.pre_activation
    for gi, group in enumerate(rule.groups()):
        if group.coeff == 0.0:
            continue  # e.g. the beta group of AlphaBetaRule(1, 0)
        terms = [t for t in group.terms
                 if _select(b, layer, x, t.x, rule, selected) is not None]
        if not terms:
            continue
        tag = f"g{gi}"
        if (b.options.reuse_forward and len(terms) == 1 and terms[0] == Term(Sel.X, ID, ID)
                and group.mask is None):
            z = z_plain
        else:
            z = None
            for k, t in enumerate(terms):
                zk = op.forward(selected[t.x], op.param("w", t.w), op.param("b", t.b))
                if z is None:
                    z = zk if t.sign > 0 else b.op("Neg", zk, tag=f"{tag}/z{k}/neg")
                else:
                    z = b.op("Add" if t.sign > 0 else "Sub", z, zk, tag=f"{tag}/z")
        r = r_out
        if group.mask is not None:
            cmp = "Greater" if group.mask == "pos" else "Less"
            mask = b.op(cmp, z_plain, b.scalar(0.0), tag=f"{tag}/mask")
            r = b.op("Where", mask, r_out, b.scalar(0.0), tag=f"{tag}/masked")
        assert z is not None
        sign = _group_sign(terms, op.bias is not None, b.graph.is_nonneg(x)) \
            if b.options.sign_analysis else None
        s = divide(b, r, z, rule.eps, tag=f"{tag}/s", sign=sign)
        for t in terms:
            v = op.transpose(s, op.param("w", t.w))
            key = t.x if rule.multiply_input else None
            parts.setdefault(key, []).append((group.coeff * t.sign, v))
    total: gs.Tensor | None = None
    for sel, contributions in parts.items():
        acc = _weighted_sum(b, contributions)
        if sel is not None:
            g = acc
            acc = b.op("Mul", selected[sel], acc, tag="R/mul_input")
            if sel is Sel.X and len(parts) == 1:
                b.factored(acc, x, g)  # R = x * g: the gradient form (see Builder.factored)
        total = acc if total is None else b.op("Add", total, acc, tag="R/sum")
    assert total is not None, "every rule has a term that reads x, x⁺, 1 or a bound"
    return total


def modify(b: Builder, w: gs.Tensor, mod: Mod, shape: list[int]) -> gs.Tensor:
    """``mod(w)`` as ops on the tensor ``w`` of ``shape`` (a constant expression: ONNX Runtime
    folds it into an initializer when it creates the session, so the file stores no copy)."""
    k = mod.kind
    if k == "id":
        return w
    if k == "pos":
        return b.op("Relu", w, tag="W+")
    if k == "neg":
        return b.op("Min", w, b.scalar(0.0), tag="W-")
    if k == "square":
        return b.op("Mul", w, w, tag="W^2")
    if k in ("ones", "zero"):
        return b.op("Expand", b.scalar(1.0 if k == "ones" else 0.0), b.ints(shape),
                    tag=f"W{mod.tag}")
    if k in ("gamma_pos", "gamma_neg"):
        part = modify(b, w, POS if k == "gamma_pos" else NEG, shape)
        scaled = b.op("Mul", part, b.scalar(mod.gamma), tag=f"W{mod.tag}/scaled")
        return b.op("Add", w, scaled, tag=f"W{mod.tag}")
    raise ValueError(f"unknown parameter modifier {k!r}")


#: Sign of a modified parameter (``None``: either sign).
_MOD_SIGN = {"pos": 1, "neg": -1, "square": 1, "ones": 1, "zero": 0}


def _group_sign(terms: list[Term], has_bias: bool, x_nonneg: bool) -> int | None:
    """The static sign of a group's denominator ``sum_k sign_k f(sel_k(x); w_k, b_k)``: ``+1``
    when every term is a sum of non-negative products (ZPlus, Flat, WSquare, AlphaBeta's
    positive group), ``-1`` when every term is non-positive (AlphaBeta's negative group),
    ``None`` otherwise."""
    signs: set[int] = set()
    for t in terms:
        if t.x in (Sel.POS, Sel.ONES) or (t.x is Sel.X and x_nonneg):
            xs = 1
        elif t.x is Sel.NEG:
            xs = -1
        else:
            return None
        ws = _MOD_SIGN.get(t.w.kind)
        bs = _MOD_SIGN.get(t.b.kind) if has_bias else 0
        if ws is None or bs is None:
            return None
        signs.update(v * t.sign for v in (xs * ws, bs) if v)
    if signs <= {1}:
        return 1
    if signs == {-1}:
        return -1
    return None


def _weighted_sum(b: Builder, items: list[tuple[float, gs.Tensor]]) -> gs.Tensor:
    """``sum_k c_k v_k`` with Add/Sub for ±1 and one Mul per other coefficient."""
    acc: gs.Tensor | None = None
    for c, v in items:
        if acc is None:
            if c == 1.0:
                acc = v
            elif c == -1.0:
                acc = b.op("Neg", v, tag="R/neg")
            else:
                acc = b.op("Mul", v, b.scalar(c), tag="R/scale")
        elif c == 1.0:
            acc = b.op("Add", acc, v, tag="R/add")
        elif c == -1.0:
            acc = b.op("Sub", acc, v, tag="R/sub")
        else:
            acc = b.op("Add", acc, b.op("Mul", v, b.scalar(c), tag="R/scale"), tag="R/add")
    assert acc is not None
    return acc
