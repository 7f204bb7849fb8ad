"""The relevance emitters and op facts, one module per op family.

Importing this package fills :data:`lrp_onnx.emit.registry.OP_SPECS` and seals it; the compiler
imports it, so the registry is complete whenever ``lrp_onnx`` is imported.
"""

from lrp_onnx.emit.ops import (
    activations,
    attention,
    linear_ops,
    merge,
    norms,
    other,
    pooling,
    quantized,
    structural,
)
from lrp_onnx.emit.registry import seal

seal()

__all__ = ["activations", "attention", "linear_ops", "merge", "norms", "other", "pooling",
           "quantized", "structural"]
