"""Seeded random model inputs and relative L2 differences.

Shared by :mod:`lrp_onnx.check` and the fuzzer (:mod:`lrp_onnx.testing.fuzzing`), which import
them from here: product code never imports :mod:`lrp_onnx.testing`.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import numpy as np
import onnx

from lrp_onnx.dtypes import NUMPY_FLOATS
from lrp_onnx.errors import UnsupportedModel


def random_input(model: onnx.ModelProto, rng: np.random.Generator, *, batch: int,
                 label: str = "model", exclude: Collection[str] = (), first: bool = False,
                 dtype: Any = None, clip: float | None = None, max_dim: int | None = None
                 ) -> tuple[str, np.ndarray]:
    """A standard normal array for the model's data input: ``(input name, array)``.

    The data inputs are the graph inputs that are no initializer and not named in ``exclude``.
    Dimensions are the input's static sizes; a symbolic first (batch) dimension becomes
    ``batch``. The array is ``rng.standard_normal(shape)``, clipped to ``[-clip, clip]`` when
    ``clip`` is given, cast to ``dtype``; one call draws the same numbers for the same ``rng``
    state.

    Args:
        first: take the first data input; otherwise there must be exactly one.
        dtype: the array's dtype; by default the input's own, which must be a float type.
        clip: clip the normal values to ``[-clip, clip]`` before the cast.
        max_dim: refuse a static dimension larger than this.

    Raises:
        UnsupportedModel: (naming ``label``) no data input, or not exactly one without
            ``first``; an input that is not a float tensor (without ``dtype``); a symbolic
            dimension after the first; a dimension over ``max_dim``.
    """
    inits = {t.name for t in model.graph.initializer}
    data = [i for i in model.graph.input if i.name not in inits and i.name not in exclude]
    if len(data) != 1 and not (first and data):
        raise UnsupportedModel(f"{label}: expected one data input, found {len(data)}")
    vi = data[0]
    tt = vi.type.tensor_type
    if dtype is None:
        if tt.elem_type not in NUMPY_FLOATS:
            raise UnsupportedModel(f"{label}: input '{vi.name}' is not a float tensor")
        dtype = NUMPY_FLOATS[tt.elem_type]
    shape = []
    for k, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value"):
            if max_dim is not None and d.dim_value > max_dim:
                raise UnsupportedModel(f"{label}: input '{vi.name}' dimension {k} is "
                                       f"{d.dim_value}, over {max_dim}")
            shape.append(int(d.dim_value))
        elif k == 0:
            shape.append(batch)
        else:
            raise UnsupportedModel(f"{label}: input '{vi.name}' dimension {k} is not static")
    x = rng.standard_normal(shape)
    if clip is not None:
        x = np.clip(x, -clip, clip)
    return vi.name, x.astype(dtype)


def rel_l2(a: np.ndarray, b: np.ndarray, *, floor: float = 1e-30) -> float:
    """Relative L2 difference of ``a`` from ``b`` over the whole arrays, in float64:
    ``||a - b|| / max(||b||, floor)``."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a64 - b64) / max(float(np.linalg.norm(b64)), floor))


def rel_l2_per_sample(a: np.ndarray, b: np.ndarray, *, floor: float = 1e-30) -> np.ndarray:
    """:func:`rel_l2` of each sample (each index of the first axis): one value per sample."""
    a64 = a.astype(np.float64).reshape(len(a), -1)
    b64 = b.astype(np.float64).reshape(len(b), -1)
    out: np.ndarray = np.linalg.norm(a64 - b64, axis=1) / np.maximum(
        np.linalg.norm(b64, axis=1), floor)
    return out


__all__ = ["random_input", "rel_l2", "rel_l2_per_sample"]
