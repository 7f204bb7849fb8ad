"""LRP rules as data: frozen dataclasses holding hyper-parameters only.

Names follow RelevancePropagation.jl; the math follows Zennit 0.5.1 exactly (bias handling and
the stabilizer ``z + eps * sign(z)`` with ``sign(0) = +1``), so Zennit can serve as the oracle.
Where the two libraries differ the docstring says which one is followed (see docs/rules.md).

A linear rule (one that acts on Conv/Gemm/MatMul layers) describes itself by ``groups()``: each
:class:`Group` holds :class:`Term` s, one modified forward pass each,
``z_k = f(sel_k(x); mod_k(W), mod_k(b))``. Terms in a group share one stabilised denominator and
the result is ``R_in = sum_g coeff_g * sum_k sign_k * sel_k(x) * f_k^T(R / stab(sum_k sign_k z_k))``
(without ``sel_k(x) *`` for rules whose ``multiply_input`` is False). The single generic engine in
:mod:`lrp_onnx.emit.linear` emits any such rule for any linear op.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar, cast

import numpy as np

from lrp_onnx.rules.checks import (
    FINITE,
    NON_NEGATIVE,
    Range,
    check_bool,
    check_bounds,
    check_number,
    smallest_stabilizer,
)

#: Default stabilizer of every rule (Zennit's convention; RelevancePropagation.jl uses 1e-9 for
#: the non-epsilon rules).
DEFAULT_STABILIZER = 1e-6


class Sel(enum.Enum):
    """Which input a modified forward pass reads."""

    X = "x"          #: the layer input unchanged
    POS = "x+"       #: ``max(x, 0)``
    NEG = "x-"       #: ``min(x, 0)``
    ONES = "1"       #: ones shaped like one sample of x
    LOW = "low"      #: the lower bound of ZBox, shaped like one sample of x
    HIGH = "high"    #: the upper bound of ZBox


@dataclass(frozen=True)
class Mod:
    """A parameter modifier, applied once at compile time in float64 numpy.

    ``kind`` is one of ``id``, ``pos`` (p⁺), ``neg`` (p⁻), ``square`` (p²), ``ones``, ``zero``,
    ``gamma_pos`` (p + γp⁺) and ``gamma_neg`` (p + γp⁻).
    """

    kind: str
    gamma: float = 0.0

    def __call__(self, p: np.ndarray) -> np.ndarray:
        if self.kind == "id":
            return p
        if self.kind == "pos":
            return np.asarray(np.maximum(p, 0))
        if self.kind == "neg":
            return np.asarray(np.minimum(p, 0))
        if self.kind == "square":
            return np.asarray(p * p)
        if self.kind == "ones":
            return np.asarray(np.ones_like(p))
        if self.kind == "zero":
            return np.asarray(np.zeros_like(p))
        if self.kind == "gamma_pos":
            return np.asarray(p + self.gamma * np.maximum(p, 0))
        if self.kind == "gamma_neg":
            return np.asarray(p + self.gamma * np.minimum(p, 0))
        raise ValueError(f"unknown parameter modifier {self.kind!r}")

    @property
    def tag(self) -> str:
        """Short name used in emitted initializer names (``lrp/<node>/W+``)."""
        return {"id": "", "pos": "+", "neg": "-", "square": "^2", "ones": "1", "zero": "0",
                "gamma_pos": f"g+{self.gamma:g}", "gamma_neg": f"g-{self.gamma:g}"}[self.kind]


ID, POS, NEG, SQUARE, ONES, ZERO = (Mod(k) for k in ("id", "pos", "neg", "square", "ones", "zero"))


@dataclass(frozen=True)
class Term:
    """One modified forward pass ``sign * f(sel(x); w(W), b(b))``."""

    x: Sel
    w: Mod
    b: Mod
    sign: int = 1


@dataclass(frozen=True)
class Group:
    """Terms sharing one stabilised denominator; ``mask`` keeps outputs with z>0 (``"pos"``) or
    z<0 (``"neg"``) of the *unmodified* pre-activation z only."""

    coeff: float
    terms: tuple[Term, ...]
    mask: str | None = None


# -- base classes --------------------------------------------------------------------------------
@dataclass(frozen=True, repr=False)
class Rule:
    """Base of all rules. ``repr`` prints the hyper-parameters: ``EpsilonRule(epsilon=1e-06)``.

    Every hyper-parameter is checked where the rule is made (``__post_init__``): a float field
    must be a finite number within the rule's ``_ranges`` (:data:`FINITE` where none is
    given), a boolean field ``True`` or ``False``; anything else is a ``ValueError`` that says
    what is allowed. ``spelling()`` is the text :func:`lrp_onnx.rules.rulefile.parse_rule`
    reads back into an equal rule (the compiled model's metadata records it).
    """

    #: Fields always shown by ``repr``; the others only when they differ from their default.
    _shown: ClassVar[tuple[str, ...]] = ()
    #: The allowed range of each float field (default :data:`FINITE`).
    _ranges: ClassVar[dict[str, Range]] = {}
    #: Float fields that are stabilizers: 0 or at least :func:`smallest_stabilizer` when compiled.
    _stabilizers: ClassVar[tuple[str, ...]] = ()
    #: Fields that may hold arrays; the rule checks them itself (ZBox's bounds).
    _arrays: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        # Hyper-parameters are floats: AlphaBetaRule(2, 1) == AlphaBetaRule(2.0, 1.0).
        owner = type(self).__name__
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in self._arrays:
                continue
            if isinstance(f.default, bool):
                object.__setattr__(self, f.name, check_bool(owner, f.name, value))
            elif isinstance(f.default, float):
                allowed = self._ranges.get(f.name, FINITE)
                object.__setattr__(self, f.name, check_number(owner, f.name, value, allowed))

    def _text(self, full: bool) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in self._shown or value != f.default:
                parts.append(f"{f.name}={_spell(value) if full else _fmt(value)}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def __repr__(self) -> str:
        return self._text(full=False)

    __str__ = __repr__

    def spelling(self) -> str:
        """The rule as text that :func:`~lrp_onnx.rules.rulefile.parse_rule` reads back into an
        equal rule: ``repr`` with array bounds written out as nested lists."""
        return self._text(full=True)

    def dtype_problem(self, dtype: Any) -> str | None:
        """Why the hyper-parameters do not fit a model computing in ``dtype`` (``None`` if they
        do), checked when the model is compiled: every value at most half the type's largest
        finite number in magnitude (so ``2 * eps`` and ``1 + gamma`` stay finite), and a
        non-zero stabilizer at least :func:`smallest_stabilizer` (a smaller one is dropped)."""
        if not np.issubdtype(np.dtype(dtype), np.floating):
            return None
        info = np.finfo(dtype)
        name = np.dtype(dtype).name
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (float, tuple)):
                continue
            largest = float(np.abs(np.asarray(value, dtype=np.float64)).max())
            if largest > float(info.max) / 2:
                return (f"{f.name}={_fmt(value)} is too large for {name} (at most "
                        f"{float(info.max) / 2:.3g} in magnitude)")
            smallest = smallest_stabilizer(dtype)
            if f.name in self._stabilizers and 0.0 < largest < smallest:
                return (f"{f.name}={_fmt(value)} is too small for {name}: use 0 (the limit "
                        f"eps -> 0) or a value >= {smallest:.3g}")
        return None


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        return f"array(shape={np.asarray(value).shape})"
    return repr(value)


def _spell(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_spell(v) for v in value) + "]"
    return repr(value)


@dataclass(frozen=True, repr=False)
class LinearRule(Rule):
    """A rule expressed as modified forward passes (see the module docstring)."""

    multiply_input: ClassVar[bool] = True
    _ranges: ClassVar[dict[str, Range]] = {"stabilizer": NON_NEGATIVE}
    _stabilizers: ClassVar[tuple[str, ...]] = ("stabilizer",)

    @property
    def eps(self) -> float:
        """The stabilizer added to denominators (every subclass has a ``stabilizer`` field)."""
        return float(cast(Any, self).stabilizer)

    def groups(self) -> tuple[Group, ...]:
        raise NotImplementedError


def _bias(mod: Mod, zero_bias: bool) -> Mod:
    return ZERO if zero_bias else mod


# -- the rules -----------------------------------------------------------------------------------
@dataclass(frozen=True, repr=False)
class ZeroRule(LinearRule):
    """LRP-0: ``R_j = sum_i x_j w_ij R_i / stab(z_i)``.

    On non-linear layers (pooling, residual ``Add``) it is the z-rule of that layer
    (``R = x * J^T (R' / stab(f(x)))``); on reshaping layers, dropout and activations it
    passes relevance through. Default stabilizer 1e-6 (Zennit's; RelevancePropagation.jl uses
    1e-9), which makes pooling layers agree with Zennit's ``Norm`` rule exactly.

    Valid: ``stabilizer`` a finite number >= 0 (as for every rule, 0 is the limit ε → 0: a zero
    denominator counts as 1, so ``0 / 0`` gives 0).
    """

    stabilizer: float = DEFAULT_STABILIZER
    zero_bias: bool = False

    def groups(self) -> tuple[Group, ...]:
        return (Group(1.0, (Term(Sel.X, ID, _bias(ID, self.zero_bias)),)),)


@dataclass(frozen=True, repr=False)
class EpsilonRule(LinearRule):
    """LRP-ε: ``R_j = sum_i x_j w_ij R_i / (z_i + eps * sign(z_i))``, default ``epsilon=1e-6``.

    ``epsilon=0`` is LXT's and AttnLRP's linear rule (ε → 0): where the relevance arrives as
    ``z * g`` (every ε-rule, the LayerNorm, softmax and uniform rules send it so) the quotient
    is ``g`` itself, with no division (the gradient form: gradient × input, as LXT computes it,
    so at an exact ``z = 0`` the unit passes ``g`` on); elsewhere ``R / z`` with ``R / 0``
    taken as ``R`` (zero, as the relevance at a zero value is for these rules).

    Valid: ``epsilon`` a finite number >= 0.
    """

    epsilon: float = 1e-6
    zero_bias: bool = False
    _shown: ClassVar[tuple[str, ...]] = ("epsilon",)
    _ranges: ClassVar[dict[str, Range]] = {"epsilon": NON_NEGATIVE}
    _stabilizers: ClassVar[tuple[str, ...]] = ("epsilon",)

    @property
    def eps(self) -> float:
        return float(self.epsilon)

    def groups(self) -> tuple[Group, ...]:
        return (Group(1.0, (Term(Sel.X, ID, _bias(ID, self.zero_bias)),)),)


@dataclass(frozen=True, repr=False)
class GammaRule(LinearRule):
    """LRP-γ (RelevancePropagation.jl's ``GammaRule``): ``W + γW⁺``, ``b + γb⁺`` on the raw input.

    ``R_j = sum_i x_j (w_ij + γ w_ij⁺) R_i / stab(sum_l x_l (w_il + γ w_il⁺) + b_i + γ b_i⁺)``.
    Equal to Zennit's (generalised) ``Gamma`` on non-negative inputs of ReLU layers; see
    :class:`GeneralizedGammaRule` for the sign-aware form. Default ``gamma=0.25``.

    Valid: ``gamma`` a finite number >= 0 (0 is LRP-0), ``stabilizer`` a finite number >= 0.
    """

    gamma: float = 0.25
    stabilizer: float = DEFAULT_STABILIZER
    zero_bias: bool = False
    _shown: ClassVar[tuple[str, ...]] = ("gamma",)
    _ranges: ClassVar[dict[str, Range]] = {"gamma": NON_NEGATIVE, "stabilizer": NON_NEGATIVE}

    def groups(self) -> tuple[Group, ...]:
        g = Mod("gamma_pos", self.gamma)
        return (Group(1.0, (Term(Sel.X, g, _bias(g, self.zero_bias)),)),)


@dataclass(frozen=True, repr=False)
class GeneralizedGammaRule(LinearRule):
    """Generalised LRP-γ (Andéol et al.; Zennit's ``Gamma``), sign-aware in inputs and outputs.

    Outputs with z>0: ``x⁺ (W+γW⁺)ᵀ s⁺ + x⁻ (W+γW⁻)ᵀ s⁺`` with
    ``s⁺ = 1[z>0] R / stab((W+γW⁺)x⁺ + (W+γW⁻)x⁻ + b + γb⁺)``; outputs with z<0 the mirror image
    with ``W+γW⁻`` on x⁺, ``W+γW⁺`` on x⁻ and bias ``b + γb⁻``. Default ``gamma=0.25``.

    Valid: ``gamma`` a finite number >= 0, ``stabilizer`` a finite number >= 0.
    """

    gamma: float = 0.25
    stabilizer: float = DEFAULT_STABILIZER
    zero_bias: bool = False
    _shown: ClassVar[tuple[str, ...]] = ("gamma",)
    _ranges: ClassVar[dict[str, Range]] = {"gamma": NON_NEGATIVE, "stabilizer": NON_NEGATIVE}

    def groups(self) -> tuple[Group, ...]:
        up, down = Mod("gamma_pos", self.gamma), Mod("gamma_neg", self.gamma)
        return (
            Group(1.0, (Term(Sel.POS, up, _bias(up, self.zero_bias)), Term(Sel.NEG, down, ZERO)),
                  mask="pos"),
            Group(1.0, (Term(Sel.POS, down, _bias(down, self.zero_bias)), Term(Sel.NEG, up, ZERO)),
                  mask="neg"),
        )


@dataclass(frozen=True, repr=False)
class ZPlusRule(LinearRule):
    """LRP-z⁺ (= AlphaBeta(1, 0)): ``R = x⁺ W⁺ᵀ s + x⁻ W⁻ᵀ s``, ``s = R' / stab(W⁺x⁺ + W⁻x⁻ + b⁺)``.

    The positive bias is in the denominator, as in Zennit and RelevancePropagation.jl.
    Valid: ``stabilizer`` a finite number >= 0.
    """

    stabilizer: float = DEFAULT_STABILIZER
    zero_bias: bool = False

    def groups(self) -> tuple[Group, ...]:
        return (Group(1.0, (Term(Sel.POS, POS, _bias(POS, self.zero_bias)),
                            Term(Sel.NEG, NEG, ZERO))),)


@dataclass(frozen=True, repr=False)
class AlphaBetaRule(LinearRule):
    """LRP-αβ: ``α (x⁺W⁺ᵀ s⁺ + x⁻W⁻ᵀ s⁺) − β (x⁺W⁻ᵀ s⁻ + x⁻W⁺ᵀ s⁻)``.

    ``s⁺ = R / stab(W⁺x⁺ + W⁻x⁻ + b⁺)``, ``s⁻ = R / stab(W⁻x⁺ + W⁺x⁻ + b⁻)``. Requires
    ``alpha, beta >= 0`` (finite) and ``alpha - beta == 1``. Defaults ``alpha=2, beta=1``.
    Valid ``stabilizer``: a finite number >= 0.
    """

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = DEFAULT_STABILIZER
    zero_bias: bool = False
    _shown: ClassVar[tuple[str, ...]] = ("alpha", "beta")
    _ranges: ClassVar[dict[str, Range]] = {"alpha": NON_NEGATIVE, "beta": NON_NEGATIVE,
                                           "stabilizer": NON_NEGATIVE}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not math.isclose(self.alpha - self.beta, 1.0, rel_tol=0, abs_tol=1e-12):
            raise ValueError(f"AlphaBetaRule: alpha - beta must equal 1, got "
                             f"alpha={self.alpha}, beta={self.beta}")

    def groups(self) -> tuple[Group, ...]:
        zb = self.zero_bias
        return (
            Group(self.alpha, (Term(Sel.POS, POS, _bias(POS, zb)), Term(Sel.NEG, NEG, ZERO))),
            Group(-self.beta, (Term(Sel.POS, NEG, _bias(NEG, zb)), Term(Sel.NEG, POS, ZERO))),
        )


@dataclass(frozen=True, repr=False)
class WSquareRule(LinearRule):
    """LRP-w²: ``R_j = sum_i w_ij² R_i / stab(sum_l w_il² + b_i²)``; ignores the input values.

    Follows Zennit: ``b²`` is in the denominator unless ``zero_bias=True``
    (RelevancePropagation.jl's ``WSquareRule`` equals ``WSquareRule(zero_bias=True)``).
    Valid: ``stabilizer`` a finite number >= 0.
    """

    stabilizer: float = DEFAULT_STABILIZER
    zero_bias: bool = False
    multiply_input: ClassVar[bool] = False

    def groups(self) -> tuple[Group, ...]:
        return (Group(1.0, (Term(Sel.ONES, SQUARE, _bias(SQUARE, self.zero_bias)),)),)


@dataclass(frozen=True, repr=False)
class FlatRule(LinearRule):
    """LRP-flat: ``R_j = sum_i R_i / stab(n_i)``, ``n_i`` the in-bounds inputs of output i.

    Weights are replaced by ones and the bias by zero; zero padding is not counted.
    Valid: ``stabilizer`` a finite number >= 0.
    """

    stabilizer: float = DEFAULT_STABILIZER
    multiply_input: ClassVar[bool] = False

    def groups(self) -> tuple[Group, ...]:
        return (Group(1.0, (Term(Sel.ONES, ONES, ZERO),)),)


@dataclass(frozen=True, repr=False)
class ZBoxRule(LinearRule):
    """LRP-z^B for inputs bounded by ``[low, high]`` (the first layer on pixel input).

    ``R = x Wᵀs − l W⁺ᵀs − h W⁻ᵀs``, ``s = R' / stab(Wx + b − (W⁺l + b⁺) − (W⁻h + b⁻))``.
    ``low``/``high`` are scalars or arrays broadcastable to one sample's shape (e.g. per channel
    ``(C, 1, 1)``). Follows Zennit and RelevancePropagation.jl v4: all terms use the affine map
    (v3 routed ``z`` through the layer's activation).

    Valid: ``low`` and ``high`` finite numbers or non-empty arrays of them that broadcast
    together, with ``low <= high`` elementwise (checked here); array bounds must also broadcast
    to one sample of the layer's input (checked when the model is compiled, naming the input).
    ``stabilizer`` a finite number >= 0.
    """

    low: float | tuple[Any, ...] = 0.0
    high: float | tuple[Any, ...] = 1.0
    stabilizer: float = DEFAULT_STABILIZER
    zero_bias: bool = False
    _shown: ClassVar[tuple[str, ...]] = ("low", "high")
    _arrays: ClassVar[tuple[str, ...]] = ("low", "high")

    def __post_init__(self) -> None:
        super().__post_init__()
        low, high = check_bounds(type(self).__name__, self.low, self.high)
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    def groups(self) -> tuple[Group, ...]:
        zb = self.zero_bias
        return (Group(1.0, (Term(Sel.X, ID, _bias(ID, zb)),
                            Term(Sel.LOW, POS, _bias(POS, zb), sign=-1),
                            Term(Sel.HIGH, NEG, _bias(NEG, zb), sign=-1))),)


@dataclass(frozen=True, repr=False)
class UniformRule(Rule):
    """AttnLRP's uniform rule for a product of ``n`` activations (Achtibat et al. 2024, Prop.
    3.2/3.3): each factor gets ``1/n`` of the relevance, ``R_a = a * J_a^T (R / stab(n z))``.

    On ``Mul(a, b)``: ``R_a = R_b = a b R / stab(2ab)`` (``R/2`` each up to the stabilizer); on a
    MatMul of two activations ``O = A B``: ``R_A = A * ((R / stab(2O)) Bᵀ)``, ``R_B = B * (Aᵀ
    (R / stab(2O)))``. Default ``epsilon=0`` (the limit ε → 0, as LXT computes it).

    Valid: ``epsilon`` a finite number >= 0.
    """

    epsilon: float = 0.0
    _ranges: ClassVar[dict[str, Range]] = {"epsilon": NON_NEGATIVE}
    _stabilizers: ClassVar[tuple[str, ...]] = ("epsilon",)

    @property
    def eps(self) -> float:
        """The stabilizer added to ``n z``."""
        return float(self.epsilon)


@dataclass(frozen=True, repr=False)
class PassRule(Rule):
    """Relevance passes through unchanged (``R = reshape(R')``): activations, reshapes, dropout.
    No hyper-parameters."""


@dataclass(frozen=True, repr=False)
class GradientRule(Rule):
    """The layer's plain gradient applied to the relevance (``R_in = J^T R'``): what Zennit does
    for every op it has no rule for. On a gating ``Mul(x, g)`` it sends ``g R'`` to x and
    ``x R'`` to the gate (not conservative); use it to reproduce Zennit's numbers. No
    hyper-parameters."""


#: Rules the z-rule family of non-linear layers (pooling, Add) accepts.
Z_RULES: tuple[type[Rule], ...] = (ZeroRule, EpsilonRule)
#: Rules a linear (Conv/Gemm/MatMul) layer accepts.
LINEAR_RULES: tuple[type[Rule], ...] = (
    ZeroRule, EpsilonRule, GammaRule, GeneralizedGammaRule, ZPlusRule, AlphaBetaRule,
    WSquareRule, FlatRule, ZBoxRule,
)
#: Rules a layer that only moves values (reshape, dropout, activation) accepts.
ROUTING_RULES: tuple[type[Rule], ...] = (PassRule, ZeroRule, EpsilonRule)

ALL_RULES: tuple[type[Rule], ...] = LINEAR_RULES + (PassRule, GradientRule, UniformRule)


def rule_eps(rule: Rule) -> float:
    """The stabilizer of a z-rule family member (ZeroRule, EpsilonRule) or UniformRule."""
    assert isinstance(rule, (LinearRule, UniformRule))
    return rule.eps
