"""The element types lrp_onnx reads and writes, in one place.

ONNX ``TensorProto`` codes, their byte sizes, their numpy dtypes (``bfloat16`` has none),
ONNX Runtime's type strings and the float/integer test of a graph tensor, so that no module
keeps its own map.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

_T = onnx.TensorProto

#: Bytes per element of every float type a model may store raw.
FLOAT_ITEMSIZE: dict[int, int] = {_T.FLOAT: 4, _T.DOUBLE: 8, _T.FLOAT16: 2, _T.BFLOAT16: 2}
#: numpy dtype of each float type numpy can hold (not bfloat16).
NUMPY_FLOATS: dict[int, Any] = {_T.FLOAT: np.float32, _T.DOUBLE: np.float64,
                                _T.FLOAT16: np.float16}
#: ONNX Runtime's ``NodeArg.type`` strings of the same types.
ORT_FLOATS: dict[str, Any] = {"tensor(float)": np.float32, "tensor(double)": np.float64,
                              "tensor(float16)": np.float16}
#: Every ONNX Runtime type string lrp_onnx feeds, with its numpy dtype: the floats and the
#: integers of token ids, positions and targets.
ORT_DTYPES: dict[str, Any] = {**ORT_FLOATS, "tensor(int64)": np.int64,
                              "tensor(int32)": np.int32}


def _dtype_is(t: Any, kind: type[Any]) -> bool:
    try:
        return t.dtype is not None and bool(np.issubdtype(np.dtype(t.dtype), kind))
    except TypeError:  # an ONNX type numpy has no name for (UNDEFINED, STRING, ...)
        return False


def float_dtype(t: Any) -> bool:
    """Whether the graph tensor ``t`` (a graphsurgeon ``Tensor``) has a floating-point element
    type (``False`` for an unknown one)."""
    return _dtype_is(t, np.floating)


def integer_dtype(t: Any) -> bool:
    """Whether the graph tensor ``t`` (a graphsurgeon ``Tensor``) has an integer element type
    (``False`` for an unknown one)."""
    return _dtype_is(t, np.integer)
