"""Switches for the compiler's graph optimizations.

Each one changes how the relevance pass is computed, never what it computes: the tests compile
models with every switch on and off and compare the relevance (``tests/test_optimizations.py``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Optimizations:
    """Which optimizations :class:`~lrp_onnx.LRP` applies (all on by default).

    Attributes:
        reuse_forward: ZeroRule/EpsilonRule divide by the forward pass's own pre-activation
            instead of recomputing ``f(x; W, b)``.
        sign_analysis: inputs proven non-negative (after Relu, max pooling of such values, ...)
            drop the ``x⁻`` terms of ZPlus/AlphaBeta/GeneralizedGamma and use ``x`` for ``x⁺``.
        conv_transpose_as_conv: the transpose of a stride-1 convolution is emitted as a ``Conv``
            with flipped, channel-swapped weights instead of a ``ConvTranspose`` (faster on ONNX
            Runtime's CPU EP, whose ``Conv`` runs in its blocked layout, 1x1 kernels included;
            see docs/performance.md); strided convolutions keep ``ConvTranspose``.
        relu_denominators: a ZeroRule/EpsilonRule denominator ``z`` read only by a ReLU whose
            output carries relevance only where it is non-zero (every reader multiplies its
            relevance by its input, :mod:`lrp_onnx.emit.relevance_support`) is stabilized as
            ``relu(z) + eps``, the forward pass's own ReLU output plus one ``Add``, instead of
            the sign-aware ``z + (Cast(z >= 0) * 2eps - eps)``: the same floats wherever the
            relevance is not zero.
        abs_denominators: a ZeroRule/EpsilonRule denominator ``z`` of unknown sign whose
            relevance arrives as ``z * t`` (a residual ``Add``'s z-rule gives each summand
            ``x * s``) is divided as ``(|z| * t) / (|z| + eps)`` instead of
            ``(z * t) / (z + eps * sign(z))``: the same floats, with one ``Abs`` instead of the
            four ops of the sign-aware stabilizer.
        modifiers_as_ops: modified weights (``W⁺``, ``W⁻``, ``W²``, ``W + γW⁺``, folded
            BatchNorm, flipped kernels, transposed MatMul weights) are emitted as ops on the
            model's own initializers, which ONNX Runtime folds into constants when it creates
            the session: the compiled file holds no copy of any weight and compiling reads
            none. Off: they are computed at compile time in float64 numpy and stored.
    """

    reuse_forward: bool = True
    sign_analysis: bool = True
    conv_transpose_as_conv: bool = True
    modifiers_as_ops: bool = True
    relu_denominators: bool = True
    abs_denominators: bool = True

    @classmethod
    def none(cls) -> Optimizations:
        """Every optimization off (the plain, literal graph)."""
        return cls(reuse_forward=False, sign_analysis=False, conv_transpose_as_conv=False,
                   modifiers_as_ops=False, relu_denominators=False, abs_denominators=False)
