"""lrp_onnx: compile Layer-wise Relevance Propagation into ONNX models.

>>> from lrp_onnx import LRP, EpsilonPlusFlat          # doctest: +SKIP
>>> analyzer = LRP("models/seed_vgg.onnx", EpsilonPlusFlat())
>>> analyzer.save("seed_vgg.lrp.onnx")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .analyzer import (  # noqa: E402
    LRP,
    Explanation,
    FlatModel,
    compile,
    flatten_model,
    lrp_rules,
    save_model,
    show_layer_indices,
)
from .check import CheckReport, CheckResult, check_model  # noqa: E402
from .composites import (  # noqa: E402
    PRESETS,
    ActivationLayer,
    Composite,
    ConvLayer,
    DenseLayer,
    DropoutLayer,
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    FirstLayerMap,
    FirstLayerTypeMap,
    FirstNTypeMap,
    GlobalMap,
    GlobalTypeMap,
    LastLayerMap,
    LastLayerTypeMap,
    LayerGroup,
    LayerMap,
    MaxPoolLayer,
    MeanPoolLayer,
    NameMap,
    NormalizationLayer,
    PoolingLayer,
    RangeMap,
    RangeTypeMap,
    ReshapingLayer,
    parse_composite,
)
from .errors import (  # noqa: E402
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
from .options import Optimizations  # noqa: E402
from .rules import (  # noqa: E402
    AlphaBetaRule,
    EpsilonRule,
    FlatRule,
    GammaRule,
    GeneralizedGammaRule,
    GradientRule,
    PassRule,
    Rule,
    WSquareRule,
    ZBoxRule,
    ZeroRule,
    ZPlusRule,
)
from .tree import ChainTuple, ParallelTuple, SkipConnectionTuple  # noqa: E402

__all__ = [
    "LRP", "Explanation", "FlatModel", "compile", "flatten_model", "lrp_rules", "save_model",
    "show_layer_indices", "Optimizations", "ChainTuple", "ParallelTuple",
    "SkipConnectionTuple", "PRESETS",
    "Composite", "LayerGroup",
    "ActivationLayer", "ConvLayer", "DenseLayer", "DropoutLayer", "MaxPoolLayer",
    "MeanPoolLayer", "NormalizationLayer", "PoolingLayer", "ReshapingLayer",
    "EpsilonAlpha2Beta1", "EpsilonAlpha2Beta1Flat", "EpsilonGammaBox", "EpsilonPlus",
    "EpsilonPlusFlat", "FirstLayerMap", "FirstLayerTypeMap", "FirstNTypeMap", "GlobalMap",
    "GlobalTypeMap", "LastLayerMap", "LastLayerTypeMap", "LayerMap", "NameMap", "RangeMap",
    "RangeTypeMap", "parse_composite", "CanonizerError", "LRPError", "ModelLoadError",
    "InvalidInput", "RuleAssignmentError", "RuleNotApplicable", "RuntimeFailure",
    "UnsupportedAttribute",
    "UnsupportedModel",
    "UnsupportedOp", "AlphaBetaRule", "EpsilonRule", "FlatRule", "GammaRule",
    "GeneralizedGammaRule", "GradientRule", "PassRule", "Rule", "WSquareRule", "ZBoxRule",
    "ZeroRule", "ZPlusRule", "CheckReport", "CheckResult", "check_model", "__version__",
]
