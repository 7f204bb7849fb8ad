"""The ``lrp-onnx`` command line: commands (:mod:`.main`), input readers (:mod:`.inputs`),
output writers (:mod:`.outputs`) and heatmaps (:mod:`.heatmap`)."""

from lrp_onnx.cli.main import main

__all__ = ["main"]
