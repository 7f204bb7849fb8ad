"""Model files from the wild (issue 19, items 1, 3 and the scikit-learn part of 6): old opsets
and IR versions upgraded with ``onnx.version_converter``, nodes of other domains (``ai.onnx.ml``,
``com.microsoft``) kept off the relevance path, a skl2onnx MLPClassifier against Zennit.

References: an old-opset CNN is compared with the same network written at opset 17 (same
weights, the ops spelt as opset 17 spells them: the relevance must be equal) and a torch export
down-converted to opset 9 / IR 3 with Zennit on the torch model (the tolerance of
:func:`lrp_onnx.testing.oracle.assert_agreement`); the skl2onnx classifier with Zennit on a torch
``nn.Sequential`` carrying its ``coefs_``/``intercepts_``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrp_onnx as L
from lrp_onnx.check import check_model
from lrp_onnx.cli.main import main
from lrp_onnx.emit.contract import read_record
from lrp_onnx.errors import CanonizerError, ModelLoadError, UnsupportedModel, UnsupportedOp

SHAPE = (3, 16, 16)
CLASSES = 10


# -- old opsets: a model-zoo-style CNN written with onnx.helper --------------------------------
def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    w = {
        "w1": rng.standard_normal((8, 3, 3, 3)) * 0.4, "b1": rng.standard_normal(8) * 0.1,
        "gamma": 1 + rng.standard_normal(8) * 0.1, "beta": rng.standard_normal(8) * 0.1,
        "mean": rng.standard_normal(8) * 0.1, "var": 1 + rng.random(8) * 0.5,
        "w2": rng.standard_normal((16, 8, 3, 3)) * 0.2, "b2": rng.standard_normal(16) * 0.1,
        "fc": rng.standard_normal((CLASSES, 16)) * 0.5, "fcb": rng.standard_normal(CLASSES) * 0.1,
    }
    return {k: v.astype(np.float32) for k, v in w.items()}


def zoo_cnn(opset: int, ir: int) -> onnx.ModelProto:
    """Conv-BN-Relu-MaxPool-Pad-Conv-Clip(0, 6)-GAP-Squeeze-Dropout-Gemm-Softmax, each op spelt
    as ``opset`` spells it (``Pad``/``Clip`` attributes below 11, ``Squeeze`` axes below 13,
    ``Dropout`` ratio below 12); IR < 4 lists every initializer as a graph input too."""
    w = _weights()
    extra: dict[str, np.ndarray] = {}
    nodes = [
        helper.make_node("Conv", ["data", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn"],
                         epsilon=1e-5, name="bn"),
        helper.make_node("Relu", ["bn"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2],
                         name="pool"),
    ]
    if opset < 11:
        nodes.append(helper.make_node("Pad", ["p1"], ["pd"], pads=[0, 0, 1, 1, 0, 0, 1, 1],
                                      name="pad"))
        nodes.append(helper.make_node("Conv", ["pd", "w2", "b2"], ["c2"], name="conv2"))
        nodes.append(helper.make_node("Clip", ["c2"], ["r2"], min=0.0, max=6.0, name="relu6"))
    else:
        extra["pads"] = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
        extra["lo"], extra["hi"] = np.array(0.0, np.float32), np.array(6.0, np.float32)
        nodes.append(helper.make_node("Pad", ["p1", "pads"], ["pd"], name="pad"))
        nodes.append(helper.make_node("Conv", ["pd", "w2", "b2"], ["c2"], name="conv2"))
        nodes.append(helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"], name="relu6"))
    nodes.append(helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"))
    if opset < 13:
        nodes.append(helper.make_node("Squeeze", ["gap"], ["sq"], axes=[2, 3], name="squeeze"))
    else:
        extra["axes"] = np.array([2, 3], np.int64)
        nodes.append(helper.make_node("Squeeze", ["gap", "axes"], ["sq"], name="squeeze"))
    if opset < 12:
        nodes.append(helper.make_node("Dropout", ["sq"], ["dr"], ratio=0.5, name="drop"))
    else:
        nodes.append(helper.make_node("Dropout", ["sq"], ["dr"], name="drop"))
    nodes += [helper.make_node("Gemm", ["dr", "fc", "fcb"], ["logits"], transB=1, name="fc"),
              helper.make_node("Softmax", ["logits"], ["prob"], axis=1, name="softmax")]
    inits = [numpy_helper.from_array(v, k) for k, v in {**w, **extra}.items()]
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", *SHAPE])]
    if ir < 4:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                   for t in inits]
    graph = helper.make_graph(nodes, "zoo_cnn", inputs, [
        helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=ir)
    onnx.checker.check_model(model, full_check=True)
    return model


def _x(n: int = 3) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((n, *SHAPE)).astype(np.float32)


@pytest.mark.parametrize(("opset", "ir"), [(7, 3), (9, 3), (10, 5), (12, 7)])
def test_old_opset_cnn_equals_its_opset_17_spelling(opset: int, ir: int, tmp_path: Path) -> None:
    path = tmp_path / f"zoo_{opset}.onnx"
    onnx.save(zoo_cnn(opset, ir), path)
    old = L.LRP(path, L.EpsilonPlusFlat())
    new = L.LRP(zoo_cnn(17, 8), L.EpsilonPlusFlat())
    assert [repr(r) for r in old.rules] == [repr(r) for r in new.rules]
    x, target = _x(), np.array([1, 4, 9])
    got, want = old.analyze(x, target, device="cpu"), new.analyze(x, target, device="cpu")
    np.testing.assert_array_equal(got.output, want.output)
    np.testing.assert_allclose(got.relevance, want.relevance, rtol=1e-6,
                               atol=1e-7 * float(np.abs(want.relevance).max()))
    assert float(np.abs(got.relevance).max()) > 0
    model = old.model
    assert [i.name for i in model.graph.input] == ["data", "target"]  # weights are no inputs
    assert [o.version for o in model.opset_import if o.domain == ""] == [17]
    # IR 3 is raised to what opset 17 needs (onnx's table: 8); a newer IR is kept
    assert model.ir_version == (8 if ir < 4 else ir)
    record = read_record(model)
    assert record["upgraded_from_opset"] == opset and old.upgraded_from_opset == opset
    assert record.get("upgraded_from_ir") == (ir if ir < 4 else None)
    assert "upgraded_from_opset" not in read_record(new.model) and new.upgraded_from_opset is None
    report = check_model(path, L.EpsilonPlusFlat(), samples=2)
    assert report.ok, [(r.name, r.detail) for r in report.results if r.ok is False]


def test_opset_13_to_15_upgrade_stays_unrecorded() -> None:
    """Opsets 13-15 were upgraded before old opsets were accepted: no record field, no note
    (their compiled bytes do not change)."""
    analyzer = L.LRP(zoo_cnn(13, 7), L.EpsilonPlusFlat())
    assert analyzer.upgraded_from_opset is None
    assert not {"upgraded_from_opset", "upgraded_from_ir"} & set(read_record(analyzer.model))


def test_cli_notes_the_upgrade_on_stderr_and_opset_17_works(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "zoo9.onnx"
    onnx.save(zoo_cnn(9, 3), path)
    out, pinned = tmp_path / "out.onnx", tmp_path / "pinned.onnx"
    assert main(["convert", str(path), str(out), "--composite", "EpsilonPlusFlat"]) == 0
    err = capsys.readouterr().err
    assert err == (f"lrp-onnx: note: {path}: upgraded from opset 9 to 17 with "
                   "onnx.version_converter; IR 3: the initializers it lists as graph inputs "
                   "are read as constants, not inputs\n")
    assert main(["convert", str(path), str(pinned), "--composite", "EpsilonPlusFlat",
                 "--opset", "17"]) == 0
    assert pinned.read_bytes() == out.read_bytes()
    assert main(["check", str(path), "--composite", "EpsilonPlusFlat", "--samples", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("note:") == 2  # convert once, check once (it compiles twice)
    assert main(["check", str(out)]) == 0  # the compiled file re-checks with its recorded rules
    assert "note:" not in capsys.readouterr().err
    # the Python API prints nothing
    L.LRP(path, L.EpsilonPlusFlat())
    assert capsys.readouterr() == ("", "")


def test_old_opset_refused_by_the_converter_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """BatchNormalization with ``spatial=0`` (opset 7) has no opset-9 equivalent."""
    model = zoo_cnn(7, 3)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn.attribute.append(helper.make_attribute("spatial", 0))
    path = tmp_path / "spatial0.onnx"
    onnx.save(model, path)
    with pytest.raises(CanonizerError) as info:
        L.LRP(path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: onnx.version_converter cannot upgrade opset 7 to 17 at "
                           "'bn' (BatchNormalization): Attribute spatial must have value 1")
    out = tmp_path / "out.onnx"
    assert main(["convert", str(path), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at 'bn' (BatchNormalization)" in err and not out.exists()


# -- old opsets: torch's legacy exporter at opset 7 (IR 3) and 9, against Zennit ---------------
@pytest.mark.parametrize("opset", [7, 9])
def test_old_torch_export_matches_zennit(opset: int, tmp_path: Path) -> None:
    """torch's legacy exporter writes opset 7 as IR 3 with the weights listed as inputs.
    (``onnx.version_converter`` cannot down-convert an opset-17 export: it has no adapter from
    Relu-14 down to 13.)"""
    torch = pytest.importorskip("torch")
    pytest.importorskip("zennit")
    import zennit.composites as zc

    from lrp_onnx.testing import oracle

    net = oracle.seed_vgg(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation warnings for old opsets
        path = oracle.export(net, tmp_path / f"seed{opset}.onnx", torch.zeros(1, 3, 32, 32),
                             opset=opset)
        src = oracle.export(net, tmp_path / "seed17.onnx", torch.zeros(1, 3, 32, 32))
    old = onnx.load(path)
    assert [o.version for o in old.opset_import] == [opset]
    assert (old.ir_version < 4) == (len(old.graph.input) > 1) == (opset == 7)
    x = oracle.well_conditioned_inputs(net, (3, 32, 32), 2, seed=2)
    logits, target = oracle.torch_targets(net, x)
    analyzer = L.LRP(path, L.EpsilonPlusFlat())
    assert [i.name for i in analyzer.model.graph.input] == ["input", "target"]
    ours = analyzer.analyze(x, target, device="cpu")
    np.testing.assert_allclose(ours.output, logits, rtol=1e-5, atol=1e-5)
    plain = L.LRP(src, L.EpsilonPlusFlat()).analyze(x, target, device="cpu").relevance
    np.testing.assert_allclose(ours.relevance, plain, rtol=1e-6,
                               atol=1e-7 * float(np.abs(plain).max()))
    _, ref = oracle.zennit_relevance(net, x, zc.EpsilonPlusFlat(), target, logits.shape[1])
    oracle.assert_agreement(ours.relevance, ref, f"seed_vgg torch opset {opset} EpsilonPlusFlat")


# -- other domains -----------------------------------------------------------------------------
W4 = np.random.default_rng(5).standard_normal((4, 3)).astype(np.float32)


def _domains_model(on_path: bool, opset: int = 17, sin: bool = False) -> onnx.ModelProto:
    """``x @ W`` explained, with an ``ai.onnx.ml`` label (ArgMax -> ArrayFeatureExtractor) and a
    ``com.microsoft`` Gelu of the logits as outputs off the relevance path; ``on_path`` puts an
    ``ai.onnx.ml`` Scaler and a ``com.microsoft`` Gelu before the MatMul, ``sin`` a standard
    ``Sin`` (no rule either) after them."""
    first = "x"
    nodes = []
    if on_path:
        nodes += [helper.make_node("Scaler", ["x"], ["scaled"], domain="ai.onnx.ml",
                                   offset=[0.5], scale=[2.0], name="scaler"),
                  helper.make_node("Gelu", ["scaled"], ["act"], domain="com.microsoft",
                                   name="gelu_in")]
        first = "act"
    if sin:
        nodes.append(helper.make_node("Sin", [first], ["wave"], name="sin"))
        first = "wave"
    nodes += [helper.make_node("MatMul", [first, "w"], ["logits"], name="mm"),
              helper.make_node("ArgMax", ["logits"], ["am"], axis=1, keepdims=0, name="argmax"),
              helper.make_node("ArrayFeatureExtractor", ["classes", "am"], ["label"],
                               domain="ai.onnx.ml", name="afe"),
              helper.make_node("Gelu", ["logits"], ["side"], domain="com.microsoft",
                               name="gelu_out")]
    graph = helper.make_graph(
        nodes, "domains", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("side", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(W4, "w"),
         numpy_helper.from_array(np.array([5, 6, 7], np.int64), "classes")])
    return helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", opset), helper.make_opsetid("ai.onnx.ml", 1),
        helper.make_opsetid("com.microsoft", 1)], ir_version=7)


@pytest.mark.parametrize("opset", [9, 17])
def test_other_domains_off_the_path_run_as_they_are(opset: int, tmp_path: Path) -> None:
    path = tmp_path / "domains.onnx"
    onnx.save(_domains_model(False, opset), path)
    analyzer = L.LRP(path, L.Composite(L.GlobalTypeMap({L.DenseLayer: L.EpsilonRule()})))
    assert analyzer.output_name == "logits"  # the first float output (the label is int64)
    assert {(o.domain, o.version) for o in analyzer.model.opset_import} == {
        ("", 17), ("ai.onnx.ml", 1), ("com.microsoft", 1)}
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    sess = analyzer.session("cpu")
    outs = dict(zip([o.name for o in sess.get_outputs()],
                    sess.run(None, {"x": x, "target": np.full(5, -1, np.int64)})))
    z = x.astype(np.float64) @ W4
    np.testing.assert_allclose(outs["logits"], z, rtol=1e-5)
    # ArrayFeatureExtractor of 1-D indices gives [1, N]
    np.testing.assert_array_equal(outs["label"].ravel(), np.array([5, 6, 7])[z.argmax(1)])
    gelu = 0.5 * z * (1 + np.vectorize(__import__("math").erf)(z / np.sqrt(2)))
    np.testing.assert_allclose(outs["side"], gelu, rtol=1e-4, atol=1e-6)
    # epsilon rule on one dense layer, seed 1 at the top class: R = x * W[:, t] / z_t
    t = z.argmax(1)
    zt = z[np.arange(5), t]
    want = x * W4[:, t].T / (zt + 1e-6 * np.where(zt >= 0, 1, -1))[:, None]
    np.testing.assert_allclose(outs["relevance"], want, rtol=1e-5, atol=1e-7)
    report = check_model(path, L.EpsilonPlus(), samples=3)
    assert report.ok, [(r.name, r.detail) for r in report.results if r.ok is False]


@pytest.mark.parametrize("sin", [False, True])
def test_other_domains_on_the_path_are_named_at_once(sin: bool, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Every blocker in one line: the foreign nodes on the path and a standard op without a
    rule, each with what to do."""
    path = tmp_path / "on_path.onnx"
    onnx.save(_domains_model(True, sin=sin), path)
    with pytest.raises(UnsupportedOp) as info:
        L.LRP(path, L.EpsilonPlus())
    text = str(info.value)
    assert "\n" not in text and text.startswith(
        f"{path}: {2 + sin} node(s) on the relevance path have no relevance rule")
    assert "'scaler' (Scaler) from domain 'ai.onnx.ml', 'gelu_in' (Gelu) from domain " \
        "'com.microsoft'" in text and "output=NAME" in text
    assert ("'sin' (Sin)" in text and "NameMap('sin', PassRule())" in text) == sin
    assert "afe" not in text and "gelu_out" not in text  # off the path: not blockers
    out = tmp_path / "out.onnx"
    assert main(["convert", str(path), str(out)]) == 1
    assert capsys.readouterr().err.count("\n") == 1 and not out.exists()
    if not sin:  # PassRule does not force a foreign node through
        with pytest.raises(UnsupportedOp, match="from domain 'ai.onnx.ml'"):
            L.LRP(path, L.Composite(L.GlobalMap(L.PassRule())))


