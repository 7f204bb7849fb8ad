"""The shipped digits CNN (``models/digits_cnn.onnx``, trained by ``scripts/train_digits.py``).

* The files are what the docs say (shapes, dtypes, names, dynamic batch, ``ir_version`` 8).
* The model classifies the ten shipped held-out samples as their labels (ONNX Runtime and torch).
* Relevance against Zennit 0.5.1 on the same torch model (``build_model()`` with the ONNX
  initializers loaded), the same targets (the labels) and one-hot output relevance, with
  ``tests/test_zennit.py``'s acceptance: relative L2 <= 1e-4 and correlation >= 0.9999 per
  sample in float32 (:func:`lrp_onnx.testing.oracle.assert_agreement`):

  - ``EpsilonPlusFlat`` vs Zennit's ``EpsilonPlusFlat``: float32 ONNX Runtime vs float32 Zennit
    (measured 2.7e-7 at most), and the compiled graph in float64 vs Zennit in float64 (3e-15);
  - ``LRP(model)`` (ZeroRule everywhere) vs Zennit ``Epsilon(1e-6)`` on Conv2d/Linear, ``Pass``
    on ReLU and the plain gradient on MaxPool (our ZeroRule routes a max pool exactly, like
    Zennit's gradient; Zennit's ``Norm`` there would differ by ``y / (y + 1e-6)`` at the
    winners: up to 5.7e-5 relative on these samples, and 7e-4 on an earlier training of this
    model). Measured: float64 1.6e-13, float32 4.1e-7 at most. LRP-0 divides by signed conv
    pre-activations, where float32 rounding can be amplified, so as in ``tests/test_zoo.py`` the
    float32 bound is asserted on the samples whose Zennit float32 relevance is within 5e-5 of
    its float64 one: all ten (3e-7 at most), which the test asserts too.

* Retraining reproduces the three shipped files byte for byte (a few seconds on one thread).
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest

from conftest import MODELS, ROOT, ort_session

torch = pytest.importorskip("torch")
pytest.importorskip("zennit")

import zennit.composites as zc  # noqa: E402
from zennit.rules import Epsilon, Pass  # noqa: E402

import lrp_onnx  # noqa: E402
from lrp_onnx import LRP  # noqa: E402
from lrp_onnx.testing import float64, oracle  # noqa: E402

ONNX_PATH = MODELS / "digits_cnn.onnx"
#: float64 acceptance (relative L2 per sample), as tests/test_zoo.py.
F64_REL = 1e-6
#: A sample is float32-determined when Zennit float32 is this close to Zennit float64.
F32_DETERMINED = 5e-5


@pytest.fixture(scope="module")
def td() -> ModuleType:
    """``scripts/train_digits.py`` imported as a module."""
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "scripts" /
                                                  "train_digits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_digits", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def samples() -> tuple[np.ndarray, np.ndarray]:
    return np.load(MODELS / "digits_samples.npy"), np.load(MODELS / "digits_labels.npy")


@pytest.fixture(scope="module")
def torch_model(td: ModuleType) -> object:
    return td.load_weights(td.build_model(), ONNX_PATH)


def test_shipped_files(samples: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = samples
    assert x.shape == (10, 1, 8, 8) and x.dtype == np.float32
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, np.arange(10))
    # each sample is a held-out image (the last 20% of load_digits) of its label, pixels / 16
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    held_out = len(digits.images) - round(0.2 * len(digits.images))
    for sample, label in zip(x, y):
        (hit,) = np.flatnonzero((digits.images == sample[0] * 16).all(axis=(1, 2)))
        assert hit >= held_out and digits.target[hit] == label
    assert ONNX_PATH.stat().st_size < 1_000_000
    model = onnx.load(str(ONNX_PATH))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and out.name == "logits"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims[0] and isinstance(dims[0], str) and dims[1:] == [1, 8, 8]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert out_dims == [dims[0], 10]
    assert [n.op_type for n in model.graph.node] == [
        "Conv", "Relu", "Conv", "Relu", "MaxPool", "Flatten", "Gemm", "Relu", "Gemm"]


def test_classifies_shipped_samples(samples: tuple[np.ndarray, np.ndarray],
                                    torch_model: object, td: ModuleType) -> None:
    x, y = samples
    (logits,) = ort_session(ONNX_PATH).run(["logits"], {"input": x})
    np.testing.assert_array_equal(logits.argmax(axis=1), y)
    np.testing.assert_array_equal(td.predict(torch_model, x), y)
    torch_logits, _ = oracle.torch_targets(torch_model, x)
    np.testing.assert_allclose(logits, torch_logits, rtol=1e-5, atol=1e-5)
    # any batch size (dynamic batch axis), each sample alone gives the same logits
    (one,) = ort_session(ONNX_PATH).run(["logits"], {"input": x[3:4]})
    np.testing.assert_allclose(one, logits[3:4], rtol=1e-6, atol=1e-6)


def _compare(analyzer: LRP, model: object, x: np.ndarray, y: np.ndarray,
             make_composite: object, label: str) -> None:
    """float64 (compiled graph vs Zennit) always; float32 on float32-determined samples."""
    assert callable(make_composite)
    rel64 = float64.run(analyzer.model, {"input": x, "target": y}, ["relevance"])[0]
    model64 = copy.deepcopy(model).double()  # type: ignore[attr-defined]
    _, ref64 = oracle.zennit_relevance(model64, x.astype(np.float64), make_composite(), y, 10)
    oracle.assert_agreement(rel64, ref64, f"{label} float64", max_rel=F64_REL)

    expl = analyzer.analyze(x, y, device="cpu")
    assert expl.provider == "CPUExecutionProvider"
    np.testing.assert_array_equal(expl.target, y)
    out, ref32 = oracle.zennit_relevance(model, x, make_composite(), y, 10)
    np.testing.assert_allclose(expl.output, out, rtol=1e-5, atol=1e-5)
    determined = np.array([r <= F32_DETERMINED for r, _ in oracle.agreement(ref32, ref64)])
    assert determined.all(), f"{label}: float32 undetermined samples {np.flatnonzero(~determined)}"
    oracle.assert_agreement(expl.relevance, ref32, f"{label} float32")


def test_epsilon_plus_flat_matches_zennit(samples: tuple[np.ndarray, np.ndarray],
                                          torch_model: object) -> None:
    x, y = samples
    assert oracle.conditioned(torch_model, x).all()
    analyzer = LRP(ONNX_PATH, lrp_onnx.EpsilonPlusFlat())
    assert [type(r).__name__ for r in analyzer.rules] == [
        "FlatRule", "ZPlusRule", "ZeroRule", "PassRule", "EpsilonRule", "EpsilonRule"]
    _compare(analyzer, torch_model, x, y, zc.EpsilonPlusFlat, "digits_cnn EpsilonPlusFlat")


def _zennit_zero_rule() -> object:
    """Zennit's equivalent of our ZeroRule everywhere (see the module docstring)."""
    eps = Epsilon(1e-6)
    return zc.LayerMapComposite([(torch.nn.Conv2d, eps), (torch.nn.Linear, eps),
                                 (torch.nn.ReLU, Pass())])


