"""A tiny torchvision ViT compiled with ``CPLRP()`` and ``AttnLRP()`` against LXT 2.1.

One model (``tiny_vit(seed=2)``: 2 blocks, width 192, 3 heads, 224x224 input), four exports
(legacy opset 17; dynamo 18 with Erf-GELU, 20 with ``Gelu``, 23 with the fused ``Attention``),
two composites. Checked per export and composite:

* the input relevance equals LXT's ``x * x.grad`` (CP map / AttnLRP patch) per sample, and the
  compiled model's logits are the original model's;
* a batch of 2 equals two batches of 1 (dynamic batch);
* conservation on the zero-offset model: CP-LRP puts the whole logit on the pixels, AttnLRP
  the logit less what the Softmax layers absorb (read from the per-layer outputs);
* every compiled graph stays inside ONNX Runtime's CUDA kernels (``cuda_gaps``);
* the CLI converts the model, and the printed analyzer shows every layer's rule.

The relevance is seeded with the logit (``normalize_output_relevance=False``), as LXT does.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("onnxscript")

from cuda_kernels import cuda_gaps  # noqa: E402
from lrp_onnx import CPLRP, LRP, AttnLRP  # noqa: E402
from lrp_onnx.emit.contract import RELEVANCE, TARGET, per_layer_name  # noqa: E402
from lrp_onnx.testing import transformers as T  # noqa: E402
from lrp_onnx.testing.oracle import assert_agreement  # noqa: E402

# Seed 2, not 0: the sum checks need the explained logit to reach the pixels as a sum of
# moderate parts. With tiny_vit(seed=0) some inputs put under 1% of the logit on the pixels
# (CP-LRP: -0.9% for sample 1 of default_rng(2)): the pixel map is then a near-cancellation
# of large positive and negative parts, and a relative check of its sum measures float32
# rounding, not the rules. With seed 2 and the ``inputs`` fixture's draw, LXT's pixel sums are
# 65% / 32% (CP-LRP) and 39% / 22% (AttnLRP) of the two logits (asserted, > 10%, in
# ``lxt_reference``).
SEED = 2
NUM_LAYERS = 2  # tiny_vit's default
#: (exporter, opset), with ids legacy17, dynamo18, ...
EXPORTS = [("legacy", 17), ("dynamo", 18), ("dynamo", 20), ("dynamo", 23)]
COMPOSITES = {"CPLRP": CPLRP, "AttnLRP": AttnLRP}
MODES = {"CPLRP": "cp", "AttnLRP": "attnlrp"}


def _eid(exporter: str, opset: int) -> str:
    return f"{exporter}{opset}"


def _cases(extra: dict[tuple[str, str], Any] | None = None) -> list[Any]:
    """export x composite parameters; ``extra`` adds marks by (export id, composite)."""
    out = []
    for exporter, opset in EXPORTS:
        eid = _eid(exporter, opset)
        for name in COMPOSITES:
            marks = []
            mark = (extra or {}).get((eid, name))
            if mark is not None:
                marks.append(mark)
            out.append(pytest.param(exporter, opset, name, marks=marks, id=f"{eid}-{name}"))
    return out


# -- fixtures (module scope: each export, LXT run and compile happens once) ---------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vit_lxt")


@pytest.fixture(scope="module")
def vit() -> Any:
    return T.tiny_vit(seed=SEED)


@pytest.fixture(scope="module")
def zero_vit() -> Any:
    return T.tiny_vit(seed=SEED, zero_offsets=True)


class Exports:
    """Each (model, exporter, opset) exported once, on first use."""

    def __init__(self, workdir: Path, models: dict[str, Any]) -> None:
        self.workdir, self.models = workdir, models

    def path(self, exporter: str, opset: int, model: str = "vit") -> Path:
        path = self.workdir / f"{model}_{_eid(exporter, opset)}.onnx"
        if not path.exists():
            T.export_vit(self.models[model], path, exporter=exporter, opset=opset)
        return path


@pytest.fixture(scope="module")
def exports(workdir: Path, vit: Any, zero_vit: Any) -> Exports:
    return Exports(workdir, {"vit": vit, "zero": zero_vit})


@pytest.fixture(scope="module")
def compiled(exports: Exports) -> Any:
    """``compiled(exporter, opset, composite, model="vit", **kwargs)``: the ``LRP`` (logit
    seed), compiled once."""
    cache: dict[tuple[Any, ...], LRP] = {}

    def get(exporter: str, opset: int, composite: str, model: str = "vit",
            **kwargs: Any) -> LRP:
        key = (exporter, opset, composite, model, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = LRP(exports.path(exporter, opset, model), COMPOSITES[composite](),
                             normalize_output_relevance=False, **kwargs)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def inputs(vit: Any) -> tuple[np.ndarray, np.ndarray]:
    """A batch of 2 seeded standard-normal images and their argmax targets (torch logits).

    Not screened: both sides compute the relevance in the Gradient x Input form at epsilon = 0
    (LXT's autograd; lrp_onnx's division-free gradient form), with no stabilized denominator
    that a draw could bring near zero. The measured agreement is ~1e-6 rel-L2, 100x inside the
    bound.
    """
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    return x, T.torch_logits(vit, x).argmax(1)


@pytest.fixture(scope="module")
def vit_logits(vit: Any, inputs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """torch's float32 logits of ``vit`` on the inputs."""
    return T.torch_logits(vit, inputs[0])


