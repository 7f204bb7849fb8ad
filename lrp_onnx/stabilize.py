"""The sign-aware stabilizer and the input selectors, as ONNX ops."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .builder import Builder


def stabilize(b: Builder, z: gs.Tensor, eps: float, tag: str = "stab",
              sign: int | None = None) -> gs.Tensor:
    """``z + eps * sign(z)`` with ``sign(0) = +1`` (Zennit's and RelevancePropagation.jl's).

    Emitted as ``z + Where(z >= 0, eps, -eps)``: ``Sign`` alone maps 0 to 0 and would divide by
    zero. ``-0.0 >= 0`` is true, so ``-0.0`` also gets ``+eps`` (as in Zennit).

    ``sign`` is the sign of ``z`` when it is known statically: ``+1`` (``z >= 0``) emits
    ``z + eps``, ``-1`` (``z <= 0``) emits ``z - eps``, one op instead of three (the ``Where``
    dominates the stabilizer's cost on ONNX Runtime's CPU EP). With ``-1`` an exact zero gets
    ``-eps`` instead of ``+eps``; it is only passed for denominators that are sums of
    non-positive terms, where ``z = 0`` means every term, hence every contribution, is zero.
    """
    if sign == 1:
        return b.op("Add", z, b.scalar(eps), tag=tag)
    if sign == -1:
        return b.op("Sub", z, b.scalar(eps), tag=tag)
    ge = b.op("GreaterOrEqual", z, b.scalar(0.0), tag=f"{tag}/ge0")
    shift = b.op("Where", ge, b.scalar(eps), b.scalar(-eps), tag=f"{tag}/shift")
    return b.op("Add", z, shift, tag=tag)


def positive(b: Builder, x: gs.Tensor) -> gs.Tensor:
    """``max(x, 0)``."""
    return b.op("Relu", x, tag="x+")


def negative(b: Builder, x: gs.Tensor) -> gs.Tensor:
    """``min(x, 0)``."""
    return b.op("Min", x, b.scalar(0.0), tag="x-")


def divide(b: Builder, r: gs.Tensor, z: gs.Tensor, eps: float, tag: str = "s",
           sign: int | None = None) -> gs.Tensor:
    """``r / stab(z)``; ``sign`` as in :func:`stabilize`, else ``+1`` when ``z`` is a forward
    value the graph proves non-negative (with sign analysis on)."""
    if sign is None and b.options.sign_analysis and b.graph.is_nonneg(z):
        sign = 1
    return b.op("Div", r, stabilize(b, z, eps, tag=f"{tag}/stab", sign=sign), tag=tag)
