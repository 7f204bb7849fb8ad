"""How much int8 quantization changes the explanation: float digits model vs its QDQ version.

    python scripts/quantized_difference.py [--json FILE] [--composites EpsilonPlusFlat,...]

Quantizes ``models/digits_cnn.onnx`` with ``onnxruntime.quantization.quantize_static``
(``QuantFormat.QDQ``, int8 activations and weights; per-tensor and per-channel weights),
calibrated on the 10 shipped samples ``models/digits_samples.npy``, and explains those samples
with both the float and the int8 model for the same targets (the shipped labels). Per composite,
quantization mode and sample it reports the relative L2 difference of the relevance maps,
``||R_int8 - R_float|| / ||R_float||``, and their Pearson correlation, plus whether the two
models predict the same class. Prints a table; ``--json`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
SAMPLES = ROOT / "models" / "digits_samples.npy"
LABELS = ROOT / "models" / "digits_labels.npy"


def compare(float_rel: np.ndarray, int8_rel: np.ndarray) -> list[dict[str, float]]:
    """Per sample relative L2 difference and Pearson correlation."""
    rows = []
    for f, q in zip(float_rel.reshape(len(float_rel), -1).astype(np.float64),
                    int8_rel.reshape(len(int8_rel), -1).astype(np.float64)):
        rows.append({"rel_l2": float(np.linalg.norm(q - f) / np.linalg.norm(f)),
                     "pearson": float(np.corrcoef(f, q)[0, 1])})
    return rows


def measure(composites: list[str]) -> dict[str, Any]:
    import logging

    import lrp_onnx
    from lrp_onnx.testing.quantized import quantize

    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's pre-processing advice
    x = np.load(SAMPLES).astype(np.float32)
    target = np.load(LABELS).astype(np.int64)
    results: dict[str, Any] = {"samples": int(len(x)), "targets": target.tolist(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        quantized = {mode: quantize(MODEL, Path(tmp) / f"digits_{mode}.onnx", x,
                                    mode == "per_channel")
                     for mode in ("per_tensor", "per_channel")}
        for name in composites:
            composite = getattr(lrp_onnx, name)
            ref = lrp_onnx.LRP(MODEL, composite()).analyze(x, target, device="cpu")
            for mode, path in quantized.items():
                got = lrp_onnx.LRP(path, composite()).analyze(x, target, device="cpu")
                per_sample = compare(ref.relevance, got.relevance)
                results["rows"].append({
                    "composite": name, "quantization": mode,
                    "same_prediction": (ref.output.argmax(1) == got.output.argmax(1)).tolist(),
                    "per_sample": per_sample,
                    "rel_l2_median": float(np.median([r["rel_l2"] for r in per_sample])),
                    "rel_l2_max": float(max(r["rel_l2"] for r in per_sample)),
                    "pearson_min": float(min(r["pearson"] for r in per_sample)),
                    "pearson_median": float(np.median([r["pearson"] for r in per_sample])),
                })
    return results


def machine() -> dict[str, Any]:
    import onnxruntime

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "platform": platform.platform(), "commit": commit}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--composites", default="EpsilonPlusFlat,EpsilonPlus",
                        help="comma-separated preset names (default: %(default)s)")
    args = parser.parse_args(argv)
    results = measure(args.composites.split(","))
    results["machine"] = machine()
    print(f"{'composite':<16} {'weights':<12} {'rel L2 median':>13} {'rel L2 max':>10} "
          f"{'r min':>7} {'r median':>8} same class")
    for row in results["rows"]:
        print(f"{row['composite']:<16} {row['quantization']:<12} {row['rel_l2_median']:>13.3f} "
              f"{row['rel_l2_max']:>10.3f} {row['pearson_min']:>7.4f} "
              f"{row['pearson_median']:>8.4f} {sum(row['same_prediction'])}/{results['samples']}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
