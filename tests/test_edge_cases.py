"""Malformed models (one-line typed errors, from the API and the CLI, no output file) and
numerical edge cases (no NaN/Inf in relevance; NaN input gives NaN for that sample only)."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import MODELS
from lrp_onnx import LRP, Composite, EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat, ZeroRule
from lrp_onnx.cli.main import main
from lrp_onnx.errors import LRPError, ModelLoadError, UnsupportedModel
from lrp_onnx.testing.references import Net

SEED = MODELS / "seed_vgg.onnx"


# -- malformed models -------------------------------------------------------------------------
def _dangling(m: onnx.ModelProto) -> None:
    m.graph.node[1].input[0] = "nowhere"


def _cycle(m: onnx.ModelProto) -> None:
    m.graph.node[0].input[0] = m.graph.node[1].output[0]


def _missing_initializer(m: onnx.ModelProto) -> None:
    name = m.graph.node[0].input[1]
    keep = [t for t in m.graph.initializer if t.name != name]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)


def _unknown_domain(m: onnx.ModelProto) -> None:
    m.graph.node[3].domain = "com.example"
    m.opset_import.append(helper.make_opsetid("com.example", 1))


def _unknown_op(m: onnx.ModelProto) -> None:
    m.graph.node[3].op_type = "FancyOp"


def _input_type(elem: int) -> Callable[[onnx.ModelProto], None]:
    def edit(m: onnx.ModelProto) -> None:
        m.graph.input[0].type.tensor_type.elem_type = elem
    return edit


def _no_batch(m: onnx.ModelProto) -> None:
    del m.graph.input[0].type.tensor_type.shape.dim[0]


def _dynamic_spatial(m: onnx.ModelProto) -> None:
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"


def test_dynamic_spatial_dims_compile() -> None:
    """Dynamic H/W are no longer refused (issue 14 part 2): the seed model (whose Flatten ->
    Gemm head fixes its size) explains at its size as the static model does."""
    model = onnx.load(SEED)
    _dynamic_spatial(model)
    dims = [d.dim_value for d in onnx.load(SEED).graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal((2, *dims[1:])).astype(np.float32)
    got = LRP(model, EpsilonPlusFlat()).analyze(x, np.array([0, 1]), device="cpu")
    want = LRP(SEED, EpsilonPlusFlat()).analyze(x, np.array([0, 1]), device="cpu")
    np.testing.assert_array_equal(got.output, want.output)
    np.testing.assert_allclose(got.relevance, want.relevance, rtol=1e-5,
                               atol=1e-6 * float(np.abs(want.relevance).max()))


def _empty_graph(m: onnx.ModelProto) -> None:
    del m.graph.node[:]


def _no_outputs(m: onnx.ModelProto) -> None:
    del m.graph.output[:]


def _no_inputs(m: onnx.ModelProto) -> None:
    del m.graph.input[:]


def _input_dim(k: int, value: int) -> Callable[[onnx.ModelProto], None]:
    def edit(m: onnx.ModelProto) -> None:
        m.graph.input[0].type.tensor_type.shape.dim[k].dim_value = value
    return edit


def _group_zero(m: onnx.ModelProto) -> None:
    next(a for a in m.graph.node[0].attribute if a.name == "group").i = 0


MALFORMED: dict[str, tuple[Callable[[onnx.ModelProto], None], type[LRPError], str]] = {
    "dangling": (_dangling, ModelLoadError,
                 r"node '/0/0.1/Relu' \(Relu\) reads 'nowhere', which no node"),
    "cycle": (_cycle, ModelLoadError, r"the graph has a cycle through '/0/0.0/Conv' \(Conv\)"),
    "missing_initializer": (_missing_initializer, ModelLoadError,
                            r"reads '0.0.weight', which no node, graph input or initializer"),
    "unknown_domain": (_unknown_domain, ModelLoadError,
                       r"outside the ONNX standard domain.*from domain 'com.example'"),
    "unknown_op": (_unknown_op, ModelLoadError, r"No Op registered for FancyOp"),
    "int64_input": (_input_type(TensorProto.INT64), UnsupportedModel,
                    r"no floating-point model input"),
    "bool_input": (_input_type(TensorProto.BOOL), UnsupportedModel,
                   r"no floating-point model input"),
    "no_batch_dim": (_no_batch, UnsupportedModel,
                     r"node '/0/0.0/Conv' \(Conv\) has a weight of rank 4 "
                     r"\(shape \[8, 3, 3, 3\]\); Conv needs rank 3"),
    "empty_graph": (_empty_graph, ModelLoadError, r"the graph has no nodes"),
    "no_outputs": (_no_outputs, ModelLoadError, r"the graph has no outputs"),
    "no_inputs": (_no_inputs, ModelLoadError, r"the graph has no inputs"),
    "zero_dim": (_input_dim(1, 0), ModelLoadError, r"input 'input' has a dimension of size 0"),
    "huge_dim": (_input_dim(2, 2**40), ModelLoadError, r"elements per sample \(more than"),
    "group_zero": (_group_zero, ModelLoadError, r"node '/0/0.0/Conv' \(Conv\) has group=0"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_model_is_a_typed_one_line_error(case: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    edit, error, message = MALFORMED[case]
    model = onnx.load(SEED)
    edit(model)
    path = tmp_path / f"{case}.onnx"
    onnx.save(model, path)
    before = path.read_bytes()
    with pytest.raises(error, match=message) as info:
        LRP(path, EpsilonPlusFlat())
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"{path}: ")
    out = tmp_path / "out.onnx"
    assert main(["convert", str(path), str(out), "--composite", "EpsilonPlusFlat"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lrp-onnx: error: ") and str(path) in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert path.read_bytes() == before  # the input is never modified


def test_malformed_model_through_the_installed_cli_has_no_traceback(tmp_path: Path) -> None:
    model = onnx.load(SEED)
    _cycle(model)
    path = tmp_path / "cycle.onnx"
    onnx.save(model, path)
    done = subprocess.run([sys.executable, "-m", "lrp_onnx.cli", "check", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "cycle through" in done.stderr


def test_onnx_runtime_failure_is_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model ONNX Runtime cannot run (simulated: the session's run raises as ORT does)."""
    from lrp_onnx import RuntimeFailure

    analyzer = LRP(SEED, EpsilonPlusFlat())
    session = analyzer.session("cpu")

    class Broken:
        def __getattr__(self, name: str) -> Any:
            return getattr(session, name)

        def run_with_iobinding(self, *args: Any) -> None:
            raise RuntimeError("Error in execution: Non-zero status code\nsecond line")

    monkeypatch.setattr(analyzer, "session", lambda device="auto": Broken())
    x = np.load(MODELS / "seed_vgg_input.npy")[None]
    with pytest.raises(RuntimeFailure, match=r"seed_vgg.onnx: ONNX Runtime failed to run") as info:
        analyzer.analyze(x, device="cpu")
    assert "\n" not in str(info.value)


