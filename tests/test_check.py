"""Per-layer relevance outputs, ``opset=`` conversion and :func:`lrp_onnx.check.check_model`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from conftest import MODELS, ort_session
from lrp_onnx import LRP, Composite, EpsilonPlusFlat, ZeroRule, check
from lrp_onnx.errors import CanonizerError, UnsupportedModel
from lrp_onnx.testing.references import Net, ref_epsilon

SEED_VGG = MODELS / "seed_vgg.onnx"


def _bias_free_net(rng: np.random.Generator, nan: bool = False) -> Net:
    """Bias-free Conv+ReLU, Conv+ReLU, MaxPool, Flatten, Gemm: every layer conserves."""
    net = Net(rng, (3, 8, 8))
    w1 = net.param("first/W", (6, 3, 3, 3), scale=2 / np.sqrt(27))
    if nan:
        net.inits[w1][0, 0, 0, 0] = np.nan
    y = net.node("Conv", [net.x, w1], "first/conv", pads=[1, 1, 1, 1])
    y = net.node("Relu", [y], "first/relu")
    w2 = net.param("mid/W", (6, 6, 3, 3), scale=2 / np.sqrt(54))
    y = net.node("Conv", [y, w2], "mid/conv", pads=[1, 1, 1, 1], strides=[2, 2])
    y = net.node("Relu", [y], "mid/relu")
    y = net.node("MaxPool", [y], "mid/pool", kernel_shape=[2, 2], strides=[2, 2])
    net.head(y, classes=10, bias=None, scale=2.0)
    return net


def _outputs(model: onnx.ModelProto, x: np.ndarray, target: np.ndarray,
             input_name: str = "x") -> dict[str, np.ndarray]:
    session = ort_session(model)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {input_name: x, "target": target})))


# -- per-layer outputs ------------------------------------------------------------------------
def test_per_layer_outputs_are_each_layers_input_relevance(rng: np.random.Generator) -> None:
    net = _bias_free_net(rng)
    analyzer = LRP(net.model(), Composite(ZeroRule()), per_layer=True)
    names = [name for name, _, _ in analyzer.per_layer_outputs]
    assert [i for _, i, _ in analyzer.per_layer_outputs] == \
        list(range(1, len(analyzer.layers) + 1))
    assert names == [f"relevance_in_{i}" for i in range(1, len(analyzer.layers) + 1)]
    x = rng.uniform(0.0, 4.0, size=(3, 3, 8, 8)).astype(np.float32)
    target = np.array([-1, 2, 5], dtype=np.int64)
    out = _outputs(analyzer.model, x, target)
    # The first layer's input relevance is the model's relevance.
    np.testing.assert_array_equal(out["relevance_in_1"], out["relevance"])
    # The head (last layer): the epsilon rule's matrix form on the flattened pooled features.
    W = net.inits["head/W"]
    feats = net.run64(x.astype(np.float64), output="head/flatten")
    logits = feats @ W.T
    chosen = np.where(target < 0, logits.argmax(axis=1), target)
    seed = np.eye(10)[chosen]
    expected = ref_epsilon(W, np.zeros(10), feats, seed, eps=1e-6)
    head = analyzer.per_layer_outputs[-1][0]
    np.testing.assert_allclose(out[head].reshape(3, -1), expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())
    # Bias-free ZeroRule: every layer passes on one unit of relevance per sample.
    for name in names:
        np.testing.assert_allclose(out[name].reshape(3, -1).sum(axis=1), 1.0, rtol=1e-4)


def test_per_layer_off_adds_no_outputs() -> None:
    analyzer = LRP(SEED_VGG, EpsilonPlusFlat())
    assert analyzer.per_layer_outputs == []
    assert [o.name for o in analyzer.model.graph.output] == ["logits", "relevance"]


def test_per_layer_multi_input_layers_get_one_output_per_input(rng: np.random.Generator) -> None:
    net = Net(rng, (4,))
    w = net.param("pre/W", (4, 4))
    a = net.node("Relu", [net.node("Gemm", [net.x, w], "pre/gemm", transB=1)], "pre/relu")
    y = net.node("Add", [a, net.x], "lut/add")
    net.head(y, classes=3)
    analyzer = LRP(net.model(), None, per_layer=True)
    add = next(la for la in analyzer.layers if la.kind == "Add")
    names = {n for n, i, _ in analyzer.per_layer_outputs if i == add.index + 1}
    assert names == {f"relevance_in_{add.index + 1}_1", f"relevance_in_{add.index + 1}_2"}


# -- opset ------------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [16, 18, 21])
def test_opset_conversion_keeps_the_relevance(opset: int) -> None:
    x = np.load(MODELS / "seed_vgg_input.npy")[None]
    ref = LRP(SEED_VGG, EpsilonPlusFlat()).analyze(x, device="cpu").relevance
    analyzer = LRP(SEED_VGG, EpsilonPlusFlat(), opset=opset)
    versions = {imp.domain: imp.version for imp in analyzer.model.opset_import}
    assert versions[""] == opset
    np.testing.assert_allclose(analyzer.analyze(x, device="cpu").relevance, ref, rtol=1e-6,
                               atol=1e-7 * np.abs(ref).max())


@pytest.mark.parametrize("opset", [13, 15, 999])
def test_opset_outside_the_range_is_refused(opset: int) -> None:
    with pytest.raises(CanonizerError, match=rf"seed_vgg.onnx: opset {opset} is outside"):
        LRP(SEED_VGG, EpsilonPlusFlat(), opset=opset)


# -- check ------------------------------------------------------------------------------------
def _by_name(report: check.CheckReport) -> dict[str, check.CheckResult]:
    return {r.name: r for r in report.results}


def test_check_bias_free_model_conserves_everywhere(rng: np.random.Generator) -> None:
    report = check.check_model(_bias_free_net(rng).model(), Composite(ZeroRule()))
    results = _by_name(report)
    assert report.ok, report.results
    assert [r.ok for r in report.results] == [True] * 5, report.results
    assert "5 layers checked" in results["conservation_layers"].detail
    json.dumps(report.as_dict())  # JSON-ready


def test_check_seed_model_skips_what_biases_absorb() -> None:
    report = check.check_model(SEED_VGG, EpsilonPlusFlat())
    results = _by_name(report)
    assert report.ok
    assert results["conservation_layers"].ok is True  # pooling, flatten, dropout, Flat conv
    assert results["conservation_total"].ok is None  # biased layers absorb relevance
    assert report.provider == "CPUExecutionProvider"
    assert report.as_dict()["ok"] is True


def test_check_reports_non_finite_relevance(rng: np.random.Generator) -> None:
    report = check.check_model(_bias_free_net(rng, nan=True).model(), None)
    results = _by_name(report)
    assert not report.ok
    assert results["relevance_finite"].ok is False
    assert "relevance" in results["relevance_finite"].detail


def test_check_reports_a_layer_that_loses_relevance(rng: np.random.Generator,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A conserving layer that loses relevance (simulated: its input relevance halved)."""
    real = check._conservation

    def halve(analyzer: LRP, outs: dict[str, np.ndarray], n: int) -> Any:
        outs = dict(outs, relevance_in_2=outs["relevance_in_2"] * 0.5)
        return real(analyzer, outs, n)

    monkeypatch.setattr(check, "_conservation", halve)
    report = check.check_model(_bias_free_net(rng).model(), None)
    result = _by_name(report)["conservation_layers"]
    assert result.ok is False and "layer 2" in result.detail and not report.ok


