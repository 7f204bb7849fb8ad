"""Preset composites: RelevancePropagation.jl's maps for CNNs and the transformer maps
(AttnLRP, CP-LRP as LXT computes them), and the safe parser of their spelled names."""

from __future__ import annotations

from typing import Any

from lrp_onnx.errors import RuleAssignmentError
from lrp_onnx.rules.checks import NON_NEGATIVE, check_bounds, check_number
from lrp_onnx.rules.composites import (
    ActivationLayer,
    Composite,
    ConvLayer,
    DenseLayer,
    DropoutLayer,
    FirstLayerTypeMap,
    GlobalMap,
    GlobalTypeMap,
    NormalizationLayer,
    OutsideAttentionTypeMap,
    Primitive,
    ProductLayer,
    ReshapingLayer,
)
from lrp_onnx.rules.core import (
    AlphaBetaRule,
    EpsilonRule,
    FlatRule,
    GammaRule,
    GeneralizedGammaRule,
    PassRule,
    Rule,
    UniformRule,
    ZBoxRule,
    ZPlusRule,
)
from lrp_onnx.rules.spelling import (
    BadKeywordsError,
    NotACallError,
    NotANumberError,
    parse_spelling,
    quoted,
)


# -- presets (RelevancePropagation.jl's maps) ------------------------------------------------------
# Every preset checks its own arguments first, with the rules' helpers, so that a bad one is
# reported under the preset's name: "EpsilonGammaBox: epsilon must be a finite number >= 0, ...".
def _eps(preset: str, epsilon: Any) -> float:
    return check_number(preset, "epsilon", epsilon, NON_NEGATIVE)


def _gamma(preset: str, name: str, gamma: Any) -> float | None:
    return None if gamma is None else check_number(preset, name, gamma, NON_NEGATIVE)


def _base_map(conv_rule: Rule, epsilon: float) -> GlobalTypeMap:
    return GlobalTypeMap({
        ConvLayer: conv_rule,
        DenseLayer: EpsilonRule(epsilon=epsilon),
        NormalizationLayer: PassRule(),
        DropoutLayer: PassRule(),
        ReshapingLayer: PassRule(),
        "Identity": PassRule(),
    })


def EpsilonPlus(*, epsilon: float = 1e-6) -> Composite:  # noqa: N802 (seed page name)
    """ZPlusRule on convolutions, EpsilonRule on dense layers; ``epsilon`` finite, >= 0."""
    epsilon = _eps("EpsilonPlus", epsilon)
    return Composite(_base_map(ZPlusRule(), epsilon))


def EpsilonAlpha2Beta1(*, epsilon: float = 1e-6) -> Composite:  # noqa: N802
    """AlphaBetaRule(2, 1) on convolutions, EpsilonRule on dense layers; ``epsilon`` finite,
    >= 0."""
    epsilon = _eps("EpsilonAlpha2Beta1", epsilon)
    return Composite(_base_map(AlphaBetaRule(2.0, 1.0), epsilon))


def EpsilonPlusFlat(*, epsilon: float = 1e-6) -> Composite:  # noqa: N802
    """EpsilonPlus with FlatRule on a first convolution; ``epsilon`` finite, >= 0."""
    epsilon = _eps("EpsilonPlusFlat", epsilon)
    return Composite(_base_map(ZPlusRule(), epsilon), FirstLayerTypeMap({ConvLayer: FlatRule()}))


def EpsilonAlpha2Beta1Flat(*, epsilon: float = 1e-6) -> Composite:  # noqa: N802
    """EpsilonAlpha2Beta1 with FlatRule on a first convolution; ``epsilon`` finite, >= 0."""
    epsilon = _eps("EpsilonAlpha2Beta1Flat", epsilon)
    return Composite(_base_map(AlphaBetaRule(2.0, 1.0), epsilon),
                     FirstLayerTypeMap({ConvLayer: FlatRule()}))


def EpsilonGammaBox(low: Any, high: Any, *, epsilon: float = 1e-6,  # noqa: N802
                    gamma: float = 0.25) -> Composite:
    """GammaRule on convolutions, ZBoxRule(low, high) on a first one, EpsilonRule on dense.

    ``low``/``high`` finite numbers or arrays with ``low <= high`` elementwise (as
    :class:`ZBoxRule`), ``epsilon`` and ``gamma`` finite, >= 0."""
    low, high = check_bounds("EpsilonGammaBox", low, high)
    epsilon = _eps("EpsilonGammaBox", epsilon)
    gamma = check_number("EpsilonGammaBox", "gamma", gamma, NON_NEGATIVE)
    return Composite(_base_map(GammaRule(gamma=gamma), epsilon),
                     FirstLayerTypeMap({ConvLayer: ZBoxRule(low, high)}))


