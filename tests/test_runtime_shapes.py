"""Shapes computed at run time (issue 14, part 1): a dynamic batch whose Reshape targets are
built from ``Shape`` of the batch (legacy torch exports of ``x.view(x.size(0), -1)``, of a mean
after ``x.view(x.size(0), 4, -1)`` and of a channel shuffle) or pass through ``Mod`` of
constants compile, and explain as the static-shape export of the same model does (and, for the
flatten, as Zennit does); a dim no analysis can fix (a mean over it) is counted at run time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrp_onnx import LRP, EpsilonPlusFlat
from lrp_onnx import Composite as ZeroComposite
from lrp_onnx.frontend import shapes
from lrp_onnx.frontend.load import load_model
from lrp_onnx.frontend.passes import run_passes

torch = pytest.importorskip("torch")
nn = torch.nn

SHAPE = (3, 8, 8)
BATCHES = (1, 3)


class Flatten(nn.Module):
    """conv -> relu -> ``x.view(x.size(0), -1)`` -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.dense = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        return self.dense(x.view(x.size(0), -1))


class Shuffle(nn.Module):
    """conv -> relu -> channel shuffle -> grouped conv -> relu -> channel shuffle ->
    ``x.mean((2, 3))`` -> linear (the mean reads the shuffled dims)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.dense = nn.Linear(8, 5)

    @staticmethod
    def shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shuffle(torch.relu(self.conv(x)))
        x = self.shuffle(torch.relu(self.grouped(x)))
        return self.dense(x.mean((2, 3)))


class ShufflePool(Shuffle):
    """:class:`Shuffle` with module pooling (``AdaptiveAvgPool2d``, which Zennit gives its
    ``Norm`` rule, as the compiler's z-rule on the average) and a run-time flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shuffle(torch.relu(self.conv(x)))
        x = self.shuffle(torch.relu(self.grouped(x)))
        x = self.pool(x)
        return self.dense(x.view(x.size(0), -1))


class ViewMean(nn.Module):
    """conv -> relu -> ``x.view(x.size(0), 4, -1).mean(2)`` -> linear: ONNX shape inference
    knows the mean's output but not the size it averages over (was ``ZeroDivisionError``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.dense = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        return self.dense(x.view(x.size(0), 4, -1).mean(2))


def _export(model: nn.Module, path: Path, batch: int | None) -> Path:
    """Legacy export; ``batch=None``: dynamic batch ``N``, else that fixed batch."""
    kwargs = {"input_names": ["input"], "output_names": ["logits"]}
    if batch is None:
        kwargs["dynamic_axes"] = {"input": {0: "N"}, "logits": {0: "N"}}
    example = torch.zeros(batch or 1, *SHAPE)
    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, **kwargs)
    return path


def _mod_model(batch: int | None, *, runtime_target: bool = True,
               unresolvable: bool = False) -> onnx.ModelProto:
    """conv -> relu -> Reshape to ``[N, 10 % 4, -1]`` (``Mod`` of constants, ONNX shape
    inference cannot evaluate it) -> mean over the last axis -> dense. ``runtime_target=False``:
    the target is the constant ``[batch, 2, 256]``; ``unresolvable``: the last entry of the
    target is an int64 graph input (its size is not known before run time)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 1, 1)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((5, 2)).astype(np.float32), "D"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0"),
             numpy_helper.from_array(np.array([10], np.int64), "ten"),
             numpy_helper.from_array(np.array([4], np.int64), "four"),
             numpy_helper.from_array(np.array([-1], np.int64), "rest"),
             numpy_helper.from_array(np.array([batch or 1, 2, 256], np.int64), "fixed")]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch or "N", 3, 8, 8])]
    nodes = [helper.make_node("Conv", ["input", "W"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu")]
    target = "fixed"
    if runtime_target:
        last = "rest"
        if unresolvable:
            inputs.append(helper.make_tensor_value_info("rest_in", TensorProto.INT64, [1]))
            last = "rest_in"
        nodes += [helper.make_node("Shape", ["r"], ["s"], name="shape"),
                  helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
                  helper.make_node("Unsqueeze", ["n", "axis0"], ["n1"], name="unsqueeze"),
                  helper.make_node("Mod", ["ten", "four"], ["m"], name="mod"),
                  helper.make_node("Concat", ["n1", "m", last], ["t"], name="concat", axis=0)]
        target = "t"
    nodes += [helper.make_node("Reshape", ["r", target], ["y"], name="reshape"),
              helper.make_node("ReduceMean", ["y"], ["mean"], name="mean", axes=[2], keepdims=0),
              helper.make_node("Gemm", ["mean", "D"], ["logits"], name="dense", transB=1)]
    graph = helper.make_graph(
        nodes, "mod", inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch or "N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _inputs(batch: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *SHAPE)).astype(np.float32)


def _assert_same(dynamic: LRP, static: dict[int, LRP]) -> None:
    """The dynamic-batch compile explains batches 1 and 3 as the static export of each batch."""
    for batch in BATCHES:
        x = _inputs(batch)
        target = np.arange(batch) % 5
        got = dynamic.analyze(x, target, device="cpu").relevance
        want = static[batch].analyze(x, target, device="cpu").relevance
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7 * float(np.abs(want).max()))


@pytest.fixture(scope="module", params=[Flatten, Shuffle, ViewMean],
                ids=["flatten", "shuffle", "view-mean"])
def exports(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, dict[int, Path]]:
    torch.manual_seed(0)
    model = request.param().eval()
    folder = tmp_path_factory.mktemp(request.param.__name__)
    dynamic = _export(model, folder / "dynamic.onnx", None)
    static = {b: _export(model, folder / f"static{b}.onnx", b) for b in BATCHES}
    return model, dynamic, static


def test_torch_runtime_reshapes_match_the_static_export(
        exports: tuple[nn.Module, Path, dict[int, Path]]) -> None:
    _, dynamic, static = exports
    _assert_same(LRP(dynamic, EpsilonPlusFlat()),
                 {b: LRP(p, EpsilonPlusFlat()) for b, p in static.items()})


def test_runtime_shape_models_have_cuda_kernels(
        exports: tuple[nn.Module, Path, dict[int, Path]]) -> None:
    """The compiled run-time-reshape models (and the ``Mod`` one) place no node on the CPU
    under the CUDA EP (the kernel check of tests/test_cuda_ep.py)."""
    from cuda_kernels import cuda_gaps

    _, dynamic, _ = exports
    for composite in (EpsilonPlusFlat(), ZeroComposite()):
        assert cuda_gaps(LRP(dynamic, composite).model) == []
    assert cuda_gaps(LRP(_mod_model(None), EpsilonPlusFlat()).model) == []


def test_mod_of_constants_in_a_reshape_target() -> None:
    dynamic = LRP(_mod_model(None), EpsilonPlusFlat())
    _assert_same(dynamic, {b: LRP(_mod_model(b, runtime_target=False), EpsilonPlusFlat())
                           for b in BATCHES})


@pytest.mark.parametrize("make", [Flatten, ShufflePool], ids=["flatten", "shuffle-pool"])
def test_runtime_reshapes_match_zennit(make: type[nn.Module], tmp_path: Path) -> None:
    """Legacy exports with a dynamic batch and run-time Reshape targets (a flatten head; two
    channel shuffles) against Zennit's EpsilonPlusFlat, at batches 1 and 3."""
    zennit = pytest.importorskip("zennit")
    import zennit.composites as zc

    from lrp_onnx.testing import oracle

    assert zennit is not None
    torch.manual_seed(0)
    model = make().eval()
    path = _export(model, tmp_path / "model.onnx", None)
    analyzer = LRP(path, EpsilonPlusFlat())
    for batch in BATCHES:
        x = oracle.well_conditioned_inputs(model, SHAPE, batch, seed=batch)
        logits, target = oracle.torch_targets(model, x)
        expl = analyzer.analyze(x, target, device="cpu")
        np.testing.assert_allclose(expl.output, logits, rtol=1e-4, atol=1e-5)
        _, ref = oracle.zennit_relevance(model, x, zc.EpsilonPlusFlat(), target, 5)
        oracle.assert_agreement(expl.relevance, ref, f"{make.__name__} batch {batch}")


def test_facts_stay_out_of_the_compiled_model(
        exports: tuple[nn.Module, Path, dict[int, Path]]) -> None:
    """The compiled file keeps ONNX shape inference's value_info (the facts are the graph
    view's), and the batch stays dynamic."""
    _, dynamic, _ = exports
    proto, label = load_model(str(dynamic), {})
    inferred = run_passes(proto, label)
    before = {vi.name: vi.SerializeToString() for vi in inferred.graph.value_info}
    facts = shapes.resolve(inferred)
    assert facts, "ONNX shape inference left no gap: the test models do not test anything"
    compiled = LRP(dynamic, EpsilonPlusFlat()).model
    after = {vi.name: vi.SerializeToString() for vi in compiled.graph.value_info}
    assert {k: after[k] for k in before} == before
    dim = compiled.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "N"


def test_no_gaps_no_work(seed_model_path: Path) -> None:
    """A model whose shapes ONNX shape inference fixes entirely runs no extra inference."""
    proto, label = load_model(str(seed_model_path), {})
    assert not shapes.has_gaps(run_passes(proto, label))


def test_constant_folding_only_touches_the_skeleton() -> None:
    model = _mod_model(None)
    skel = onnx.ModelProto()
    skel.CopyFrom(model)
    assert shapes.fold_constants(skel) == 1  # the Mod
    assert "mod" not in {n.name for n in skel.graph.node}
    assert "mod" in {n.name for n in model.graph.node}


def test_unresolvable_dim_is_counted_at_run_time() -> None:
    """A mean over a dim no analysis fixes (an int64 graph input sets it) takes its count from
    the input's shape at run time (issue 14 part 2; it was a one-line error before)."""
    from cuda_kernels import cuda_gaps

    dynamic = LRP(_mod_model(None, unresolvable=True), EpsilonPlusFlat())
    assert cuda_gaps(dynamic.model) == []
    for batch in BATCHES:
        x = _inputs(batch)
        target = np.arange(batch) % 5
        got = dynamic.analyze(x, target, inputs={"rest_in": np.array([-1], np.int64)},
                              device="cpu").relevance
        static = LRP(_mod_model(batch, runtime_target=False), EpsilonPlusFlat())
        want = static.analyze(x, target, device="cpu").relevance
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7 * float(np.abs(want).max()))


def test_legacy_vit_export_has_known_shapes(tmp_path: Path) -> None:
    """A torchvision ViT exported by the legacy exporter with a dynamic batch (its attention
    Reshape targets pass through ``Mod`` of constants) used to fail with "shape of
    '.../self_attention/Reshape_2_output_0' is unknown"; every shape is now known, and the
    class token's ``Concat`` (its ``Expand`` to the batch leaves the sizes unknown to ONNX
    inference) is split at sizes read at run time: the model compiles and runs at batch 2."""
    torchvision = pytest.importorskip("torchvision")
    from lrp_onnx import CPLRP

    torch.manual_seed(0)
    vit = torchvision.models.vision_transformer.VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5).eval()
    path = tmp_path / "vit.onnx"
    torch.onnx.export(vit, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    assert "Mod" in {n.op_type for n in onnx.load(str(path)).graph.node}
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    rel = LRP(path, CPLRP()).analyze(x).relevance
    assert rel.shape == x.shape and np.isfinite(rel).all()
    # ORT's symbolic shape inference completes the shapes; importing it the usual way runs
    # onnxruntime/tools/__init__.py, which imports torch (0.6 GB) wherever torch is installed
    code = ("import sys, lrp_onnx; from lrp_onnx.frontend import shapes; "
            f"lrp_onnx.LRP({str(path)!r}, lrp_onnx.CPLRP()); "
            "assert shapes._LOADED['module'] is not None, 'symbolic inference not used'; "
            "assert 'torch' not in sys.modules, 'compiling imported torch'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_incomplete_symbolic_inference_writes_no_file(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime's ``SymbolicShapeInference.infer_shapes`` saves ``sym_shape_infer_temp.onnx``
    in the working directory where its inference is incomplete; compiling must leave the user's
    folder as it was (the mutation fuzzer found the file in the repository)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from lrp_onnx import LRPError
    from lrp_onnx.frontend.load import skeleton

    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", kernel_shape=[3, 3]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["logits"], name="flat")]
    w = numpy_helper.from_array(np.ones((2, 2, 3, 3), np.float32), "W")
    graph = helper.make_graph(  # an input of undefined type: inference cannot finish
        nodes, "m", [helper.make_tensor_value_info("x", TensorProto.UNDEFINED, ["N", 2, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # The trigger is real: ORT's own entry point writes its file here and raises.
    with pytest.raises(Exception, match="Incomplete symbolic shape inference"):
        SymbolicShapeInference.infer_shapes(skeleton(model))
    assert sorted(p.name for p in work.iterdir()) == ["sym_shape_infer_temp.onnx"]
    (work / "sym_shape_infer_temp.onnx").unlink()
    with pytest.raises(LRPError):
        LRP(path, EpsilonPlusFlat())
    assert list(work.iterdir()) == []
