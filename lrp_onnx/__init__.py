"""lrp_onnx: compile Layer-wise Relevance Propagation into ONNX models.

>>> from lrp_onnx import LRP, EpsilonPlusFlat          # doctest: +SKIP
>>> analyzer = LRP("models/seed_vgg.onnx", EpsilonPlusFlat())
>>> analyzer.save("seed_vgg.lrp.onnx")
"""

from __future__ import annotations

from lrp_onnx.api import LRP, FlatModel, compile, flatten_model, lrp_rules, show_layer_indices
from lrp_onnx.check import CheckReport, CheckResult, check_model
from lrp_onnx.emit.optimizations import Optimizations
from lrp_onnx.errors import (
    CanonizerError,
    InvalidInput,
    LRPError,
    ModelLoadError,
    RuleAssignmentError,
    RuleNotApplicable,
    RuntimeFailure,
    UnsupportedAttribute,
    UnsupportedModel,
    UnsupportedOp,
)
from lrp_onnx.evaluation import Evaluation, MethodResult, evaluate
from lrp_onnx.frontend.structure import ChainTuple, ParallelTuple, SkipConnectionTuple
from lrp_onnx.io import save_model
from lrp_onnx.rules.composites import (
    ActivationLayer,
    Composite,
    ConvLayer,
    DenseLayer,
    DropoutLayer,
    FirstLayerMap,
    FirstLayerTypeMap,
    FirstNTypeMap,
    GlobalMap,
    GlobalTypeMap,
    LastLayerMap,
    LastLayerTypeMap,
    LayerGroup,
    LayerMap,
    LayerNormLayer,
    MaxPoolLayer,
    MeanPoolLayer,
    NameMap,
    NormalizationLayer,
    OutsideAttentionTypeMap,
    PoolingLayer,
    ProductLayer,
    RangeMap,
    RangeTypeMap,
    ReshapingLayer,
    SoftmaxLayer,
)
from lrp_onnx.rules.core import (
    AlphaBetaRule,
    EpsilonRule,
    FlatRule,
    GammaRule,
    GeneralizedGammaRule,
    GradientRule,
    PassRule,
    Rule,
    UniformRule,
    WSquareRule,
    ZBoxRule,
    ZeroRule,
    ZPlusRule,
)
from lrp_onnx.rules.presets import (
    CPLRP,
    PRESETS,
    AttnLRP,
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    parse_composite,
)
from lrp_onnx.runtime import Explanation
from lrp_onnx.version import __version__

__all__ = [
    "LRP", "Explanation", "FlatModel", "compile", "flatten_model", "lrp_rules", "save_model",
    "show_layer_indices", "Optimizations", "ChainTuple", "ParallelTuple",
    "SkipConnectionTuple", "PRESETS",
    "Composite", "LayerGroup",
    "ActivationLayer", "ConvLayer", "DenseLayer", "DropoutLayer", "MaxPoolLayer",
    "MeanPoolLayer", "NormalizationLayer", "PoolingLayer", "ReshapingLayer", "LayerNormLayer",
    "SoftmaxLayer", "ProductLayer", "AttnLRP", "CPLRP", "UniformRule",
    "OutsideAttentionTypeMap",
    "EpsilonAlpha2Beta1", "EpsilonAlpha2Beta1Flat", "EpsilonGammaBox", "EpsilonPlus",
    "EpsilonPlusFlat", "FirstLayerMap", "FirstLayerTypeMap", "FirstNTypeMap", "GlobalMap",
    "GlobalTypeMap", "LastLayerMap", "LastLayerTypeMap", "LayerMap", "NameMap", "RangeMap",
    "RangeTypeMap", "parse_composite", "CanonizerError", "LRPError", "ModelLoadError",
    "InvalidInput", "RuleAssignmentError", "RuleNotApplicable", "RuntimeFailure",
    "UnsupportedAttribute",
    "UnsupportedModel",
    "UnsupportedOp", "AlphaBetaRule", "EpsilonRule", "FlatRule", "GammaRule",
    "GeneralizedGammaRule", "GradientRule", "PassRule", "Rule", "WSquareRule", "ZBoxRule",
    "ZeroRule", "ZPlusRule", "CheckReport", "CheckResult", "check_model", "evaluate",
    "Evaluation", "MethodResult", "__version__",
]
