"""Explicit output relevance (``output_relevance=True``) and the choice of the explained input
(``input=``): seeds equal to the one-hot target, contrastive seeds (linearity), a dense
segmentation seed against Zennit, refusals, and models with a mask input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import MODELS
from lrp_onnx import (
    LRP,
    EpsilonPlusFlat,
    InvalidInput,
    UnsupportedModel,
    check_model,
)
from lrp_onnx.emit.contract import OUTPUT_RELEVANCE, TARGET, read_record, strip_compiled

SEED = MODELS / "seed_vgg.onnx"
CLASSES = 100


@pytest.fixture(scope="module")
def seed_analyzers() -> tuple[LRP, LRP]:
    """seed_vgg.onnx compiled with EpsilonPlusFlat: target mode, output_relevance mode."""
    return (LRP(SEED, EpsilonPlusFlat()),
            LRP(SEED, EpsilonPlusFlat(), output_relevance=True))


def _x(n: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.standard_normal((n, 3, 32, 32)), -3, 3).astype(np.float32)


def _onehot(targets: list[int]) -> np.ndarray:
    out = np.zeros((len(targets), CLASSES), dtype=np.float32)
    out[np.arange(len(targets)), targets] = 1.0
    return out


# -- (a) a one-hot seed is the target mode, exactly -------------------------------------------
def test_onehot_seed_reproduces_target_mode(seed_analyzers: tuple[LRP, LRP]) -> None:
    by_target, by_seed = seed_analyzers
    x, targets = _x(), [3, 17, 99]
    want = by_target.analyze(x, targets, device="cpu")
    got = by_seed.analyze(x, output_relevance=_onehot(targets), device="cpu")
    np.testing.assert_array_equal(got.relevance, want.relevance)
    np.testing.assert_array_equal(got.output, want.output)
    assert (got.target == -1).all()


def test_compiled_model_io_and_record(seed_analyzers: tuple[LRP, LRP]) -> None:
    by_target, by_seed = seed_analyzers
    inputs = {i.name: i for i in by_seed.model.graph.input}
    assert TARGET not in inputs and OUTPUT_RELEVANCE in inputs
    seed_in = inputs[OUTPUT_RELEVANCE].type.tensor_type
    assert seed_in.elem_type == TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in seed_in.shape.dim]
    assert dims == ["N", CLASSES]  # shaped like the explained output, dynamic batch kept
    assert read_record(by_seed.model)["seed"] == "output_relevance"
    assert "seed" not in read_record(by_target.model)  # the default keeps its exact record
    original = strip_compiled(by_seed.model)
    assert [i.name for i in original.graph.input] == ["input"]
    assert [o.name for o in original.graph.output] == ["logits"]


# -- (b) contrastive seeds: the backward pass is linear in the seed ---------------------------
def test_contrastive_seed_is_the_difference(seed_analyzers: tuple[LRP, LRP]) -> None:
    by_target, by_seed = seed_analyzers
    x = _x()
    a, b = [3, 17, 42], [8, 5, 0]
    r_a = by_target.analyze(x, a, device="cpu").relevance.astype(np.float64)
    r_b = by_target.analyze(x, b, device="cpu").relevance.astype(np.float64)
    got = by_seed.analyze(x, output_relevance=_onehot(a) - _onehot(b), device="cpu").relevance
    want = r_a - r_b
    scale = np.abs(want).reshape(len(x), -1).max(axis=1)
    err = np.abs(got - want).reshape(len(x), -1).max(axis=1)
    assert (err <= 1e-5 * scale).all(), err / scale
    # and a scaled seed scales the relevance
    twice = by_seed.analyze(x, output_relevance=2 * _onehot(a), device="cpu").relevance
    np.testing.assert_allclose(twice, 2 * r_a, rtol=1e-5, atol=1e-6 * np.abs(r_a).max())


def test_per_layer_outputs_follow_the_seed() -> None:
    analyzer = LRP(SEED, EpsilonPlusFlat(), output_relevance=True, per_layer=True)
    session = analyzer.session("cpu")
    x = _x(2)
    names = [o.name for o in session.get_outputs()]
    outs = dict(zip(names, session.run(None, {"input": x,
                                             OUTPUT_RELEVANCE: 3 * _onehot([1, 2])})))
    last = analyzer.per_layer_outputs[-1][0]  # what the last (dense) layer sends back
    assert np.isfinite(outs[last]).all() and np.abs(outs[last]).max() > 0


# -- refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"target": 3, "output_relevance": _onehot([3, 3, 3])}, "not target"),
    ({}, "output_relevance=<array shaped like the output> is required"),
    ({"output_relevance": np.zeros((3, CLASSES))}, "output_relevance must be float32, got float64"),
    ({"output_relevance": np.zeros((3, 7), np.float32)},
     r"output_relevance has shape [3, 7]; the model takes ['N', 100]"),
    ({"output_relevance": np.zeros((2, CLASSES), np.float32)}, "output_relevance has 2 samples"),
    ({"output_relevance": np.zeros((CLASSES,), np.float32)}, "output_relevance has shape [100]"),
])
def test_analyze_refuses_bad_seeds(seed_analyzers: tuple[LRP, LRP], kwargs: dict[str, Any],
                                   message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        seed_analyzers[1].analyze(_x(), device="cpu", **kwargs)
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1


def test_target_model_refuses_a_seed(seed_analyzers: tuple[LRP, LRP]) -> None:
    with pytest.raises(InvalidInput, match="takes a target, not output_relevance"):
        seed_analyzers[0].analyze(_x(), output_relevance=_onehot([1, 2, 3]), device="cpu")


def test_logit_seed_with_explicit_seed_is_refused() -> None:
    with pytest.raises(UnsupportedModel, match="normalize_output_relevance=False"):
        LRP(SEED, EpsilonPlusFlat(), output_relevance=True, normalize_output_relevance=False)


# -- check_model ------------------------------------------------------------------------------
def test_check_recompiles_a_seeded_file(tmp_path: Path, seed_analyzers: tuple[LRP, LRP]) -> None:
    path = tmp_path / "seeded.onnx"
    seed_analyzers[1].save(path)
    report = check_model(path)
    results = {r.name: r for r in report.results}
    assert report.ok and report.compiled_input, report.to_json()
    assert results["recorded_rules"].ok is True
    assert check_model(SEED, EpsilonPlusFlat(), output_relevance=True).ok
    with pytest.raises(UnsupportedModel, match="seed mode is read from the file"):
        check_model(path, output_relevance=True)


# -- a softmax head: the seed applies at the logits ------------------------------------------
def _dense_softmax_model() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "W"], ["logits"], name="fc"),
         helper.make_node("Softmax", ["logits"], ["probs"], name="sm", axis=-1)], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 4])], initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_softmax_head_seed_at_logits() -> None:
    model = _dense_softmax_model()
    by_seed = LRP(model, EpsilonPlusFlat(), output_relevance=True)
    by_target = LRP(model, EpsilonPlusFlat())
    assert read_record(by_seed.model)["logits"] == "logits"
    x = np.random.default_rng(2).standard_normal((2, 5)).astype(np.float32)
    seed = np.zeros((2, 4), np.float32)
    seed[[0, 1], [2, 0]] = 1.0
    got = by_seed.analyze(x, output_relevance=seed, device="cpu")
    want = by_target.analyze(x, [2, 0], device="cpu")
    np.testing.assert_array_equal(got.relevance, want.relevance)


# -- (c) a segmentation net: a region seed against Zennit -------------------------------------
@pytest.fixture(scope="module")
def segmentation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    torch = pytest.importorskip("torch")
    pytest.importorskip("zennit")
    from lrp_onnx.testing import oracle

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 1)).eval()
    path = tmp_path_factory.mktemp("seg") / "seg.onnx"
    oracle.export(net, path, torch.zeros(1, 3, 12, 12))
    return net, path


def _region_seed(n: int, k: int) -> np.ndarray:
    seed = np.zeros((n, 4, 12, 12), np.float32)
    seed[:, k, 3:8, 2:9] = 1.0  # ones on class k inside a box
    return seed


@pytest.mark.parametrize("preset", ["EpsilonPlusFlat", "ZeroRule"])
def test_segmentation_region_seed_matches_zennit(segmentation: tuple[Any, Path],
                                                 preset: str) -> None:
    import torch
    import zennit.composites as zc
    from zennit.attribution import Gradient
    from zennit.rules import Epsilon

    from lrp_onnx.testing import oracle

    net, path = segmentation
    if preset == "EpsilonPlusFlat":
        ours, theirs = EpsilonPlusFlat(), zc.EpsilonPlusFlat()
    else:
        ours, theirs = None, zc.LayerMapComposite([(torch.nn.Conv2d, Epsilon(epsilon=1e-6))])
    analyzer = LRP(path, ours, output_relevance=True)
    x = np.clip(np.random.default_rng(3).standard_normal((3, 3, 12, 12)), -3, 3
                ).astype(np.float32)
    seed = _region_seed(len(x), k=2)
    got = analyzer.analyze(x, output_relevance=seed, device="cpu")
    assert got.output.shape == (3, 4, 12, 12)
    with Gradient(model=net, composite=theirs) as attributor:
        out, ref = attributor(torch.from_numpy(x), attr_output=torch.from_numpy(seed))
    np.testing.assert_allclose(got.output, out.detach().numpy(), rtol=1e-4, atol=1e-5)
    oracle.assert_agreement(got.relevance, ref.detach().numpy(), f"segmentation {preset}")


# -- (e) several float inputs: the explained one is chosen -----------------------------------
def _masked_model(mask_const: np.ndarray | None = None) -> onnx.ModelProto:
    """``relu(x * relu(mask)) @ W1 @ W2``; with ``mask_const`` the mask is an initializer."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 5)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((5, 3)).astype(np.float32), "W2")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])]
    if mask_const is None:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 6]))
    else:
        inits.append(numpy_helper.from_array(mask_const, "mask"))
    graph = helper.make_graph(
        [helper.make_node("Relu", ["mask"], ["m"], name="mrelu"),
         helper.make_node("Mul", ["x", "m"], ["xm"], name="masking"),
         helper.make_node("MatMul", ["xm", "W1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["a"], name="relu"),
         helper.make_node("MatMul", ["a", "W2"], ["logits"], name="fc2")], "g",
        inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_several_float_inputs_need_input() -> None:
    with pytest.raises(UnsupportedModel) as info:
        LRP(_masked_model())
    text = str(info.value)
    assert "'x', 'mask'" in text and "input=NAME" in text and len(text.splitlines()) == 1
    with pytest.raises(UnsupportedModel, match="'nope' is no graph input"):
        LRP(_masked_model(), input="nope")


def test_chosen_input_matches_the_mask_as_a_constant(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6)).astype(np.float32)
    mask = (rng.random((1, 6)) > 0.4).astype(np.float32)
    analyzer = LRP(_masked_model(), EpsilonPlusFlat(), input="x")
    assert [i.name for i in analyzer.model.graph.input] == ["x", "mask", TARGET]
    assert read_record(analyzer.model)["explained_input"] == "x"
    with pytest.raises(InvalidInput, match="the model also takes 'mask'"):
        analyzer.analyze(x, device="cpu")
    got = analyzer.analyze(x, [1, 2], inputs={"mask": np.repeat(mask, 2, axis=0)},
                           device="cpu")
    fixed = LRP(_masked_model(mask[0]), EpsilonPlusFlat()).analyze(x, [1, 2], device="cpu")
    np.testing.assert_allclose(got.relevance, fixed.relevance, rtol=1e-6, atol=1e-7)
    assert (got.relevance[:, mask[0] == 0] == 0).all()  # masked features get no relevance
    # explaining the mask instead: relevance reaches only it
    by_mask = LRP(_masked_model(), EpsilonPlusFlat(), input="mask")
    rel = by_mask.analyze(np.repeat(mask, 2, axis=0), [1, 2], inputs={"x": x},
                          device="cpu").relevance
    assert rel.shape == (2, 6) and np.isfinite(rel).all()
    # check_model: the original with input=, the compiled file from its record
    assert check_model(_masked_model(), EpsilonPlusFlat(), input="x").ok
    path = tmp_path / "masked.lrp.onnx"
    analyzer.save(path)
    report = check_model(path)
    assert report.ok, report.to_json()


def test_output_relevance_model_has_cuda_kernels(seed_analyzers: tuple[LRP, LRP]) -> None:
    """The explicit seed adds no node without a CUDA kernel (tests/test_cuda_ep.py's check)."""
    from cuda_kernels import cuda_gaps

    assert cuda_gaps(seed_analyzers[1].model) == []