def test_default_rules_match_zennit(samples: tuple[np.ndarray, np.ndarray],
                                    torch_model: object) -> None:
    x, y = samples
    analyzer = LRP(ONNX_PATH)
    assert all(isinstance(r, lrp_onnx.ZeroRule) for r in analyzer.rules)
    _compare(analyzer, torch_model, x, y, _zennit_zero_rule, "digits_cnn LRP(model) ZeroRule")


def test_retraining_reproduces_shipped_files(td: ModuleType, tmp_path: Path) -> None:
    """Same script, same torch build, one thread, deterministic kernels -> the same bytes."""
    info = td.write_all(tmp_path)
    assert info["held_out_accuracy"] >= 0.95
    for name in td.FILES:
        assert (tmp_path / name).read_bytes() == (MODELS / name).read_bytes(), (
            f"retrained {name} differs from models/{name}: rerun scripts/train_digits.py "
            "(or see its docstring on byte-identity across CPUs)")
    model = onnx.load(str(tmp_path / td.ONNX_NAME))
    props = {p.key: p.value for p in model.metadata_props}
    assert props == {"held_out_accuracy": f"{info['held_out_accuracy']:.4f}"}


def test_check_option_reports_differences(td: ModuleType, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """``--check`` compares every file (retraining replaced by a copy of the shipped files)."""
    def fake_write_all(out: str) -> dict[str, float]:
        for name in td.FILES:
            shutil.copyfile(MODELS / name, Path(out) / name)
        return {"held_out_accuracy": 1.0, "train_seconds": 0.0}

    monkeypatch.setattr(td, "write_all", fake_write_all)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for name in td.FILES:
        shutil.copyfile(MODELS / name, shipped / name)
    assert td.main(["--out", str(shipped), "--check"]) == 0
    labels = shipped / "digits_labels.npy"
    labels.write_bytes(labels.read_bytes()[:-1] + b"\x01")
    (shipped / td.ONNX_NAME).unlink()
    assert td.main(["--out", str(shipped), "--check"]) == 1
    err = capsys.readouterr().err
    assert "digits_labels.npy" in err and td.ONNX_NAME in err and "samples" not in err


def test_docs_figure_is_current(td: ModuleType, tmp_path: Path) -> None:
    """docs/images/digits_epsilon_plus_flat.png is what ``--figures`` draws from the shipped
    files (up to one colour level: ORT's float32 sums may round differently on another CPU)."""
    from PIL import Image

    (path,) = td.render_figures(tmp_path)
    with Image.open(path) as new, Image.open(ROOT / "docs" / "images" / path.name) as old:
        assert new.size == old.size == (1346, 542)
        diff = np.abs(np.asarray(new).astype(int) - np.asarray(old).astype(int))
    assert diff.max() <= 1, "rerun: python scripts/train_digits.py --figures docs/images"