def test_out_of_order_nodes_are_sorted() -> None:
    model = onnx.load(SEED)
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    x = np.load(MODELS / "seed_vgg_input.npy")[None]
    got = LRP(model, EpsilonPlusFlat()).analyze(x, device="cpu").relevance
    want = LRP(SEED, EpsilonPlusFlat()).analyze(x, device="cpu").relevance
    np.testing.assert_array_equal(got, want)
    assert list(model.graph.node) == nodes  # the caller's model is not touched


# -- numerical edge cases ---------------------------------------------------------------------
COMPOSITES: dict[str, Any] = {
    "ZeroRule": None, "EpsilonPlusFlat": EpsilonPlusFlat(),
    "EpsilonGammaBox": EpsilonGammaBox(-3.0, 3.0), "EpsilonAlpha2Beta1": EpsilonAlpha2Beta1(),
}


def _edge_inputs(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"all_zero": np.zeros_like(x), "constant": np.full_like(x, 0.7),
            "negative_constant": np.full_like(x, -2.0), "large": x * 1e6, "huge": x * 1e30,
            "tiny": x * 1e-30, "float32_max": np.full_like(x, 3e38)}


@pytest.mark.parametrize("composite", sorted(COMPOSITES))
def test_edge_inputs_give_finite_relevance(composite: str) -> None:
    analyzer = LRP(SEED, COMPOSITES[composite])
    x = np.load(MODELS / "seed_vgg_input.npy")[None]
    for name, value in _edge_inputs(x).items():
        expl = analyzer.analyze(value.astype(np.float32), device="cpu")
        assert np.isfinite(expl.relevance).all(), f"{composite} {name}"