@pytest.fixture(scope="module")
def lxt_reference(vit: Any, inputs: tuple[np.ndarray, np.ndarray], vit_logits: np.ndarray,
                  workdir: Path) -> dict[str, np.ndarray]:
    """LXT 2.1's relevance for every mode (CP, AttnLRP, CP + zennit Gamma), one child process,
    cached in the module's tmp dir."""
    pytest.importorskip("lxt")
    cache = workdir / "lxt_reference.npz"
    x, target = inputs
    if not cache.exists():
        ref = T.lxt_relevances(vit, x, target, T.ALL_MODES)
        np.savez(cache, **ref)
    with np.load(cache) as loaded:
        ref = {k: np.asarray(loaded[k]) for k in loaded.files}
    # the seed choice (see SEED): the pixels carry a sizeable share of each explained logit
    logits = vit_logits[np.arange(len(x)), target]
    for mode, rel in ref.items():
        share = rel.reshape(len(x), -1).sum(1, dtype=np.float64) / logits
        assert np.all(share > 0.1), (mode, share)
    return ref


def _sums(a: np.ndarray) -> np.ndarray:
    return a.reshape(len(a), -1).astype(np.float64).sum(1)


def _run_all(lrp: LRP, x: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    session = lrp.session("cpu")
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {lrp.input_name: x, TARGET: target})))