def _transformer_map(epsilon: float, attention: Rule, conv_gamma: float | None,
                     dense_gamma: float | None) -> Composite:
    prims: list[Primitive] = [GlobalMap(EpsilonRule(epsilon=epsilon)), GlobalTypeMap({
        ProductLayer: attention,
        ActivationLayer: PassRule(),
        DropoutLayer: PassRule(),
        ReshapingLayer: PassRule(),
    })]
    gammas = {key: GeneralizedGammaRule(gamma=g) for key, g in
              ((ConvLayer, conv_gamma), (DenseLayer, dense_gamma)) if g is not None}
    if gammas:
        prims.append(OutsideAttentionTypeMap(gammas))
    return Composite(*prims)


def AttnLRP(*, epsilon: float = 0.0, conv_gamma: float | None = None,  # noqa: N802
            dense_gamma: float | None = None) -> Composite:
    """AttnLRP (Achtibat et al., ICML 2024) as LXT computes it: the ε-rule (ε → 0 by default)
    on linear layers, residual sums and LayerNorm's centring, the identity rule on activations
    (GELU, SiLU) and on LayerNorm's division by σ, the softmax rule, and the uniform rule on
    products of activations (``Q Kᵀ``, ``A V``). ``conv_gamma``/``dense_gamma``: LXT's Gamma
    variant for ViTs, zennit's (generalised) Gamma rule on convolutions / dense layers outside
    attention (the patch embedding; MLP and head linears), e.g. 0.25 and 0.05. ``epsilon``
    finite, >= 0 (0 is the limit ε → 0); each gamma ``None`` or finite, >= 0."""
    epsilon = _eps("AttnLRP", epsilon)
    conv_gamma = _gamma("AttnLRP", "conv_gamma", conv_gamma)
    dense_gamma = _gamma("AttnLRP", "dense_gamma", dense_gamma)
    return _transformer_map(epsilon, UniformRule(epsilon=epsilon), conv_gamma, dense_gamma)


def CPLRP(*, epsilon: float = 0.0, conv_gamma: float | None = None,  # noqa: N802
          dense_gamma: float | None = None) -> Composite:
    """CP-LRP (Ali et al., ICML 2022; LXT's default map for ViTs): AttnLRP's rules, except that
    the attention weights (the Softmax output multiplying V) are held constant, so ``A V``
    sends all its relevance to ``V`` and none reaches the queries and keys. ``conv_gamma``,
    ``dense_gamma`` as in :func:`AttnLRP`."""
    epsilon = _eps("CPLRP", epsilon)
    conv_gamma = _gamma("CPLRP", "conv_gamma", conv_gamma)
    dense_gamma = _gamma("CPLRP", "dense_gamma", dense_gamma)
    return _transformer_map(epsilon, EpsilonRule(epsilon=epsilon), conv_gamma, dense_gamma)


PRESETS = {
    "EpsilonPlus": EpsilonPlus,
    "EpsilonAlpha2Beta1": EpsilonAlpha2Beta1,
    "EpsilonPlusFlat": EpsilonPlusFlat,
    "EpsilonAlpha2Beta1Flat": EpsilonAlpha2Beta1Flat,
    "EpsilonGammaBox": EpsilonGammaBox,
    "AttnLRP": AttnLRP,
    "CPLRP": CPLRP,
}


def parse_composite(spec: str) -> Composite:
    """Parse ``"EpsilonPlusFlat"`` or ``"EpsilonGammaBox(low=-3.0, high=3.0)"`` safely.

    The text is parsed with :mod:`ast` and only a preset name with numeric arguments is accepted;
    nothing is evaluated. Anything else, and arguments out of the preset's range, is a one-line
    :class:`~lrp_onnx.errors.RuleAssignmentError`.
    """
    names = ", ".join(PRESETS)
    try:
        func, args, kwargs = parse_spelling(spec)  # booleans are not numbers here
    except NotACallError:
        raise RuleAssignmentError(f"composite {quoted(spec)} is not a preset name or call; "
                                  f"presets: {names}") from None
    except NotANumberError:
        raise RuleAssignmentError(f"composite {quoted(spec)}: only numbers are allowed as "
                                  "arguments") from None
    except BadKeywordsError:  # a **mapping or a repeated keyword
        raise RuleAssignmentError(f"composite {quoted(spec)}: **kwargs are not allowed") from None
    if func not in PRESETS:
        raise RuleAssignmentError(f"unknown composite preset {func!r}; presets: {names}")
    try:
        composite: Composite = PRESETS[func](*args, **kwargs)  # type: ignore[operator]
        return composite
    except (TypeError, ValueError) as exc:
        raise RuleAssignmentError(f"composite {quoted(spec)}: {exc}") from None