def test_layer_with_all_zero_outputs_gives_finite_relevance(rng: np.random.Generator) -> None:
    """A Conv whose weights are all zero: every later pre-activation is 0 (stab(0) = eps)."""
    net = Net(rng, (3, 6, 6))
    w = net.const("dead/W", np.zeros((4, 3, 3, 3)))
    y = net.node("Relu", [net.node("Conv", [net.x, w], "dead/conv", pads=[1, 1, 1, 1])],
                 "dead/relu")
    net.head(y, classes=3, bias=None)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    for composite in (Composite(ZeroRule()), EpsilonPlusFlat(), EpsilonGammaBox(-3.0, 3.0)):
        rel = LRP(net.model(), composite).analyze(x, device="cpu").relevance
        assert np.isfinite(rel).all() and not rel.any(), composite


def test_nan_input_gives_nan_for_that_sample_only() -> None:
    """Documented (docs/api.md): a NaN anywhere in a sample makes that sample's output and
    relevance NaN (convolutions spread it); other samples of the batch are unaffected."""
    x = np.load(MODELS / "seed_vgg_input.npy")[None]
    batch = np.concatenate([x, x])
    batch[0, 0, 0, 0] = np.nan
    analyzer = LRP(SEED, EpsilonPlusFlat())
    expl = analyzer.analyze(batch, [5, 5], device="cpu")
    clean = analyzer.analyze(x, [5], device="cpu")
    assert np.isnan(expl.relevance[0]).all() and np.isnan(expl.output[0]).all()
    np.testing.assert_array_equal(expl.relevance[1], clean.relevance[0])


