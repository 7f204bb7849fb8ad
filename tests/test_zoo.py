"""The torchvision zoo against Zennit: both exporters, EpsilonPlusFlat and EpsilonGammaBox(-3, 3).

Per model: random weights (seeded), random BatchNorm statistics, BN epsilon 1e-30 (zennit
0.5.1's merge artifact, see ``lrp_onnx.zoo.build``), Zennit with the canonizers of
``lrp_onnx.zoo.canonizers`` (which make its residual sums and heads well-defined). EpsilonGammaBox
is compared with Zennit's generalized gamma (``GeneralizedGammaRule``; our preset's own
``GammaRule`` is RelevancePropagation.jl's and differs on residual networks, see
tests/test_presets_zennit.py), and squeeze-excitation gates with ``GradientRule`` (Zennit's
plain gradient through ``scale * x``). Four 224x224 inputs per model, screened as in
tests/test_zennit.py (``oracle.well_conditioned_inputs``: no hidden dense unit in (0, 1e-4], a
target logit of magnitude >= 1e-2, and float64 Zennit relevances (both presets) that move by at
most 1e-5 under 1e-6 relative perturbations). Acceptance per sample: relative L2 <= 1e-4 and
correlation >= 0.9999; the batch of 4 and its first sample alone (batch 1) are both checked, and
relevance sums (conservation) are printed with ``-s``.

Not here yet (the model-coverage issue stays open on them), all float32 conditioning of the
random-init models, not a difference in the math (measured 2026-11-26 with this harness):

* vgg16_bn and resnet50: every EpsilonPlusFlat sample passes (max 5.2e-5 / 6.6e-5), but one of
  four screened samples misses EpsilonGammaBox by a hair (1.10e-4 / 1.19e-4);
* mobilenet_v3_small and efficientnet_b0: the screen finds no sample in 64 draws (the
  float64 reference moves by more than 1e-5 under 1e-6 perturbations); unscreened inputs agree
  to 2.5e-6 (EpsilonPlusFlat) and 1.2e-4 (EpsilonGammaBox);
* densenet121: its transition AveragePool averages signed convolution outputs whose mean can be a
  few eps from zero (Zennit float32 vs float64 differ by 4.5e-2 on a random input);
* googlenet: its random-init relevance is tiny (Zennit float32 vs float64 2.6e-4 to 1.2e-1).
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("zennit")

import lrp_onnx as L  # noqa: E402
from lrp_onnx import oracle, zoo  # noqa: E402

SHAPE = (3, 224, 224)
MODELS = ["vgg16", "resnet18", "mobilenet_v2", "regnet_x_400mf"]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_matches_zennit(name: str, tmp_path: Path) -> None:
    model = zoo.build(name)
    x = oracle.well_conditioned_inputs(model, SHAPE, 4, seed=0,
                                       composites=zoo.zennit_factories(name, model))
    _, target = oracle.torch_targets(model, x)
    refs = {p.name: oracle.zennit_relevance(model, x, p.zennit(zoo.canonizers(name, model)),
                                            target, 1000)[1] for p in zoo.PRESETS}
    for dynamo in (False, True):
        exporter = "dynamo" if dynamo else "legacy"
        path = oracle.export(model, tmp_path / f"{name}_{exporter}.onnx",
                             torch.zeros(1, *SHAPE), dynamo=dynamo)
        for preset in zoo.PRESETS:
            analyzer = L.LRP(path, preset.ours(name))
            expl = analyzer.analyze(x, target, device="cpu")
            label = f"{name} {exporter} {preset.name}"
            oracle.assert_agreement(expl.relevance, refs[preset.name], label + " batch 4")
            one = analyzer.analyze(x[:1], target[:1], device="cpu")
            oracle.assert_agreement(one.relevance, refs[preset.name][:1], label + " batch 1")
            print(f"CONSERVATION {label}: ours {zoo.relevance_sum(expl.relevance)}, "
                  f"zennit {zoo.relevance_sum(refs[preset.name])}")
