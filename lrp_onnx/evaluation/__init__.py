"""Evaluating explanations by perturbation (pixel flipping, region perturbation, ROAD, SRG) on a
model's own data, every method compiled into ONNX and run by ONNX Runtime; see
``docs/evaluation.md``."""

from __future__ import annotations

from lrp_onnx.evaluation.results import Evaluation, MethodResult
from lrp_onnx.evaluation.run import evaluate

__all__ = ["Evaluation", "MethodResult", "evaluate"]