def test_domain_onnx_runtime_lacks_is_refused_at_load() -> None:
    model = _domains_model(False)
    model.graph.node[-1].domain = "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(ModelLoadError, match=r"'gelu_out' \(Gelu\) from domain 'com.example'"):
        L.LRP(model)


# -- scikit-learn: MLPClassifier through skl2onnx, against Zennit ------------------------------
@pytest.fixture(scope="module")
def digits_mlp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("skl2onnx")
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    clf = MLPClassifier(hidden_layer_sizes=(32, 16), activation="relu", max_iter=300,
                        random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: the weights need not be optimal
        clf.fit(X[:1000], y[:1000])
    folder = tmp_path_factory.mktemp("skl2onnx")
    paths = {}
    for zipmap in (False, True):
        onx = to_onnx(clf, X[:1], options={id(clf): {"zipmap": zipmap}})
        paths[zipmap] = folder / f"mlp_zipmap_{zipmap}.onnx"
        onnx.save(onx, paths[zipmap])
    return {"clf": clf, "X": X[1000:], "path": paths[False], "zipmap": paths[True],
            "folder": folder}


def _torch_copy(clf: Any) -> Any:
    """``nn.Sequential`` of Linear/ReLU with the classifier's ``coefs_``/``intercepts_``
    (float32; sklearn's ``coefs_[i]`` is ``[in, out]``, torch's weight ``[out, in]``)."""
    torch = pytest.importorskip("torch")
    layers: list[Any] = []
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
        lin = torch.nn.Linear(*w.shape)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w.T.astype(np.float32)))
            lin.bias.copy_(torch.from_numpy(b.astype(np.float32)))
        layers += [lin] + ([torch.nn.ReLU()] if i < len(clf.coefs_) - 1 else [])
    return torch.nn.Sequential(*layers).eval()


