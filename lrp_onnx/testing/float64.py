"""Run an ONNX graph in float64: the exact-arithmetic side of the oracle comparisons (needs torch).

ONNX Runtime's CPU provider has no float64 ``Conv``/``ConvTranspose``, and
``onnx.reference.ReferenceEvaluator`` runs them (and ``MaxPool`` with indices,
``ScatterElements``) as Python loops: minutes per image on a 224x224 network. :func:`run` keeps the
reference evaluator for every other op and computes those with PyTorch's float64 kernels.

Why: on random-weight networks float32 LRP can be ill-conditioned (a residual sum, an average of
signed values or a dense unit that lands a few ulps from zero divides the relevance by a rounding
error), so two correct float32 implementations can differ by more than any fixed tolerance. In
float64 the same graphs agree with Zennit's float64 to ~1e-10 (see tests/test_zoo.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

_F32, _F64 = TensorProto.FLOAT, TensorProto.DOUBLE


def _retype(t: onnx.TensorProto) -> None:
    if t.data_type == _F32:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` in which every float32 tensor (initializers, ``Constant`` values,
    ``Cast``/``ConstantOfShape``/``EyeLike`` targets, graph inputs, outputs and value infos) is
    float64. Subgraphs are not visited (the compiled graphs have none)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for t in g.initializer:
        _retype(t)
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                _retype(a.t)
            elif a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i == _F32:
                a.i = _F64
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == _F32:
            vi.type.tensor_type.elem_type = _F64
    return out


def _ints(value: Any, n: int, default: int) -> list[int]:
    return [int(v) for v in value] if value is not None and len(value) else [default] * n


def _new_ops() -> list[type]:
    import torch

    def t(a: Any) -> Any:  # no copy unless the array is read-only or strided
        return torch.from_numpy(np.require(a, requirements=("C", "W")))
    import torch.nn.functional as F
    from onnx.reference.op_run import OpRun
    from onnx.reference.ops.op_one_hot import OneHot as _OneHot

    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
    tconv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

    def flat_pads(pads: Any, nd: int) -> list[int]:
        p = _ints(pads, 2 * nd, 0)
        out: list[int] = []
        for i in reversed(range(nd)):  # F.pad: last axis first, (begin, end)
            out += [p[i], p[i + nd]]
        return out

    def check(auto_pad: Any) -> None:
        if auto_pad not in (None, "NOTSET", b"NOTSET"):
            raise NotImplementedError(f"float64 runner: auto_pad={auto_pad!r}")

    class Conv(OpRun):
        def _run(self, X: Any, W: Any, B: Any = None, auto_pad: Any = None,
                 dilations: Any = None, group: Any = None, kernel_shape: Any = None,
                 pads: Any = None, strides: Any = None) -> Any:
            check(auto_pad)
            nd = W.ndim - 2
            x = F.pad(t(X), flat_pads(pads, nd))
            y = conv[nd](x, t(W),
                         None if B is None else t(B),
                         stride=_ints(strides, nd, 1), dilation=_ints(dilations, nd, 1),
                         groups=int(group or 1))
            return (y.numpy(),)

    class ConvTranspose(OpRun):
        def _run(self, X: Any, W: Any, B: Any = None, auto_pad: Any = None,
                 dilations: Any = None, group: Any = None, kernel_shape: Any = None,
                 output_padding: Any = None, output_shape: Any = None, pads: Any = None,
                 strides: Any = None) -> Any:
            check(auto_pad)
            if output_shape is not None and len(output_shape):
                raise NotImplementedError("float64 runner: ConvTranspose output_shape")
            nd = W.ndim - 2
            y = tconv[nd](t(X),
                          t(W),
                          stride=_ints(strides, nd, 1), dilation=_ints(dilations, nd, 1),
                          groups=int(group or 1))
            # output_padding: zero rows at the end (no tap reaches them); pads: crop.
            extra = _ints(output_padding, nd, 0)
            y = F.pad(y, [v for e in reversed(extra) for v in (0, e)])
            p = _ints(pads, 2 * nd, 0)
            crop = tuple([slice(None)] * 2 + [slice(p[i], y.shape[2 + i] - p[i + nd])
                                              for i in range(nd)])
            y = y[crop]
            if B is not None:
                y = y + t(B).reshape(1, -1, *[1] * nd)
            return (np.ascontiguousarray(y.numpy()),)

    class MaxPool(OpRun):
        def _run(self, X: Any, auto_pad: Any = None, ceil_mode: Any = None,
                 dilations: Any = None, kernel_shape: Any = None, pads: Any = None,
                 storage_order: Any = None, strides: Any = None) -> Any:
            check(auto_pad)
            if storage_order:
                raise NotImplementedError("float64 runner: MaxPool storage_order=1")
            nd = len(kernel_shape)
            if nd != 2:
                raise NotImplementedError("float64 runner: MaxPool other than 2-D")
            k, s = _ints(kernel_shape, nd, 1), _ints(strides, nd, 1)
            d, p = _ints(dilations, nd, 1), _ints(pads, 2 * nd, 0)
            size, out = list(X.shape[2:]), []
            for i in range(nd):
                span = size[i] + p[i] + p[i + nd] - ((k[i] - 1) * d[i] + 1)
                o = (-(-span // s[i]) if ceil_mode else span // s[i]) + 1
                if ceil_mode and (o - 1) * s[i] >= size[i] + p[i]:
                    o -= 1  # a last window starting in the end padding is dropped
                out.append(o)
            # pad with -inf so that every window of the output fits, then pool unpadded
            ends = [max(p[i + nd], (out[i] - 1) * s[i] + (k[i] - 1) * d[i] + 1
                        - size[i] - p[i]) for i in range(nd)]
            x = t(X)
            xp = F.pad(x, [p[1], ends[1], p[0], ends[0]], value=-np.inf)
            y, idx = F.max_pool2d(xp, k, s, 0, d, return_indices=True)
            y, idx = y[:, :, :out[0], :out[1]], idx[:, :, :out[0], :out[1]]
            wp = xp.shape[3]
            h, w = idx // wp - p[0], idx % wp - p[1]
            n, c = X.shape[:2]
            plane = torch.arange(n * c).reshape(n, c, 1, 1) * (size[0] * size[1])
            return (np.ascontiguousarray(y.numpy()), (plane + h * size[1] + w).numpy())

    class ScatterElements(OpRun):
        def _run(self, data: Any, indices: Any, updates: Any, axis: Any = None,
                 reduction: Any = None) -> Any:
            if reduction not in ("add", b"add"):
                raise NotImplementedError(f"float64 runner: ScatterElements {reduction!r}")
            ax = int(axis or 0)
            idx = t(indices).long()
            idx = torch.where(idx < 0, idx + data.shape[ax], idx)
            out = torch.from_numpy(np.array(data, copy=True)).scatter_add(
                ax, idx, t(updates))
            return (out.numpy(),)

    class OneHot(_OneHot):  # the reference wants a 0-d depth; the spec allows shape [1]
        def _run(self, indices: Any, depth: Any, values: Any, axis: Any = None) -> Any:
            return super()._run(  # type: ignore[no-untyped-call]
                indices, np.asarray(depth).reshape(()), values, axis=axis)

    return [Conv, ConvTranspose, MaxPool, ScatterElements, OneHot]


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
        outputs: list[str] | None = None, *, float32: bool = False) -> list[np.ndarray]:
    """Evaluate ``model`` in float64 (converted by :func:`to_float64` first when it has float32
    inputs or non-scalar float32 initializers); float feeds are cast to float64.

    ``float32=True`` runs a float32 model as it is, on the same numpy/PyTorch kernels: a second
    float32 runtime to tell a graph's rounding from one runtime's kernel accuracy.
    """
    from onnx.reference import ReferenceEvaluator

    if float32:
        return list(ReferenceEvaluator(model, new_ops=_new_ops()).run(outputs, feeds))
    if any(t.data_type == _F32 for t in model.graph.initializer if len(t.dims)) or any(
            vi.type.tensor_type.elem_type == _F32 for vi in model.graph.input):
        model = to_float64(model)  # a float64 model is run as is (no copy)
    feeds = {k: (np.asarray(v, np.float64) if np.issubdtype(np.asarray(v).dtype, np.floating)
                 else np.asarray(v)) for k, v in feeds.items()}
    evaluator = ReferenceEvaluator(model, new_ops=_new_ops())
    return list(evaluator.run(outputs, feeds))
