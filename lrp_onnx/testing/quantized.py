"""Quantized test models: ONNX Runtime's ``quantize_static`` in QDQ format (used by
``tests/test_quantized.py`` and ``scripts/quantized_difference.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx


def quantize(src: Path, dst: Path, calibration: np.ndarray, per_channel: bool) -> Path:
    """Write ``src`` quantized by ``quantize_static`` (QDQ format, int8 activations and
    weights, calibrated on ``calibration`` one sample at a time) to ``dst``; returns ``dst``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    name = onnx.load(str(src), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = iter([{name: calibration[i:i + 1]} for i in range(len(calibration))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8)
    return dst