def _zennit_dense(rule: str) -> Any:
    import torch
    from zennit.composites import EpsilonPlus, LayerMapComposite
    from zennit.rules import AlphaBeta

    if rule == "EpsilonPlus":
        return EpsilonPlus()  # Linear -> Epsilon(1e-6)
    return LayerMapComposite([(torch.nn.Linear, AlphaBeta(alpha=2.0, beta=1.0))])


OURS_DENSE = {
    "EpsilonPlus": lambda: L.EpsilonPlus(),
    "Alpha2Beta1": lambda: L.Composite(L.GlobalTypeMap({L.DenseLayer: L.AlphaBetaRule(2.0,
                                                                                      1.0)})),
}


@pytest.mark.parametrize("rule", sorted(OURS_DENSE))
def test_skl2onnx_mlp_matches_zennit(rule: str, digits_mlp: dict[str, Any]) -> None:
    pytest.importorskip("zennit")
    from lrp_onnx.testing import oracle

    clf, path = digits_mlp["clf"], digits_mlp["path"]
    net = _torch_copy(clf)
    X = digits_mlp["X"]
    x = X[oracle.conditioned(net, X)][:8]
    assert len(x) == 8
    logits, target = oracle.torch_targets(net, x)
    np.testing.assert_array_equal(target, clf.predict(x))
    analyzer = L.LRP(path, OURS_DENSE[rule]())
    # the probabilities (first float output) are explained, from before the trailing Softmax
    assert analyzer.output_name == "probabilities"
    assert [la.summary for la in analyzer.layers][1:] == [
        "Dense(64 => 32, relu)", "Dense(32 => 16, relu)", "Dense(16 => 10)"]
    got = analyzer.analyze(x, target, device="cpu")
    np.testing.assert_allclose(got.output, clf.predict_proba(x), rtol=1e-4, atol=1e-6)
    _, ref = oracle.zennit_relevance(net, x, _zennit_dense(rule), target, logits.shape[1])
    oracle.assert_agreement(got.relevance, ref, f"skl2onnx MLPClassifier {rule}")