def _basic_session(model: Any) -> Any:
    """ONNX Runtime CPU session at ORT_ENABLE_BASIC (one thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


# -- agreement with LXT ---------------------------------------------------------------------------
@pytest.mark.parametrize(("exporter", "opset", "composite"), _cases())
def test_relevance_equals_lxt(compiled: Any, inputs: tuple[np.ndarray, np.ndarray],
                              lxt_reference: dict[str, np.ndarray], exporter: str, opset: int,
                              composite: str) -> None:
    """Per sample: rel-L2 <= 1e-4 and correlation >= 0.9999 against LXT's x * x.grad (measured
    ~1.1e-6 and 1 - 5e-13)."""
    x, target = inputs
    explanation = compiled(exporter, opset, composite).analyze(x, target, device="cpu")
    np.testing.assert_array_equal(explanation.target, target)
    assert_agreement(explanation.relevance, lxt_reference[MODES[composite]],
                     f"{_eid(exporter, opset)} {composite} vs LXT {MODES[composite]}")


@pytest.mark.parametrize(("exporter", "opset"), EXPORTS, ids=[_eid(*e) for e in EXPORTS])
def test_gamma_variant_equals_lxt_with_zennit(exports: Exports,
                                              inputs: tuple[np.ndarray, np.ndarray],
                                              lxt_reference: dict[str, np.ndarray],
                                              exporter: str, opset: int) -> None:
    """LXT's Gamma variant (zennit's Gamma on the patch Conv2d and on the Linear modules, which
    torchvision's attention never calls) = ``CPLRP(conv_gamma, dense_gamma)``, whose
    OutsideAttentionTypeMap leaves the attention projections at ε = 0 (measured 2e-6)."""
    x, target = inputs
    composite = CPLRP(conv_gamma=T.GAMMA_CONV, dense_gamma=T.GAMMA_DENSE)
    lrp = LRP(exports.path(exporter, opset), composite, normalize_output_relevance=False)
    gammas = [la.summary for la, r in zip(lrp.layers, lrp.rules) if "Gamma" in repr(r)]
    assert len(gammas) == 1 + 2 * NUM_LAYERS + 1, gammas  # patch conv, 2 MLP linears each, head
    relevance = lrp.analyze(x, target, device="cpu").relevance
    assert_agreement(relevance, lxt_reference["cp_gamma"],
                     f"{_eid(exporter, opset)} CPLRP(gamma) vs LXT + zennit Gamma")


@pytest.mark.parametrize(("exporter", "opset", "composite"), _cases())
def test_logits_are_the_original_models(compiled: Any, exports: Exports, vit_logits: np.ndarray,
                                        inputs: tuple[np.ndarray, np.ndarray], exporter: str,
                                        opset: int, composite: str) -> None:
    """The forward part of the compiled graph is the original's: its logits are bit-identical.

    Both run at ORT_ENABLE_BASIC: ORT's extended fusions depend on which values other nodes
    read, and the relevance pass reads the forward's intermediates, so at the default level ORT
    fuses the two graphs differently (measured on the legacy export: SkipLayerNormalization
    and Gelu in the compiled graph, BiasGelu in the original; logits 2.4e-7 apart). A fused op
    that lrp_onnx lowers (opset 23's Attention) is recomputed by the lowered MatMul/Softmax/
    MatMul: equal to 1e-5 of max|logit| there (measured 8.9e-7). The analyzer's logits (default
    session) also match torch's to 1e-5 (measured 1.4e-6).
    """
    x, target = inputs
    lrp = compiled(exporter, opset, composite)
    path = exports.path(exporter, opset)
    original = _basic_session(path).run(["logits"], {"input": x})[0]
    ours = _basic_session(lrp.model).run(["logits"], {"input": x, TARGET: target})[0]
    if "Attention" in T.op_histogram(path):
        np.testing.assert_allclose(ours, original, rtol=0,
                                   atol=1e-5 * max(1.0, float(np.abs(original).max())))
    else:
        np.testing.assert_array_equal(ours, original)
    want = vit_logits
    got = lrp.analyze(x, target, device="cpu").output
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize(("exporter", "opset", "composite"), _cases())
def test_batch_of_two_equals_two_batches_of_one(compiled: Any,
                                                inputs: tuple[np.ndarray, np.ndarray],
                                                exporter: str, opset: int,
                                                composite: str) -> None:
    """One compiled model (dynamic batch) at N=2 and N=1.

    Logits and CP-LRP relevance: bit-identical. AttnLRP relevance: equal to 32 float32 ulps of
    max|R| (4e-6; measured up to 5.6e-7, sample 0 bit-identical): the softmax rule's ReduceSum
    over rows of 197 scores rounds differently when sample 1's rows sit at another alignment
    in the batch-2 buffer.
    """
    x, target = inputs
    lrp = compiled(exporter, opset, composite)
    both = lrp.analyze(x, target, device="cpu")
    ones = [lrp.analyze(x[i:i + 1], target[i:i + 1], device="cpu") for i in range(len(x))]
    rel = np.concatenate([e.relevance for e in ones])
    np.testing.assert_array_equal(both.output, np.concatenate([e.output for e in ones]))
    if composite == "CPLRP":
        np.testing.assert_array_equal(both.relevance, rel)
    else:
        tol = 32 * float(np.finfo(np.float32).eps) * float(np.abs(rel).max())
        np.testing.assert_allclose(both.relevance, rel, rtol=0, atol=tol)


# -- conservation (zero offsets) --------------------------------------------------------------
def _arrived(lrp: LRP, outs: dict[str, np.ndarray], value: str) -> np.ndarray:
    """Per-sample sum of the relevance arriving at ``value``: what every layer reading it sends
    to that input (``relevance_in_<i>[_<k>]`` outputs of ``per_layer=True``)."""
    total = np.zeros(len(outs[RELEVANCE]))
    readers = 0
    for layer in lrp.layers:
        for k, t in enumerate(layer.inputs):
            name = per_layer_name(layer, k, len(layer.inputs))
            if t.name == value and name in outs:
                total += _sums(outs[name])
                readers += 1
    assert readers, f"no per-layer output reads {value}"
    return total


@pytest.fixture(scope="module")
def zero_inputs(zero_vit: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, target, logit)`` for the zero-offset model.

    The check is relative to the explained logit, while float32 rounding in the relevance sum
    scales with sum|R|, which reaches ~500x a small logit (default_rng(0): logit 0.398, error
    5.5e-6 of it). default_rng(3) explains logits 2.26 and 1.11 (errors <= 8e-7): the 1e-5
    bound then measures the rules.
    """
    x = np.random.default_rng(3).standard_normal((2, 3, 224, 224), dtype=np.float32)
    logits = T.torch_logits(zero_vit, x)
    target = logits.argmax(1)
    logit = logits[np.arange(len(x)), target].astype(np.float64)
    assert np.all(np.abs(logit) > 1.0), logit
    return x, target, logit


