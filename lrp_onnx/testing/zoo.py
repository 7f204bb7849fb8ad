"""The torchvision model zoo as the tests and scripts use it, and the Zennit canonizers that make
Zennit's result well-defined on it (needs torch, torchvision, zennit).

Zennit attributes only ``nn.Module`` s: a functional op (``x + self.conv(x)``, ``F.relu``,
``F.adaptive_avg_pool2d``) gets its plain gradient, which copies relevance to both summands of a
residual sum. Zennit ships canonizers for torchvision's ResNets only; :func:`canonizers` adds the
same kind of forward override (a ``zennit.layer.Sum`` module, which Zennit's composites give the
proportional ``Norm`` rule) for MobileNetV2/V3's inverted residuals, EfficientNet's MBConv and
RegNet's bottlenecks, and replaces the functional ReLU / global average pool in the heads of
DenseNet and MobileNetV2 by modules (``Pass`` / ``Norm``). With them, Zennit computes what the
compiler documents for these graphs (proportional split at ``Add``, ``Norm`` on global pooling,
pass-through activations). A squeeze-excitation ``scale * x`` stays functional: Zennit sends its
plain gradient through both factors, which ``GradientRule`` on our ``Mul`` layers reproduces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The zoo of the model-coverage issue: torchvision names.
NAMES = ("vgg16", "vgg16_bn", "resnet18", "resnet50", "densenet121", "mobilenet_v2",
         "mobilenet_v3_small", "efficientnet_b0", "googlenet", "regnet_x_400mf")
#: Models with squeeze-excitation gates (compared with GradientRule on their Mul layers).
GATED = frozenset({"mobilenet_v3_small", "efficientnet_b0"})


def build(name: str, seed: int = 0, bn_seed: int = 0, bn_eps: float = 1e-30) -> Any:
    """torchvision ``name`` with random weights (seeded), random BatchNorm statistics and every
    BN epsilon set to ``bn_eps`` (zennit 0.5.1's BN merge keeps epsilon in the merged layer, a
    ~4e-5 relative artifact; its own tests use 1e-30), in eval mode."""
    import torch
    import torchvision

    from lrp_onnx.testing.oracle import randomize_batchnorm, set_batchnorm_eps

    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"weights": None}
    if name == "googlenet":
        # init_weights=True (trunc-normal std 0.01) makes activations vanish: the logits no
        # longer depend on the input and float32 relevance is noise. Default init instead.
        kwargs.update(aux_logits=False, init_weights=False)
    model = getattr(torchvision.models, name)(**kwargs).eval()
    randomize_batchnorm(model, seed=bn_seed)
    set_batchnorm_eps(model, bn_eps)
    return model.eval()


def _stacked_sum(module: Any, a: Any, b: Any) -> Any:
    import torch

    return module.canonizer_sum(torch.stack([a, b], dim=-1))


def _mbv2_residual(self: Any, x: Any) -> Any:
    if self.use_res_connect:
        return _stacked_sum(self, x, self.conv(x))
    return self.conv(x)


def _mbv3_residual(self: Any, x: Any) -> Any:
    result = self.block(x)
    if self.use_res_connect:
        result = _stacked_sum(self, result, x)
    return result


def _mbconv(self: Any, x: Any) -> Any:
    result = self.block(x)
    if self.use_res_connect:
        result = _stacked_sum(self, self.stochastic_depth(result), x)
    return result


def _regnet_block(self: Any, x: Any) -> Any:
    skip = self.proj(x) if self.proj is not None else x
    return self.activation(_stacked_sum(self, skip, self.f(x)))


def _densenet_head(self: Any, x: Any) -> Any:
    import torch

    out = self.canonizer_pool(self.canonizer_relu(self.features(x)))
    return self.classifier(torch.flatten(out, 1))


def _mbv2_head(self: Any, x: Any) -> Any:
    import torch

    x = self.canonizer_pool(self.features(x))
    return self.classifier(torch.flatten(x, 1))


def _override(cls: type, forward: Callable[..., Any], extra: Callable[[], dict[str, Any]]) -> Any:
    from zennit.canonizers import AttributeCanonizer

    def attribute_map(name: str, module: Any) -> dict[str, Any] | None:
        if type(module) is cls:
            return {"forward": forward.__get__(module), **extra()}
        return None

    return AttributeCanonizer(attribute_map)


def canonizers(name: str, model: Any) -> list[Any]:
    """Zennit canonizers for ``model`` (torchvision ``name``); see the module docstring."""
    from torch import nn
    from torchvision.models import densenet, efficientnet, mobilenetv2, mobilenetv3, regnet
    from zennit.canonizers import NamedMergeBatchNorm, SequentialMergeBatchNorm
    from zennit.layer import Sum
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    def with_sum() -> dict[str, Any]:
        return {"canonizer_sum": Sum()}

    if name.startswith("vgg"):
        return [VGGCanonizer()]
    if name.startswith("resnet"):
        return [ResNetCanonizer()]
    if name.startswith("densenet"):
        # A plain sequential merge would pair each dense block's last conv with the next
        # transition's BN (adjacent leaves, different tensors): merge the real pairs by name.
        pairs = [(("features.conv0",), "features.norm0")]
        pairs += [((f"{n}.conv1",), f"{n}.norm2") for n, m in model.named_modules()
                  if isinstance(m, densenet._DenseLayer)]
        head = _override(type(model), _densenet_head,
                         lambda: {"canonizer_relu": nn.ReLU(),
                                  "canonizer_pool": nn.AdaptiveAvgPool2d(1)})
        return [NamedMergeBatchNorm(pairs), head]
    if name == "mobilenet_v2":
        return [SequentialMergeBatchNorm(),
                _override(mobilenetv2.InvertedResidual, _mbv2_residual, with_sum),
                _override(mobilenetv2.MobileNetV2, _mbv2_head,
                          lambda: {"canonizer_pool": nn.AdaptiveAvgPool2d(1)})]
    if name.startswith("mobilenet_v3"):
        return [SequentialMergeBatchNorm(),
                _override(mobilenetv3.InvertedResidual, _mbv3_residual, with_sum)]
    if name.startswith("efficientnet"):
        return [SequentialMergeBatchNorm(),
                _override(efficientnet.MBConv, _mbconv, with_sum)]
    if name.startswith("regnet"):
        return [SequentialMergeBatchNorm(),
                _override(regnet.ResBottleneckBlock, _regnet_block, with_sum)]
    return [SequentialMergeBatchNorm()]


@dataclass(frozen=True)
class Preset:
    """A preset compared against Zennit: our composite and Zennit's, for one model."""

    name: str
    ours: Callable[[str], Any]
    zennit: Callable[[list[Any]], Any]