def test_skl2onnx_mlp_passes_check_and_cli(digits_mlp: dict[str, Any],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = digits_mlp["path"]
    report = check_model(path, L.EpsilonPlus(), samples=4)
    assert report.ok, [(r.name, r.detail) for r in report.results if r.ok is False]
    out = digits_mlp["folder"] / "compiled.onnx"
    assert main(["convert", str(path), str(out), "--composite", "EpsilonPlus",
                 "--output-name", "probabilities"]) == 0
    compiled = onnx.load(out)
    assert [o.name for o in compiled.graph.output] == ["label", "probabilities", "relevance"]
    assert ("ai.onnx.ml", 1) in {(o.domain, o.version) for o in compiled.opset_import}
    assert json.loads(compiled.metadata_props[-1].value)["explained_output"] == "probabilities"
    assert main(["check", str(out)]) == 0
    assert "note:" not in capsys.readouterr().err  # opset 21: nothing upgraded


def test_skl2onnx_zipmap_is_refused_saying_how_to_convert(
        digits_mlp: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    path = digits_mlp["zipmap"]
    for output in (None, "output_probability"):
        with pytest.raises(UnsupportedModel) as info:
            L.LRP(path, L.EpsilonPlus(), output=output)
        text = str(info.value)
        assert "\n" not in text and text.startswith(
            f"{path}: output 'output_probability' is a sequence, not a tensor")
        assert "options={id(clf): {'zipmap': False}}" in text
    # a fresh process: graphsurgeon prints some warnings once per process
    out = digits_mlp["folder"] / "z.onnx"
    said = subprocess.run([sys.executable, "-m", "lrp_onnx.cli", "convert", str(path), str(out)],
                          capture_output=True, text=True, check=False)
    assert said.returncode == 1 and not out.exists()
    assert said.stderr.count("\n") == 1 and said.stderr.startswith("lrp-onnx: error: ")
    assert said.stdout == ""  # graphsurgeon's import warnings stay quiet


def test_skl2onnx_pipeline_with_scaler_is_refused_naming_it(tmp_path: Path) -> None:
    """StandardScaler converts to an ``ai.onnx.ml`` Scaler on the relevance path."""
    pytest.importorskip("skl2onnx")
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 4)).astype(np.float32)
    pipe = make_pipeline(StandardScaler(), MLPClassifier((5,), max_iter=20, random_state=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.fit(X, np.arange(60) % 3)
    onnx.save(to_onnx(pipe, X[:1], options={"zipmap": False}), tmp_path / "pipe.onnx")
    with pytest.raises(UnsupportedOp, match=r"1 node\(s\) outside the ONNX standard domain .*"
                       r"\(Scaler\) from domain 'ai.onnx.ml'"):
        L.LRP(tmp_path / "pipe.onnx", L.EpsilonPlus())