def test_explain_refuses_nan_relevance_without_writing(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    compiled = tmp_path / "seed.lrp.onnx"
    LRP(SEED, EpsilonPlusFlat()).save(compiled)
    x = np.load(MODELS / "seed_vgg_input.npy")
    x[0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", x)
    out = tmp_path / "out"
    assert main(["explain", str(compiled), str(tmp_path / "nan.npy"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nan.npy" in err
    assert not list(out.glob("nan*")) if out.exists() else True


def test_caller_model_is_deep_equal_after_failure() -> None:
    model = onnx.load(SEED)
    _cycle(model)
    snapshot = copy.deepcopy(model)
    with pytest.raises(ModelLoadError):
        LRP(model, EpsilonPlusFlat())
    assert model == snapshot


@pytest.mark.parametrize("options", [["--composite", "EpsilonPlusFlat"],
                                     ["--composite", "EpsilonGammaBox(low=-3.0, high=3.0)",
                                      "--per-layer"]])
def test_output_file_is_byte_identical_across_processes(tmp_path: Path,
                                                        options: list[str]) -> None:
    """Same model and options, two processes with different hash seeds: the same bytes."""
    import os

    files = []
    for k, hash_seed in enumerate(("1", "12345")):
        out = tmp_path / f"out{k}.onnx"
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        done = subprocess.run([sys.executable, "-m", "lrp_onnx.cli", "convert", str(SEED),
                               str(out), *options], capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        files.append(out.read_bytes())
    assert files[0] == files[1]


# -- crashes a second mutation fuzzer found (stacked mutations, new kinds), now clean errors --
def _tiny() -> onnx.ModelProto:
    """x[N,1,5,5] -> Conv(2,1,3,3)+b -> Relu -> Flatten -> Gemm(3) -> logits."""
    rng = np.random.default_rng(0)
    from onnx import numpy_helper

    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("W", (2, 1, 3, 3)), ("b", (2,)), ("HW", (3, 18)), ("Hb", (3,)))]
    nodes = [helper.make_node("Conv", ["x", "W", "b"], ["c"], name="conv", kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "HW", "Hb"], ["logits"], name="head", transB=1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 5, 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _nul_location(m: onnx.ModelProto) -> None:
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", "a\x00b"


def _scalar_gemm_weight(m: onnx.ModelProto) -> None:
    del m.graph.initializer[2]
    m.graph.node.insert(0, helper.make_node("Constant", [], ["HW"], value_float=1.0))


def _vector_conv_weight(m: onnx.ModelProto) -> None:
    del m.graph.initializer[0]
    m.graph.node.insert(0, helper.make_node("Constant", [], ["W"], value_floats=[1.0, 2.0]))


def _local_function(m: onnx.ModelProto) -> None:
    m.functions.append(helper.make_function("custom", "F", ["a"], ["b"],
                                            [helper.make_node("Relu", ["a"], ["b"])],
                                            [helper.make_opsetid("", 17)]))
    m.opset_import.append(helper.make_opsetid("custom", 1))


def _raw_too_large(index: int) -> Callable[[onnx.ModelProto], None]:
    def edit(m: onnx.ModelProto) -> None:
        m.graph.initializer[index].data_type = TensorProto.FLOAT16  # float32 bytes kept
    return edit


def _float8_bias(m: onnx.ModelProto) -> None:
    m.graph.initializer[1].data_type = TensorProto.FLOAT8E4M3FN  # float32 bytes kept


def _conv_channels(m: onnx.ModelProto) -> None:
    """The Conv's weight takes 2 input channels, the input has 1 (ONNX shape inference does not
    notice, and ONNX Runtime's CPU Conv runs it)."""
    from onnx import numpy_helper

    w = np.ones((2, 2, 3, 3), np.float32)
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))


def _output_twice(m: onnx.ModelProto) -> None:
    m.graph.output.append(m.graph.output[0])
    m.graph.output[0].type.tensor_type.shape.dim[-1].dim_value = 1000


TINY_MALFORMED = {
    "nul_in_external_location": (_nul_location, r"absolute or empty location 'a\\x00b'"),
    "scalar_gemm_weight": (_scalar_gemm_weight, r"'head' \(Gemm\) has a weight of rank 0"),
    "vector_conv_weight": (_vector_conv_weight, r"'conv' \(Conv\) has a weight of rank 1"),
    "local_function": (_local_function, r"model-local functions are not supported"),
    "bias_raw_too_large": (_raw_too_large(1), r"initializer 'b' holds 8 bytes"),
    "weight_raw_too_large": (_raw_too_large(2), r"initializer 'HW' holds 216 bytes"),
    "output_listed_twice": (_output_twice, r"graph output 'logits' is listed twice"),
    "float8_bias_raw_mismatch": (_float8_bias, r"initializer 'b' holds 8 bytes, its shape \[2\] "
                                               r"needs 2"),
    "conv_channel_mismatch": (_conv_channels, r"node 'conv' \(Conv, opset 17\) reads 1 "
                                              r"channels but its weight 'W' \[2, 2, 3, 3\]"),
}


@pytest.mark.parametrize("case", sorted(TINY_MALFORMED))
def test_fuzzer_found_models_are_clean_errors(case: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    edit, message = TINY_MALFORMED[case]
    model = _tiny()
    assert LRP(model, EpsilonPlusFlat()).analyze(np.ones((2, 1, 5, 5), np.float32),
                                                  device="cpu").relevance.shape == (2, 1, 5, 5)
    edit(model)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(LRPError, match=message) as info:
        LRP(path, EpsilonPlusFlat())
    assert "\n" not in str(info.value) and str(info.value).startswith(str(path))
    out = tmp_path / "out.onnx"
    assert main(["convert", str(path), str(out)]) == 1
    assert not out.exists() and capsys.readouterr().err.count("\n") == 1


def test_cli_internal_error_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A bug of ours (simulated) still ends in one line and exit status 3, no output file."""
    from lrp_onnx import api as analyzer

    def bug(*args: Any, **kwargs: Any) -> None:
        raise ZeroDivisionError("simulated\nbug")

    monkeypatch.setattr(analyzer, "compile_layers", bug)
    out = tmp_path / "out.onnx"
    assert main(["convert", str(SEED), str(out)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: ZeroDivisionError" in err
    assert not out.exists()
