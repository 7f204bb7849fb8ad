"""Window geometry of Conv and pooling nodes (pads, the transpose's ``output_padding``), with
spatial sizes that may be unknown before run time (``None``: a dynamic image height or width).

A transposed strided window op maps ``out`` back to ``in`` only with an ``output_padding`` that
depends on ``in``. Where a size is unknown, the transpose is emitted without it and without its
end pad (which would crop rows the last window did read), and :func:`fit_like` pads its end with
``stride - 1`` zero rows and crops it to the input's size at run time (``Pad`` -> ``Slice`` to
``Shape(x)[2:]``): the rows it adds are the ones no window reads, whose relevance is zero.
Static sizes give the same nodes as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_graphsurgeon as gs

from lrp_onnx.emit.builder import Builder
from lrp_onnx.errors import UnsupportedAttribute, node_label
from lrp_onnx.frontend.graph import attr, ints


def explicit_pads(node: gs.Node, opset: int, in_shape: Sequence[int | None],
                  kernel: Sequence[int], strides: Sequence[int],
                  dilations: Sequence[int]) -> list[int]:
    """ONNX ``pads`` (begins then ends) with ``auto_pad`` resolved against the input sizes. A
    ``SAME_*`` pad of a stride-1 axis does not depend on the size; of a strided axis whose size
    is unknown before run time it does, and the node is refused."""
    auto_pad = attr(node, "auto_pad", opset, "NOTSET")
    n = len(kernel)
    if auto_pad in ("NOTSET", ""):
        pads = ints(attr(node, "pads", opset, None)) or [0] * (2 * n)
        return pads
    if auto_pad == "VALID":
        return [0] * (2 * n)
    begins, ends = [], []
    for i in range(n):
        size = in_shape[i]
        if size is None:
            if strides[i] != 1:
                raise UnsupportedAttribute(
                    f"node {node_label(node.name, node.op, opset)}: auto_pad={auto_pad} with "
                    f"stride {strides[i]} on a spatial axis whose size is not known before run "
                    "time (its pads depend on the size); re-export with explicit pads or a "
                    "fixed input size")
            size = 1  # stride 1: the total pad (k-1)d does not depend on the size
        out = -(-size // strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def transpose_padding(in_shape: Sequence[int], out_shape: Sequence[int], kernel: Sequence[int],
                      strides: Sequence[int], dilations: Sequence[int],
                      pads: Sequence[int]) -> tuple[list[int], list[int]]:
    """``(pads, output_padding)`` for a ConvTranspose that maps ``out_shape`` back to ``in_shape``.

    Forward windows: ``out = floor((in + pb + pe - ((k-1)d+1)) / s) + 1`` (or one more with
    ``ceil_mode``). End pads are extended when a ceil-mode window overhangs, and
    ``output_padding = in + pb + pe' - ((k-1)d+1) - (out-1)s`` restores the rows the stride dropped.
    """
    n = len(kernel)
    new_pads = list(pads)
    out_pad = []
    for i in range(n):
        span = (kernel[i] - 1) * dilations[i] + 1
        pb, pe = pads[i], pads[i + n]
        pe = max(pe, (out_shape[i] - 1) * strides[i] + span - in_shape[i] - pb)
        new_pads[i + n] = pe
        op = in_shape[i] + pb + pe - span - (out_shape[i] - 1) * strides[i]
        if not 0 <= op < max(strides[i], dilations[i]):
            raise ValueError(f"cannot invert window geometry along dim {i}")
        out_pad.append(op)
    return new_pads, out_pad



def transpose_geometry(in_shape: Sequence[int | None], out_shape: Sequence[int | None],
                       kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
                       pads: Sequence[int]) -> tuple[list[int], list[int], list[int] | None]:
    """:func:`transpose_padding` where sizes may be unknown: ``(pads, output_padding, extra)``.
    An unknown axis of stride 1 keeps its pads and gets ``output_padding`` 0 (exact: the
    transpose of a stride-1 window op needs none). An unknown strided axis gets pads 0 and
    ``output_padding`` 0 (with its begin pad, a 1x1 map whose one window lies in that pad would
    transpose to 0 rows): the transpose then starts ``pb`` rows before the input, which
    :func:`fit_like` crops, and ends ``op - pe`` rows short of the input, where
    ``0 <= op < stride`` (no ceil-mode overhang: the caller refuses ``ceil_mode`` there), so
    ``extra`` (``None`` when no axis needs it) holds ``stride - 1`` rows per such axis that
    :func:`fit_like` pads on and then crops to the input's size at run time."""
    n = len(kernel)
    unknown = [i for i in range(n) if in_shape[i] is None or out_shape[i] is None]
    if not unknown:
        new_pads, out_pad = transpose_padding([int(d) for d in in_shape],  # type: ignore[arg-type]
                                              [int(d) for d in out_shape],  # type: ignore[arg-type]
                                              kernel, strides, dilations, pads)
        return new_pads, out_pad, None
    new_pads, out_pad, extra = list(pads), [0] * n, [0] * n
    for i in range(n):
        if i in unknown:
            if strides[i] != 1:  # no pads: a window wholly in the begin pad leaves rows
                new_pads[i], new_pads[i + n], extra[i] = 0, 0, strides[i] - 1
            continue
        one_pads, one_op = transpose_padding([in_shape[i]], [out_shape[i]],  # type: ignore[list-item]
                                             [kernel[i]], [strides[i]], [dilations[i]],
                                             [pads[i], pads[i + n]])
        new_pads[i + n], out_pad[i] = one_pads[1], one_op[0]
    return new_pads, out_pad, extra if any(extra) else None


def fit_like(b: Builder, value: gs.Tensor, like: gs.Tensor, extra: list[int],
             tag: str = "fit", begin: Sequence[int] | None = None) -> gs.Tensor:
    """``value`` ``[N, C, *spatial]`` padded with ``extra`` zero rows at the end of each spatial
    axis, then cropped to the spatial size of ``like`` at run time from ``begin`` (0s by
    default; ``Pad`` -> ``Slice`` to ``begin + Shape(like)[2:]``)."""
    rank = len(extra) + 2
    begin = list(begin) if begin is not None else [0] * len(extra)
    big = 2**62
    padded = b.op("Pad", value, b.ints([0] * rank + [0, 0] + list(extra)), tag=f"{tag}/pad",
                  mode="constant")
    size = b.op("Slice", b.op("Shape", like, tag=f"{tag}/shape"), b.ints([2]), b.ints([big]),
                b.ints([0]), tag=f"{tag}/size")
    if any(begin):
        size = b.op("Add", size, b.ints(begin), tag=f"{tag}/end")
    return b.op("Slice", padded, b.ints(begin), size, b.ints(list(range(2, rank))), tag=tag)
