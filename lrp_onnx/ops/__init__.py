"""Relevance emitters. Importing this package fills :data:`lrp_onnx.registry.RELEVANCE`."""

from . import linear_ops, merge, pooling, structural

__all__ = ["linear_ops", "merge", "pooling", "structural"]
