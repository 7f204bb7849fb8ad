"""The sign-aware stabilizer and the input selectors, as ONNX ops."""

from __future__ import annotations

import onnx_graphsurgeon as gs
from onnx import helper

from lrp_onnx.emit.builder import Builder


def stabilize(b: Builder, z: gs.Tensor, eps: float, tag: str = "stab",
              sign: int | None = None) -> gs.Tensor:
    """``z + eps * sign(z)`` with ``sign(0) = +1`` (Zennit's and RelevancePropagation.jl's).

    Emitted as ``z + (Cast(z >= 0) * 2eps - eps)``: ``Sign`` alone maps 0 to 0 and would divide
    by zero. The shift is exactly ``+eps`` or ``-eps`` (``2eps`` is exact, ``2eps - eps = eps``
    by Sterbenz's lemma), so the sum is the same float as Zennit's ``z + eps * sign``. It is
    faster than ``Where(z >= 0, eps, -eps)`` on ONNX Runtime's CPU EP, whose ``Where`` with
    scalar branches is not vectorised (see docs/performance.md). ``-0.0 >= 0`` is true, so
    ``-0.0`` also gets ``+eps`` (as in Zennit).

    ``sign`` is the sign of ``z`` when it is known statically: ``+1`` (``z >= 0``) emits
    ``z + eps``, ``-1`` (``z <= 0``) emits ``z - eps``, one op instead of five. With ``-1`` an
    exact zero gets ``-eps`` instead of ``+eps``; it is only passed for denominators that are
    sums of non-positive terms, where ``z = 0`` means every term, hence every contribution, is
    zero.
    """
    if eps == 0.0:
        # The limit ε → 0: z itself, and 1 where z is 0 (so 0 / 0 gives 0, not NaN).
        zero = b.op("Cast", b.op("Equal", z, b.scalar(0.0), tag=f"{tag}/eq0"), tag=f"{tag}/eq0f",
                    to=int(helper.np_dtype_to_tensor_dtype(b.dtype)))
        return b.op("Add", z, zero, tag=tag)
    if sign == 1:
        return b.op("Add", z, b.scalar(eps), tag=tag)
    if sign == -1:
        return b.op("Sub", z, b.scalar(eps), tag=tag)
    ge = b.op("GreaterOrEqual", z, b.scalar(0.0), tag=f"{tag}/ge0")
    one = b.op("Cast", ge, tag=f"{tag}/ge0f", to=int(helper.np_dtype_to_tensor_dtype(b.dtype)))
    shift = b.op("Sub", b.op("Mul", one, b.scalar(2.0 * eps), tag=f"{tag}/2eps"),
                 b.scalar(eps), tag=f"{tag}/shift")
    return b.op("Add", z, shift, tag=tag)


def positive(b: Builder, x: gs.Tensor) -> gs.Tensor:
    """``max(x, 0)``."""
    return b.op("Relu", x, tag="x+")


def negative(b: Builder, x: gs.Tensor) -> gs.Tensor:
    """``min(x, 0)``."""
    return b.op("Min", x, b.scalar(0.0), tag="x-")


def divide(b: Builder, r: gs.Tensor, z: gs.Tensor, eps: float, tag: str = "s",
           sign: int | None = None) -> gs.Tensor:
    """``r / stab(z)`` for ``r``, the relevance arriving at ``z`` (or a part of it that is zero
    where it is); ``sign`` as in :func:`stabilize`, else ``+1`` when ``z`` is a forward value the
    graph proves non-negative (with sign analysis on). A ``z`` with a ReLU cover
    (:func:`lrp_onnx.emit.relevance_support.relu_covers`) is divided as
    ``r / (relu(z) + eps)``; an ``r`` that is ``z * t`` (``abs_denominators``) as
    ``(|z| * t) / (|z| + eps)``. With ``eps = 0`` an ``r`` recorded as ``z * t``
    (:meth:`~lrp_onnx.emit.builder.Builder.factored`) gives ``t``: no division at all."""
    if eps == 0.0:
        t0 = b.factor(r, z)
        if t0 is not None:
            return t0
    cover = b.relu_covers.get(z.name) if sign is None else None
    if cover is not None:
        return b.op("Div", r, stabilize(b, cover, eps, tag=f"{tag}/stab", sign=1), tag=tag)
    if sign is None and b.options.sign_analysis and b.graph.is_nonneg(z):
        sign = 1
    t = _factor(r, z) if sign is None and b.options.abs_denominators else None
    if t is not None:
        # r = z * t: r / (z + eps*sign(z)) is exactly (|z| * t) / (|z| + eps), since negating
        # an operand negates a rounded product, sum or quotient; one Abs instead of four ops.
        az = b.op("Abs", z, tag=f"{tag}/abs")
        return b.op("Div", b.op("Mul", az, t, tag=f"{tag}/abs_r"),
                    stabilize(b, az, eps, tag=f"{tag}/stab", sign=1), tag=tag)
    return b.op("Div", r, stabilize(b, z, eps, tag=f"{tag}/stab", sign=sign), tag=tag)


def _factor(r: gs.Tensor, z: gs.Tensor) -> gs.Tensor | None:
    """``t`` when ``r`` is made by ``Mul(z, t)`` or ``Mul(t, z)`` (a z-rule reader's relevance
    ``x * s`` arriving whole at ``z``, as a residual ``Add``'s does), else ``None``."""
    if len(r.inputs) != 1:
        return None
    node = r.inputs[0]
    if node.op != "Mul" or len(node.inputs) != 2:
        return None
    a, c = node.inputs
    if a.name == z.name and c.name != z.name:
        return c
    if c.name == z.name and a.name != z.name:
        return a
    return None