def test_check_reports_changed_outputs(rng: np.random.Generator,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler that altered the forward pass (simulated: the head weight scaled)."""

    class Broken(LRP):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            for t in self.model.graph.initializer:
                if t.name == "head/W":
                    arr = onnx.numpy_helper.to_array(t) * 1.5
                    t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))

    monkeypatch.setattr(check, "LRP", Broken)
    report = check.check_model(_bias_free_net(rng).model(), None)
    result = _by_name(report)["outputs_unchanged"]
    assert result.ok is False and "logits" in result.detail


def test_check_compiled_file_reads_its_rules(tmp_path: Path) -> None:
    path = tmp_path / "seed.lrp.onnx"
    LRP(SEED_VGG, EpsilonPlusFlat()).save(path)
    report = check.check_model(path)
    results = _by_name(report)
    assert report.ok and report.compiled_input
    assert results["recorded_rules"].ok is True
    assert "10 recorded rules" in results["recorded_rules"].detail


def test_check_compiled_file_with_edited_rules_fails(tmp_path: Path) -> None:
    model = LRP(SEED_VGG, EpsilonPlusFlat()).model
    prop = next(p for p in model.metadata_props if p.key == "lrp_onnx")
    record = json.loads(prop.value)
    record["layers"][1]["rule"] = "EpsilonRule(epsilon=0.5)"  # not what the graph computes
    prop.value = json.dumps(record)
    report = check.check_model(model)
    assert _by_name(report)["recorded_rules"].ok is False and not report.ok


def test_check_compiled_file_refuses_rules(tmp_path: Path) -> None:
    model = LRP(SEED_VGG, EpsilonPlusFlat()).model
    with pytest.raises(UnsupportedModel, match="already compiled"):
        check.check_model(model, EpsilonPlusFlat())


def test_strip_compiled_gives_back_the_forward_model() -> None:
    compiled = LRP(SEED_VGG, EpsilonPlusFlat(), per_layer=True).model
    stripped = check.strip_compiled(compiled)
    assert [i.name for i in stripped.graph.input] == ["input"]
    assert [o.name for o in stripped.graph.output] == ["logits"]
    assert not [n for n in stripped.graph.node if n.name.startswith("lrp/")]
    original = onnx.load(SEED_VGG)
    assert len(stripped.graph.node) <= len(original.graph.node)
    x = np.load(MODELS / "seed_vgg_input.npy")[None]
    want = ort_session(original).run(["logits"], {"input": x})[0]
    got = ort_session(stripped).run(["logits"], {"input": x})[0]
    np.testing.assert_array_equal(got, want)
    assert len(compiled.graph.output) > 2  # the input was not modified


# -- inputs a compiled model refuses ------------------------------------------------------------
@pytest.mark.parametrize("bad, message", [
    (lambda x: x.astype(np.float64), r"input 'input' must be float32, got float64"),
    (lambda x: x[:, :2], r"input 'input' has shape \[1, 2, 32, 32\]; the model takes "
                         r"\['N', 3, 32, 32\]"),
    (lambda x: x[0], r"has shape \[3, 32, 32\]"),
])
def test_analyze_refuses_inputs_that_do_not_fit(bad: Any, message: str) -> None:
    from lrp_onnx import InvalidInput

    x = np.load(MODELS / "seed_vgg_input.npy")[None]
    with pytest.raises(InvalidInput, match=message):
        LRP(SEED_VGG, EpsilonPlusFlat()).analyze(bad(x), device="cpu")