@pytest.mark.parametrize(("exporter", "opset", "composite"),
                         _cases())
def test_conservation_with_zero_offsets(compiled: Any,
                                        zero_inputs: tuple[np.ndarray, np.ndarray, np.ndarray],
                                        exporter: str, opset: int, composite: str) -> None:
    """No bias, LayerNorm beta, class token or position embedding: CP-LRP puts the logit on
    the pixels (rel 1e-5); AttnLRP the logit less what the Softmax layers absorb (relevance
    arriving at each Softmax output minus what it sends to its input), rel 1e-5 of the logit."""
    x, target, logit = zero_inputs
    tol = 1e-5 * np.abs(logit)
    if composite == "CPLRP":
        rel = compiled(exporter, opset, composite, model="zero").analyze(x, target,
                                                                        device="cpu").relevance
        pixels = _sums(rel)
        print(f"CONSERVATION {_eid(exporter, opset)} CPLRP: pixels {pixels}, logit {logit}, "
              f"rel err {(pixels - logit) / logit}")
        assert np.all(np.abs(pixels - logit) <= tol), (pixels, logit)
        return
    lrp = compiled(exporter, opset, composite, model="zero", per_layer=True)
    outs = _run_all(lrp, x, target)
    softmaxes = [la for la in lrp.layers if la.kind == "Softmax"]
    assert len(softmaxes) == NUM_LAYERS
    absorbed = sum(_arrived(lrp, outs, la.output.name)
                   - _sums(outs[per_layer_name(la, 0, 1)]) for la in softmaxes)
    pixels = _sums(outs[RELEVANCE])
    print(f"CONSERVATION {_eid(exporter, opset)} AttnLRP: pixels {pixels}, logit {logit}, "
          f"softmax absorbed {absorbed}, rel err {(pixels - (logit - absorbed)) / logit}")
    assert np.all(np.abs(absorbed) > 0.1 * np.abs(logit)), absorbed  # a check with teeth
    assert np.all(np.abs(pixels - (logit - absorbed)) <= tol), (pixels, logit, absorbed)


