"""The package version (one home: ``lrp_onnx.__version__`` and the compiled models' record)."""

__version__ = "0.1.0"
