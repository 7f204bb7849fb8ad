"""Dynamic image sizes (issue 14, part 2): a model exported with dynamic height and width
compiles once and explains every size the original runs at, as the static-shape export of the
same torch model at that size does (legacy and dynamo exporters; odd sizes whose strides and
ceil-mode pools leave remainders; a size other than the export size), and as Zennit does; a
geometry that depends on the size gives a one-line error naming the node."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrp_onnx import LRP, EpsilonGammaBox, EpsilonPlusFlat
from lrp_onnx import Composite as ZeroComposite
from lrp_onnx.errors import UnsupportedAttribute

torch = pytest.importorskip("torch")
nn = torch.nn

EXPORT_SIZE = (32, 32)
SIZES = ((17, 23), (32, 32), (41, 29))
COMPOSITES = {"epsilon-plus-flat": EpsilonPlusFlat,
              "epsilon-gamma-box": lambda: EpsilonGammaBox(-3.0, 3.0), "zero": ZeroComposite}


class Classifier(nn.Module):
    """conv3x3 s1 p1 -> relu -> conv3x3 s2 p1 -> relu -> maxpool 3x3 s2 p1 ceil_mode ->
    conv1x1 -> relu -> avgpool 2x2 s2 (``pool``: no pads; pads counted; pads not counted,
    whose counts are computed at run time) -> global average pool -> flatten -> linear."""

    def __init__(self, pool: str = "plain") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, 1, 1)
        self.conv2 = nn.Conv2d(6, 8, 3, 2, 1)
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.avgpool = {"plain": nn.AvgPool2d(2, 2),
                        "include-pad": nn.AvgPool2d(2, 2, padding=1, count_include_pad=True),
                        "exclude-pad": nn.AvgPool2d(2, 2, padding=1, count_include_pad=False),
                        }[pool]
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dense = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = self.avgpool(torch.relu(self.conv3(self.maxpool(x))))
        return self.dense(self.flatten(self.gap(x)))


class Segmenter(nn.Module):
    """conv3x3 s2 p1 -> relu -> conv3x3 p1 -> relu -> conv1x1: class scores ``[N, K, h, w]``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 6, 3, 2, 1)
        self.conv = nn.Conv2d(6, 6, 3, 1, 1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(torch.relu(self.down(x)))))


def export(model: nn.Module, path: Path, size: tuple[int, int], *, dynamic: bool,
           dynamo: bool) -> Path:
    """The repo's export conventions (:func:`lrp_onnx.testing.oracle.export`: input ``input``,
    output ``logits``, dynamic batch ``N``), with dynamic ``H``/``W`` when ``dynamic``, else
    every dim fixed at batch 2 and ``size``."""
    kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"]}
    example = torch.zeros(2, 3, *size)
    if dynamo:
        if dynamic:
            dim = torch.export.Dim
            kwargs["dynamic_shapes"] = ({0: dim("N", min=1, max=1024),
                                         2: dim("H", min=8, max=1024),
                                         3: dim("W", min=8, max=1024)},)
        torch.onnx.export(model, (example,), str(path), dynamo=True, verbose=False, **kwargs)
    else:
        if dynamic:
            kwargs["dynamic_axes"] = {"input": {0: "N", 2: "H", 3: "W"}, "logits": {0: "N"}}
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                          **kwargs)
    return path


def _inputs(size: tuple[int, int], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3, *size)).astype(np.float32)


def _assert_close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))