# -- CUDA kernels, CLI, printed view ------------------------------------------------------------
@pytest.mark.parametrize(("exporter", "opset", "composite"), _cases())
def test_compiled_vit_has_cuda_kernels(compiled: Any, exporter: str, opset: int,
                                       composite: str) -> None:
    assert cuda_gaps(compiled(exporter, opset, composite).model) == []


def _run_cli(*args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lrp_onnx.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              p for p in (str(Path(__file__).resolve().parents[1]),
                                          os.environ.get("PYTHONPATH")) if p)})


@pytest.mark.parametrize("composite", list(COMPOSITES))
def test_cli_convert(exports: Exports, inputs: tuple[np.ndarray, np.ndarray], workdir: Path,
                     composite: str) -> None:
    """``lrp-onnx convert vit.onnx vit.lrp.onnx --composite <name>`` (dynamo 20 export): the
    file has the compiled contract and gives the API's relevance bit for bit (seed 1: times the
    logit it agrees with LXT's, see test_relevance_equals_lxt)."""
    from lrp_onnx.runtime import make_session

    src = exports.path("dynamo", 20)
    out = workdir / f"vit.{composite}.lrp.onnx"
    proc = _run_cli("convert", src, out, "--composite", composite)
    assert proc.returncode == 0, proc.stderr
    assert f"{composite}, opset 20" in proc.stdout, proc.stdout
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ["input", TARGET]
    assert [o.name for o in model.graph.output] == ["logits", RELEVANCE]
    x, target = inputs
    rel = make_session(out, device="cpu").run([RELEVANCE], {"input": x, TARGET: target})[0]
    want = LRP(src, COMPOSITES[composite]()).analyze(x, target, device="cpu").relevance
    np.testing.assert_array_equal(rel, want)


@pytest.mark.parametrize(("exporter", "opset"),
                         [pytest.param(e, o, id=_eid(e, o)) for e, o in EXPORTS])
def test_printed_analyzer_shows_every_rule(exports: Exports, capsys: pytest.CaptureFixture[str],
                                           exporter: str, opset: int) -> None:
    """``print(LRP(path, CPLRP()))``: one ``summary => Rule(...)`` line per layer, none left at
    ZeroRule (no primitive matched); the data x data MatMuls (Q Kᵀ and A V of each block) are
    ``BilinearMatMul(...)``, and the only ``Dense(...)`` layers are the weight MatMuls/Gemms
    (qkv, out_proj, fc1, fc2 per block, the head)."""
    path = exports.path(exporter, opset)
    lrp = LRP(path, CPLRP())
    print(lrp)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "LRP(" and lines[-1] == ")"
    body = lines[1:-1]
    assert len(body) == len(lrp.layers)
    pattern = re.compile(r"^  (.+) => ([A-Za-z]+)\(.*\),$")
    for line in body:
        m = pattern.match(line)
        assert m is not None, line
        assert m.group(2) != "ZeroRule", line
    bilinear = [s for s in body if s.startswith("  BilinearMatMul(")]
    dense = [s for s in body if s.startswith("  Dense(")]
    assert len(bilinear) == 2 * NUM_LAYERS, bilinear
    assert len(dense) == 4 * NUM_LAYERS + 1, dense
    # the expectation, read from the source graph: MatMuls of two activations
    graph = onnx.load(str(path)).graph
    consts = {t.name for t in graph.initializer} | {o for n in graph.node
                                                    if n.op_type == "Constant" for o in n.output}
    data_matmuls = [n for n in graph.node
                    if n.op_type == "MatMul" and not any(i in consts for i in n.input)]
    if "Attention" not in T.op_histogram(path):
        assert len(data_matmuls) == 2 * NUM_LAYERS