def _ours_epf(model: str) -> Any:
    import lrp_onnx as L

    prims = list(L.EpsilonPlusFlat().primitives)
    if model in GATED:
        prims.append(L.GlobalTypeMap({"Mul": L.GradientRule()}))
    return L.Composite(*prims)


def _ours_egb(model: str) -> Any:
    """EpsilonGammaBox(-3, 3) with Zennit's (generalized) gamma on the convolutions."""
    import lrp_onnx as L

    prims = list(L.EpsilonGammaBox(-3.0, 3.0).primitives)
    prims += [L.GlobalTypeMap({L.ConvLayer: L.GeneralizedGammaRule()}),
              L.FirstLayerTypeMap({L.ConvLayer: L.ZBoxRule(-3.0, 3.0)})]
    if model in GATED:
        prims.append(L.GlobalTypeMap({"Mul": L.GradientRule()}))
    return L.Composite(*prims)


def _zennit_epf(canon: list[Any]) -> Any:
    from zennit.composites import EpsilonPlusFlat

    return EpsilonPlusFlat(canonizers=canon)


def _zennit_egb(canon: list[Any]) -> Any:
    from zennit.composites import EpsilonGammaBox

    return EpsilonGammaBox(low=-3.0, high=3.0, canonizers=canon)


PRESETS = (Preset("EpsilonPlusFlat", _ours_epf, _zennit_epf),
           Preset("EpsilonGammaBox", _ours_egb, _zennit_egb))


def zennit_factories(name: str, model: Any) -> list[Callable[[], Any]]:
    """Fresh Zennit composites (with fresh canonizers) for every preset, for screening inputs."""
    def factory(preset: Preset) -> Callable[[], Any]:
        return lambda: preset.zennit(canonizers(name, model))

    return [factory(p) for p in PRESETS]


def relevance_sum(rel: np.ndarray) -> np.ndarray:
    """Per-sample relevance sums (conservation is reported, not asserted)."""
    sums: np.ndarray = np.asarray(rel).reshape(len(rel), -1).sum(axis=1)
    return sums