CASES = [("legacy", "plain"), ("dynamo", "plain"), ("legacy", "include-pad"),
         ("legacy", "exclude-pad"), ("dynamo", "exclude-pad")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{e}-{p}" for e, p in CASES])
def classifier(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[nn.Module, Path, dict[tuple[int, int], Path]]:
    exporter, pool = request.param
    torch.manual_seed(0)
    model = Classifier(pool).eval()
    folder = tmp_path_factory.mktemp(f"{exporter}-{pool}")
    dynamo = exporter == "dynamo"
    dynamic = export(model, folder / "dynamic.onnx", EXPORT_SIZE, dynamic=True, dynamo=dynamo)
    static = {s: export(model, folder / f"static{s[0]}x{s[1]}.onnx", s, dynamic=False,
                        dynamo=dynamo) for s in SIZES}
    return model, dynamic, static


@pytest.mark.parametrize("composite", list(COMPOSITES))
def test_classifier_explains_every_size_as_the_static_export(
        classifier: tuple[nn.Module, Path, dict[tuple[int, int], Path]], composite: str) -> None:
    from cuda_kernels import cuda_gaps

    _, dynamic, static = classifier
    analyzer = LRP(dynamic, COMPOSITES[composite]())
    assert cuda_gaps(analyzer.model) == []
    dims = analyzer.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.HasField("dim_value") for d in dims] == [False, True, False, False]
    for size in SIZES:
        x = _inputs(size)
        target = np.array([1, 3])
        got = analyzer.analyze(x, target, device="cpu")
        want = LRP(static[size], COMPOSITES[composite]()).analyze(x, target, device="cpu")
        np.testing.assert_array_equal(got.output, want.output)
        assert got.relevance.shape == x.shape
        _assert_close(got.relevance, want.relevance)


def test_classifier_matches_zennit(tmp_path: Path) -> None:
    pytest.importorskip("zennit")
    import zennit.composites as zc

    from lrp_onnx.testing import oracle

    torch.manual_seed(0)
    model = Classifier("plain").eval()
    analyzer = LRP(export(model, tmp_path / "dynamic.onnx", EXPORT_SIZE, dynamic=True,
                          dynamo=False), EpsilonPlusFlat())
    for size in ((41, 29), (17, 23)):
        x = oracle.well_conditioned_inputs(model, (3, *size), 2, seed=size[0])
        logits, target = oracle.torch_targets(model, x)
        expl = analyzer.analyze(x, target, device="cpu")
        np.testing.assert_allclose(expl.output, logits, rtol=1e-4, atol=1e-5)
        _, ref = oracle.zennit_relevance(model, x, zc.EpsilonPlusFlat(), target, 5)
        oracle.assert_agreement(expl.relevance, ref, f"dynamic size {size}")


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_segmenter_explains_every_size_as_the_static_export(tmp_path: Path,
                                                            dynamo: bool) -> None:
    """A fully convolutional net whose output ``[N, K, h, w]`` is seeded with an explicit
    ``output_relevance`` (the scores of one class)."""
    from cuda_kernels import cuda_gaps

    torch.manual_seed(0)
    model = Segmenter().eval()
    dynamic = export(model, tmp_path / "dynamic.onnx", EXPORT_SIZE, dynamic=True,
                     dynamo=dynamo)
    for name, make in COMPOSITES.items():
        analyzer = LRP(dynamic, make(), output_relevance=True)
        assert cuda_gaps(analyzer.model) == [], name
        for size in SIZES:
            static = export(model, tmp_path / f"static{size[0]}x{size[1]}.onnx", size,
                            dynamic=False, dynamo=dynamo)
            x = _inputs(size)
            with torch.no_grad():
                scores = model(torch.from_numpy(x)).numpy()
            seed = np.zeros_like(scores)
            seed[:, 2] = scores[:, 2]
            got = analyzer.analyze(x, output_relevance=seed, device="cpu")
            want = LRP(static, make(), output_relevance=True).analyze(
                x, output_relevance=seed, device="cpu")
            assert got.relevance.shape == x.shape
            _assert_close(got.relevance, want.relevance)


# -- size-dependent geometry: clean errors ---------------------------------------------------

def _onnx_model(pool: dict[str, Any] | None = None, *, gate: bool = False,
                size: tuple[Any, Any] = ("H", "W"), **conv: Any) -> onnx.ModelProto:
    """conv (``conv`` attributes) -> relu [-> AveragePool(``pool``)] [-> ``Mul`` by its own
    per-channel mean (``gate``)] -> GlobalAveragePool -> Flatten -> Gemm on an input
    ``[N, 3, *size]``."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "D")]
    nodes = [helper.make_node("Conv", ["input", "W"], ["c"], name="conv", **conv),
             helper.make_node("Relu", ["c"], ["r"], name="relu")]
    last = "r"
    if pool is not None:
        nodes.append(helper.make_node("AveragePool", ["r"], ["p"], name="pool", **pool))
        last = "p"
    if gate:
        nodes += [helper.make_node("GlobalAveragePool", [last], ["scale"], name="mean"),
                  helper.make_node("Mul", ["scale", last], ["gated"], name="gate")]
        last = "gated"
    nodes += [helper.make_node("GlobalAveragePool", [last], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "D"], ["logits"], name="dense", transB=1)]
    graph = helper.make_graph(
        nodes, "dynamic", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                         ["N", 3, *size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_same_pads_with_stride_2_on_a_dynamic_input_is_a_clean_cli_error(
        tmp_path: Path) -> None:
    src = tmp_path / "same.onnx"
    onnx.save(_onnx_model(auto_pad="SAME_UPPER", strides=[2, 2]), str(src))
    proc = subprocess.run([sys.executable, "-m", "lrp_onnx.cli", "convert", str(src),
                           str(tmp_path / "out.onnx")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("lrp-onnx: error: ")
    assert "'conv' (Conv" in err and "SAME_UPPER" in err and "run time" in err, err
    assert not (tmp_path / "out.onnx").exists()


def test_same_pads_with_stride_1_on_a_dynamic_input_compile() -> None:
    """``SAME`` pads of a stride-1 axis do not depend on its size."""
    analyzer = LRP(_onnx_model(auto_pad="SAME_UPPER"), EpsilonPlusFlat())
    x = _inputs((9, 14))
    expl = analyzer.analyze(x, np.array([0, 4]), device="cpu")
    assert expl.relevance.shape == x.shape
    static = _onnx_model(pads=[1, 1, 1, 1])
    want = LRP(static, EpsilonPlusFlat()).analyze(x, np.array([0, 4]), device="cpu")
    _assert_close(expl.relevance, want.relevance)


def test_ceil_mode_average_pool_on_a_dynamic_input_is_refused() -> None:
    model = _onnx_model(pads=[1, 1, 1, 1], pool={"kernel_shape": [2, 2], "strides": [2, 2],
                                                  "ceil_mode": 1})
    with pytest.raises(UnsupportedAttribute, match=r"'pool' \(AveragePool.*ceil_mode=1"):
        LRP(model, EpsilonPlusFlat())


def test_full_shape_box_bound_on_a_dynamic_input_is_refused() -> None:
    from lrp_onnx.errors import RuleNotApplicable

    low = np.full((3, 8, 8), -3.0)
    with pytest.raises(RuleNotApplicable, match=r"does not broadcast .*\(3, '\?', '\?'\)"):
        LRP(_onnx_model(pads=[1, 1, 1, 1]), EpsilonGammaBox(low, -low))
    # a per-channel bound broadcasts over the run-time size
    per_channel = np.full((3, 1, 1), -3.0)
    LRP(_onnx_model(pads=[1, 1, 1, 1]), EpsilonGammaBox(per_channel, -per_channel))


def test_mul_gate_with_dynamic_sizes() -> None:
    """``Mul(mean(x), x)``: the gate is the ``[N, C, 1, 1]`` input (dims 1 where the other's are
    not known before run time), as with static sizes (fewer elements)."""
    x = _inputs((11, 14))
    for make in COMPOSITES.values():
        got = LRP(_onnx_model(gate=True, pads=[1, 1, 1, 1]), make()).analyze(
            x, np.array([0, 4]), device="cpu")
        want = LRP(_onnx_model(gate=True, size=(11, 14), pads=[1, 1, 1, 1]), make()).analyze(
            x, np.array([0, 4]), device="cpu")
        _assert_close(got.relevance, want.relevance)
