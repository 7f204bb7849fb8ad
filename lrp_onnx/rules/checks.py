"""Checks of rule hyper-parameters: one helper per kind of value, shared by every rule and preset.

A rule declares the :class:`Range` of each float field (``Rule._ranges``) and
:meth:`lrp_onnx.rules.core.Rule.__post_init__` runs :func:`check_number` /
:func:`check_bool` over its fields; ZBox bounds go through :func:`check_bounds`. Each failure is
one ``ValueError`` naming the rule (or preset), the field, what is allowed and what was given:
``"EpsilonRule: epsilon must be a finite number >= 0, got nan"``. Values that depend on the
model's float type are checked when it is compiled (:func:`smallest_stabilizer`,
:meth:`~lrp_onnx.rules.core.Rule.dtype_problem`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Range:
    """The values a numeric hyper-parameter may take: always a finite number, and ``> low``
    (``strict``) or ``>= low``. ``text`` says so in the words every error message uses."""

    low: float = -math.inf
    strict: bool = False

    @property
    def text(self) -> str:
        if self.low == -math.inf:
            return "a finite number"
        return f"a finite number {'>' if self.strict else '>='} {self.low:g}"

    def allows(self, value: float) -> bool:
        return math.isfinite(value) and (value > self.low if self.strict else value >= self.low)


#: Any finite number.
FINITE = Range()
#: A finite number >= 0 (stabilizers, where 0 means the limit ε → 0; gamma; alpha and beta).
NON_NEGATIVE = Range(0.0)


def _shown_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_number(owner: str, name: str, value: Any, allowed: Range = FINITE) -> float:
    """``value`` as a float, or a ``ValueError`` saying what is allowed.

    The one check of every numeric hyper-parameter (rules and presets): a real number (not a
    boolean, not a string), finite, within ``allowed``. The message reads
    ``"EpsilonRule: epsilon must be a finite number >= 0, got nan"``.
    """
    problem = ValueError(f"{owner}: {name} must be {allowed.text}, got {_shown_value(value)}")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
        raise problem
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        raise problem from None
    if not allowed.allows(number):
        raise problem
    return number


def check_bool(owner: str, name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False``, else a ``ValueError``."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{owner}: {name} must be True or False, got {_shown_value(value)}")
    return bool(value)


def check_bounds(owner: str, low: Any, high: Any
                 ) -> tuple[float | tuple[Any, ...], float | tuple[Any, ...]]:
    """ZBox-style bounds: finite numbers or non-empty arrays of them (as nested tuples), that
    broadcast together, with ``low <= high`` elementwise; else a ``ValueError``."""
    arrays = []
    for name, value in (("low", low), ("high", high)):
        allowed = "a finite number or a non-empty array of finite numbers"
        problem = ValueError(f"{owner}: {name} must be {allowed}, got {_shown_value(value)}")
        try:
            raw = np.asarray(value)
            if raw.dtype.kind not in "iuf" or raw.size == 0:
                raise problem
            arr = raw.astype(np.float64)
        except (TypeError, ValueError, OverflowError):
            raise problem from None
        if not np.isfinite(arr).all():
            raise problem
        arrays.append(arr)
    lo, hi = arrays
    try:
        shape = np.broadcast_shapes(lo.shape, hi.shape)
    except ValueError:
        raise ValueError(f"{owner}: low of shape {lo.shape} and high of shape {hi.shape} do not "
                         "broadcast together") from None
    lo_b, hi_b = np.broadcast_to(lo, shape), np.broadcast_to(hi, shape)
    bad = np.argwhere(lo_b > hi_b)
    if len(bad):
        at = tuple(int(i) for i in bad[0])
        where = f" at index {at}" if at else ""
        raise ValueError(f"{owner}: low must be <= high elementwise, got low="
                         f"{float(lo_b[at])!r} > high={float(hi_b[at])!r}{where}")
    return _bound(lo), _bound(hi)


def _bound(value: Any) -> float | tuple[Any, ...]:
    if isinstance(value, (int, float, np.floating, np.integer)):
        return float(value)
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        return float(arr)

    def nest(x: Any) -> Any:
        return tuple(nest(v) for v in x) if isinstance(x, list) else float(x)

    return tuple(nest(arr.tolist()))


def smallest_stabilizer(dtype: Any) -> float:
    """The smallest non-zero stabilizer a model computing in ``dtype`` keeps: float32's
    smallest normal number (1.2e-38), also for float64 models, because ONNX Runtime's graph
    optimizer removes the addition of a constant that is 0 in float32 (``z + 1e-300`` becomes
    ``z``, and ``0 / 0`` NaN); for float16 models at least float16's smallest subnormal."""
    smallest = float(np.finfo(np.float32).tiny)
    if np.dtype(dtype).itemsize < 4:
        smallest = max(smallest, float(np.finfo(dtype).smallest_subnormal))
    return smallest
