"""External data: weights stored beside the model are read, kept external when saving, and
models over 2 GiB are saved and run with external data (the 2 GiB case is ``slow``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import MODELS, ort_session
from lrp_onnx import LRP, EpsilonPlusFlat
from lrp_onnx import io as lrp_io
from lrp_onnx.cli.main import main

SEED = MODELS / "seed_vgg.onnx"


def _relevance(path: Path) -> np.ndarray:
    x = np.load(MODELS / "seed_vgg_input.npy")[None]
    return np.asarray(ort_session(str(path)).run(["relevance"],
                                                 {"input": x, "target": np.array([-1])})[0])


def _external_locations(path: Path) -> set[str]:
    model = onnx.load(path, load_external_data=False)
    return {e.value for t in model.graph.initializer for e in t.external_data
            if e.key == "location"}


def test_save_with_external_data(tmp_path: Path) -> None:
    lrp = LRP(SEED, EpsilonPlusFlat())
    inline, external = tmp_path / "inline.onnx", tmp_path / "ext.onnx"
    lrp.save(inline)
    lrp.save(external, external_data=True)
    assert not (tmp_path / "inline.onnx.data").exists()
    assert (tmp_path / "ext.onnx.data").is_file()
    assert _external_locations(external) == {"ext.onnx.data"}
    assert external.stat().st_size < 100_000 < (tmp_path / "ext.onnx.data").stat().st_size
    onnx.checker.check_model(str(external), full_check=True)
    np.testing.assert_array_equal(_relevance(external), _relevance(inline))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data",
                                                          "inline.onnx"]


def test_external_source_stays_external(tmp_path: Path) -> None:
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    model = onnx.load(SEED)
    onnx.save_model(model, src_dir / "m.onnx", save_as_external_data=True,
                    location="m.weights", size_threshold=1024)
    assert (src_dir / "m.weights").is_file()
    out = tmp_path / "out.onnx"
    assert main(["convert", str(src_dir / "m.onnx"), str(out), "--composite",
                 "EpsilonPlusFlat"]) == 0
    assert _external_locations(out) == {"out.onnx.data"}
    inline = tmp_path / "inline.onnx"
    LRP(SEED, EpsilonPlusFlat()).save(inline)
    np.testing.assert_array_equal(_relevance(out), _relevance(inline))
    # The source files are untouched.
    assert sorted(p.name for p in src_dir.iterdir()) == ["m.onnx", "m.weights"]


def test_failed_external_save_leaves_nothing(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    lrp = LRP(SEED, EpsilonPlusFlat())

    def broken(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lrp_io, "write_model", broken)
    with pytest.raises(OSError):
        lrp.save(tmp_path / "m.onnx", external_data=True)
    assert list(tmp_path.iterdir()) == []


def _big_model(path: Path, features: int) -> int:
    """``input [N, F] -> Gemm(F x F) -> Relu -> Gemm(F x F) -> Relu -> Gemm(10 x F)``, weights
    as external data. Built tensor by tensor: protobuf cannot copy a message over 2 GiB, and
    ``onnx.helper.make_model`` would."""
    rng = np.random.default_rng(0)
    model = onnx.ModelProto()
    model.ir_version = 8
    model.opset_import.add().version = 17
    graph = model.graph
    graph.name = "big"
    shapes = {"W1": (features, features), "W2": (features, features), "W3": (10, features)}
    for name, shape in shapes.items():
        w = rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(1 / np.sqrt(features))
        graph.initializer.add().CopyFrom(numpy_helper.from_array(w, name))
        del w
    graph.node.extend([
        helper.make_node("Gemm", ["input", "W1"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("Gemm", ["a1", "W2"], ["h2"], name="fc2", transB=1),
        helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
        helper.make_node("Gemm", ["a2", "W3"], ["logits"], name="fc3", transB=1)])
    graph.input.append(helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                     ["N", features]))
    graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]))
    onnx.save_model(model, path, save_as_external_data=True, location="big.onnx.data")
    return sum(int(np.prod(s)) * 4 for s in shapes.values())


def _blocked(x: np.ndarray, w: np.ndarray, transpose: bool, block: int = 2000) -> np.ndarray:
    """``x @ w.T`` (or ``x @ w``) in float64, converting ``w`` one block of rows at a time."""
    if transpose:
        return np.concatenate([x @ w[i:i + block].astype(np.float64).T
                               for i in range(0, len(w), block)], axis=1)
    return sum((x[:, i:i + block] @ w[i:i + block].astype(np.float64)
                for i in range(0, len(w), block)), np.zeros((len(x), w.shape[1])))


@pytest.mark.slow
def test_model_over_2_gib(tmp_path: Path) -> None:
    """A 2.3 GB model: compiled (peak memory growth measured in a fresh process), saved with
    external data, and run; its relevance equals the float64 numpy epsilon rule's."""
    features = 17_000
    src = tmp_path / "big.onnx"
    size = _big_model(src, features)
    assert size > 2**31
    script = f"""
import resource, json, lrp_onnx as L
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
a = L.LRP({str(src)!r})
a.save({str(tmp_path / "big.lrp.onnx")!r})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"growth_bytes": (peak - base) * 1024, "external": a.external_data}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = stats["growth_bytes"] / size
    print(f"BIG MODEL: {size / 1e9:.2f} GB, peak RSS growth compile+save {ratio:.2f}x")
    assert stats["external"] and ratio < 2.0
    compiled = tmp_path / "big.lrp.onnx"
    assert compiled.stat().st_size < 1_000_000
    assert _external_locations(compiled) == {"big.lrp.onnx.data"}
    rng = np.random.default_rng(1)
    x = np.abs(rng.standard_normal((2, features))).astype(np.float32)
    targets = np.array([-1, 3])
    session = ort_session(str(compiled))
    rel = session.run(["relevance"], {"input": x, "target": targets})[0]
    assert np.isfinite(rel).all()
    del session
    # float64 reference: ZeroRule = the epsilon rule with the default stabilizer 1e-6
    full = onnx.load(src)
    w1, w2, w3 = (numpy_helper.to_array(t) for t in full.graph.initializer)
    del full

    def stab(v: np.ndarray) -> np.ndarray:
        return v + 1e-6 * np.where(v >= 0, 1.0, -1.0)

    x64 = x.astype(np.float64)
    h1 = _blocked(x64, w1, True)
    a1 = np.maximum(h1, 0)
    h2 = _blocked(a1, w2, True)
    a2 = np.maximum(h2, 0)
    z = a2 @ w3.astype(np.float64).T
    seed = np.eye(10)[np.where(targets < 0, z.argmax(1), targets)]
    r2 = a2 * ((seed / stab(z)) @ w3.astype(np.float64))
    r1 = a1 * _blocked(r2 / stab(h2), w2, False)
    ref = x64 * _blocked(r1 / stab(h1), w1, False)
    del w1, w2
    err = np.linalg.norm(rel - ref, axis=1) / np.linalg.norm(ref, axis=1)
    print(f"BIG MODEL: relative L2 vs float64 numpy {err}")
    assert (err <= 1e-4).all()
    # A ModelProto over 2 GiB also runs (make_session goes through a temporary file).
    expl = LRP(src).analyze(x, targets, device="cpu")
    np.testing.assert_allclose(expl.relevance, rel, rtol=1e-5, atol=1e-7 * np.abs(rel).max())
