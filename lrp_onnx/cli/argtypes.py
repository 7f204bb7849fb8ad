"""Argument types of the ``lrp-onnx`` command line (argparse ``type=`` callables: a refused
value is argparse's usage error, exit 2)."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def number(text: str) -> float:
    """A float, or a fraction such as ``1/255``."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (or a fraction a/b)"
                                         ) from None
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not finite")
    return value


def in_range(low: float, high: float, open_low: bool = False) -> Any:
    def parse(text: str) -> float:
        value = number(text)
        if value > high or value < low or (open_low and value == low):
            bracket = "(" if open_low else "["
            raise argparse.ArgumentTypeError(f"{text} is outside {bracket}{low:g}, {high:g}]")
        return value
    return parse
