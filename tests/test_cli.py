"""The lrp-onnx command line: success paths and refusals (exit code, one line, no file left)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import MODELS

SEED = MODELS / "seed_vgg.onnx"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lrp_onnx.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_clean_failure(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith("lrp-onnx: error: ")
    for needle in needles:
        assert needle in err, (needle, err)


def _model_with(nodes, inits, inp_shape=("N", 4), out_shape=("N", 3), opset=17):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(inp_shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(out_shape))],
        initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=8)


def test_convert_and_explain(tmp_path: Path) -> None:
    out = tmp_path / "seed.lrp.onnx"
    proc = run_cli("convert", SEED, out, "--composite", "EpsilonPlusFlat")
    assert proc.returncode == 0, proc.stderr
    model = onnx.load(out)
    assert [i.name for i in model.graph.input] == ["input", "target"]
    assert [o.name for o in model.graph.output] == ["logits", "relevance"]
    proc = run_cli("explain", out, MODELS / "seed_vgg_input.npy", "--out", tmp_path / "o",
                   "--target", "3")
    assert proc.returncode == 0, proc.stderr
    assert "execution provider: " in proc.stdout
    assert "target 3" in proc.stdout
    rel = np.load(tmp_path / "o" / "seed_vgg_input.relevance.npy")
    assert rel.shape == (1, 3, 32, 32) and np.isfinite(rel).all() and np.abs(rel).sum() > 0


def test_convert_preset_with_arguments(tmp_path: Path) -> None:
    out = tmp_path / "box.onnx"
    proc = run_cli("convert", SEED, out, "--composite", "EpsilonGammaBox(low=-3.0, high=3.0)")
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()


def test_show_prints_layers_and_rules() -> None:
    proc = run_cli("show", SEED, "--composite", "EpsilonPlusFlat")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["models/seed_vgg.onnx: 10 layers".replace("models/", str(MODELS) + "/"),
                         "ChainTuple(", "  ChainTuple("]
    assert "    (1, 1)  Conv((3, 3), 3 => 8, relu, pad=1) => FlatRule()," in lines
    assert "    (2, 4)  Dense(512 => 100, relu) => EpsilonRule(epsilon=1e-06)," in lines
    flat = run_cli("show", SEED, "--flat").stdout.splitlines()
    assert flat[1:3] == ["  (1, 1)  Conv((3, 3), 3 => 8, relu, pad=1) => ZeroRule()",
                         "  (1, 2)  Conv((3, 3), 8 => 8, relu, pad=1) => ZeroRule()"]


def test_not_an_onnx_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not protobuf \xff\xfe" * 10)
    out = tmp_path / "out.onnx"
    assert_clean_failure(run_cli("convert", bad, out), str(bad), "not an ONNX model")
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


def test_empty_file(tmp_path: Path) -> None:
    bad = tmp_path / "empty.onnx"
    bad.write_bytes(b"")
    assert_clean_failure(run_cli("convert", bad, tmp_path / "o.onnx"), "empty")
    assert not (tmp_path / "o.onnx").exists()


def test_missing_file(tmp_path: Path) -> None:
    assert_clean_failure(run_cli("convert", tmp_path / "nope.onnx", tmp_path / "o.onnx"),
                         "no such file")


def test_unsupported_ops_are_listed_together(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    nodes = [helper.make_node("Sin", ["input"], ["a"], name="first_sin"),
             helper.make_node("Cos", ["a"], ["b"], name="then_cos"),
             helper.make_node("MatMul", ["b", "w"], ["logits"], name="head")]
    path = tmp_path / "sin.onnx"
    onnx.save(_model_with(nodes, [w]), path)
    out = tmp_path / "out.onnx"
    proc = run_cli("convert", path, out)
    assert_clean_failure(proc, "'first_sin' (Sin)", "'then_cos' (Cos)", "2 node(s)")
    assert not out.exists()


def test_incompatible_rule(tmp_path: Path) -> None:
    rules = tmp_path / "r.toml"
    rules.write_text('[[map]]\ntype = "GlobalTypeMap"\nrules = { Conv = "PassRule()" }\n')
    out = tmp_path / "out.onnx"
    proc = run_cli("convert", SEED, out, "--rules", rules)
    assert_clean_failure(proc, "PassRule()", "Conv((3, 3), 3 => 8, relu, pad=1)",
                         "rules that fit", "/0/0.0/Conv")
    assert not out.exists()


def test_refuses_to_overwrite_input(tmp_path: Path) -> None:
    copy = tmp_path / "m.onnx"
    copy.write_bytes(SEED.read_bytes())
    before = copy.read_bytes()
    assert_clean_failure(run_cli("convert", copy, copy), "overwrite the input")
    assert copy.read_bytes() == before


def test_failure_keeps_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    assert_clean_failure(run_cli("convert", bad, out))
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "out.onnx"]


@pytest.mark.parametrize("spec, needle", [
    ("NoSuchPreset", "unknown composite preset"),
    ("EpsilonGammaBox(low=__import__('os'))", "only numbers"),
    ("EpsilonPlusFlat(gamma=1)", "unexpected keyword"),
])
def test_bad_composite_spec(tmp_path: Path, spec: str, needle: str) -> None:
    assert_clean_failure(run_cli("convert", SEED, tmp_path / "o.onnx", "--composite", spec),
                         needle)
    assert not (tmp_path / "o.onnx").exists()


def test_explain_refuses_uncompiled_model(tmp_path: Path) -> None:
    assert_clean_failure(run_cli("explain", SEED, MODELS / "seed_vgg_input.npy"),
                         "not a compiled model")


def test_usage_error_exit_code() -> None:
    proc = run_cli("convert")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_help_on_every_command() -> None:
    for cmd in ("convert", "show", "explain", "check"):
        proc = run_cli(cmd, "--help")
        assert proc.returncode == 0 and "usage:" in proc.stdout


# -- in-process: convert --per-layer / --opset, explain, check -----------------------------------
DIGITS = MODELS / "digits_cnn.onnx"
DIGIT_SAMPLES = MODELS / "digits_samples.npy"


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """Run ``lrp-onnx ARGS`` in this process: (exit code, stdout, stderr)."""
    from lrp_onnx.cli.main import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(result: tuple[int, str, str], *needles: str) -> None:
    code, _, err = result
    assert code == 1, result
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("lrp-onnx: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture(scope="module")
def compiled_seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lrp_onnx import LRP, EpsilonPlusFlat

    path = tmp_path_factory.mktemp("seed") / "seed.lrp.onnx"
    LRP(SEED, EpsilonPlusFlat()).save(path)
    return path


@pytest.fixture(scope="module")
def compiled_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lrp_onnx import LRP, EpsilonPlusFlat

    path = tmp_path_factory.mktemp("digits") / "digits.lrp.onnx"
    LRP(DIGITS, EpsilonPlusFlat()).save(path)
    return path


def _nan_model(path: Path) -> Path:
    """A one-Gemm model with a NaN weight: its outputs and relevance are not finite."""
    w = np.ones((3, 4), np.float32)
    w[0, 0] = np.nan
    nodes = [helper.make_node("Gemm", ["input", "w", "b"], ["logits"], name="head", transB=1)]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(3, np.float32), "b")]
    onnx.save(_model_with(nodes, inits), path)
    return path


def _ref_session(path: Path):
    from conftest import ort_session

    return ort_session(path)


def _png(path: Path, shape: tuple[int, ...], seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def test_convert_per_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d.onnx"
    code, stdout, _ = cli(capsys, "convert", DIGITS, out, "--composite", "EpsilonPlusFlat",
                          "--per-layer")
    assert code == 0
    names = [o.name for o in onnx.load(out).graph.output]
    assert names[:2] == ["logits", "relevance"]
    assert names[2:] == [f"relevance_in_{i}" for i in range(1, len(names) - 1)]
    assert "per-layer relevance outputs (6):" in stdout
    assert "  relevance_in_1  layer 1: Conv((3, 3), 1 => 16, relu, pad=1)" in stdout
    # The first layer's input relevance is the model's relevance.
    x = np.load(DIGIT_SAMPLES)[:3]
    rel, first = _ref_session(out).run(["relevance", "relevance_in_1"],
                                       {"input": x, "target": np.array([-1, -1, -1])})
    np.testing.assert_array_equal(rel, first)


def test_convert_opset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d18.onnx"
    code, stdout, _ = cli(capsys, "convert", DIGITS, out, "--opset", "18")
    assert code == 0 and "opset 18" in stdout
    model = onnx.load(out)
    assert {i.domain: i.version for i in model.opset_import}[""] == 18
    onnx.checker.check_model(model, full_check=True)


def test_convert_failure_leaves_existing_out(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")
    assert_refused(cli(capsys, "convert", DIGITS, out, "--opset", "5"), str(DIGITS),
                   "opset 5")
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def test_convert_refuses_folder_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_refused(cli(capsys, "convert", DIGITS, tmp_path), "is a folder")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_convert_unwritable_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert_refused(cli(capsys, "convert", DIGITS, folder / "o.onnx"), "not writable")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_composite_and_rules_is_a_usage_error(tmp_path: Path) -> None:
    from lrp_onnx.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["convert", str(DIGITS), str(tmp_path / "o.onnx"), "--composite", "EpsilonPlus",
              "--rules", "r.toml"])
    assert info.value.code == 2


# -- explain -----------------------------------------------------------------------------------
def test_explain_batched_npy(tmp_path: Path, compiled_digits: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    out = tmp_path / "out" / "nested"
    code, stdout, stderr = cli(capsys, "explain", compiled_digits, DIGIT_SAMPLES, "--out", out,
                               "--batch-size", "4", "--png-scale", "4")
    assert code == 0 and stderr == ""
    lines = stdout.splitlines()
    assert lines[0] == "execution provider: CPUExecutionProvider"
    assert stdout.count("execution provider:") == 1
    assert lines[1].startswith("digits_samples.npy[0]: target ")
    assert lines[-1] == f"explained 10 sample(s); wrote 20 files to {out}"
    x = np.load(DIGIT_SAMPLES)
    ref = _ref_session(compiled_digits).run(["relevance"], {"input": x,
                                                            "target": np.full(10, -1)})[0]
    for i in range(10):
        rel = np.load(out / f"digits_samples_{i}.relevance.npy")
        assert rel.shape == (1, 1, 8, 8)
        np.testing.assert_allclose(rel[0], ref[i], rtol=1e-5, atol=1e-7)
        png = np.asarray(Image.open(out / f"digits_samples_{i}.png"))
        assert png.shape == (32, 32, 3) and png.dtype == np.uint8
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files


def test_explain_patch_heatmap(tmp_path: Path, compiled_digits: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """``--patch 4`` draws one colour per 4 x 4 patch (a ViT's patch tokens); the relevance
    file is unchanged."""
    from PIL import Image

    from lrp_onnx.cli.heatmap import heatmap

    out = tmp_path / "out"
    code, _, stderr = cli(capsys, "explain", compiled_digits, DIGIT_SAMPLES, "--out", out,
                          "--patch", "4", "--png-scale", "1")
    assert code == 0 and stderr == ""
    rel = np.load(out / "digits_samples_0.relevance.npy")[0]
    png = np.asarray(Image.open(out / "digits_samples_0.png"))
    np.testing.assert_array_equal(png, heatmap(rel, patch=4))
    blocks = png.reshape(2, 4, 2, 4, 3).transpose(0, 2, 1, 3, 4).reshape(4, 16, 3)
    assert all(len(np.unique(b, axis=0)) == 1 for b in blocks)
    assert not np.array_equal(png, heatmap(rel))


def test_explain_images_folder(tmp_path: Path, compiled_seed: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """Images are converted, resized and normalised as documented (Pillow + numpy here)."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    _png(folder / "b.png", (40, 50, 3), seed=1)
    _png(folder / "a.jpg", (32, 32, 3), seed=2)
    _png(folder / "c.png", (20, 20), seed=3)          # grey: converted to RGB
    (folder / "README.txt").write_text("ignored")
    spec = tmp_path / "pre.json"
    spec.write_text(json.dumps({"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3]}))
    out = tmp_path / "out"
    code, stdout, _ = cli(capsys, "explain", compiled_seed, folder, "--out", out,
                          "--preprocess", spec, "--overlay", "--target", "7")
    assert code == 0
    assert [ln.split(":")[0] for ln in stdout.splitlines()[1:4]] == ["a.jpg", "b.png", "c.png"]
    assert "target 7" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{s}.{k}" for s in "abc" for k in ("relevance.npy", "png", "overlay.png"))
    xs = []
    for name in ("a.jpg", "b.png", "c.png"):
        im = Image.open(folder / name).convert("RGB").resize((32, 32),
                                                             Image.Resampling.BILINEAR)
        a = np.asarray(im).astype(np.float64).transpose(2, 0, 1) / 255.0
        mean, std = np.array([0.5, 0.4, 0.3])[:, None, None], np.array([0.25, 0.2, 0.3])
        xs.append(((a - mean) / std[:, None, None]).astype(np.float32))
    ref = _ref_session(compiled_seed).run(["relevance"], {"input": np.stack(xs),
                                                          "target": np.full(3, 7)})[0]
    for i, stem in enumerate("abc"):
        np.testing.assert_allclose(np.load(out / f"{stem}.relevance.npy")[0], ref[i],
                                   rtol=1e-5, atol=1e-8)
        # 32 x 32 pixels, drawn 4x (the default scale makes the longer side >= 128)
        assert np.asarray(Image.open(out / f"{stem}.overlay.png")).shape == (128, 128, 3)


def test_explain_options_override_preprocess_file(tmp_path: Path, compiled_digits: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    img = _png(tmp_path / "d.png", (8, 8))
    spec = tmp_path / "pre.json"
    spec.write_text('{"scale": 1, "mean": 1000}')
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    assert cli(capsys, "explain", compiled_digits, img, "--out", out1, "--preprocess", spec,
               "--scale", "1/16", "--mean", "0", "--no-resize")[0] == 0
    assert cli(capsys, "explain", compiled_digits, img, "--out", out2, "--scale", "0.0625")[0] == 0
    np.testing.assert_array_equal(np.load(out1 / "d.relevance.npy"),
                                  np.load(out2 / "d.relevance.npy"))


def test_explain_progress(tmp_path: Path, compiled_digits: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "explain", compiled_digits, DIGIT_SAMPLES, "--batch-size", "4",
                       "--progress")
    assert code == 0
    assert err.splitlines() == ["[############------------------] 4/10 samples",
                                "[########################------] 8/10 samples",
                                "[##############################] 10/10 samples"]
    assert cli(capsys, "explain", compiled_digits, DIGIT_SAMPLES)[2] == ""  # not a terminal


def test_progress_bar_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    import io

    from lrp_onnx.cli.outputs import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    bar = Progress(10, None, term)
    assert bar.on
    bar.advance(5)
    bar.print("line")
    bar.advance(5)
    bar.close()
    assert term.getvalue() == ("\r[###############---------------] 5/10 samples\r\033[K"
                               "\r[##############################] 10/10 samples\n")
    assert capsys.readouterr().out == "line\n"
    assert not Progress(4, None, Terminal()).on


@pytest.mark.parametrize("case", ["missing", "not_onnx", "uncompiled", "wrong_size",
                                  "bad_image", "bad_npy", "out_is_file", "out_under_file",
                                  "duplicate", "target", "preprocess", "nan", "given_twice"])
def test_explain_refusals(case: str, tmp_path: Path, compiled_seed: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    """Each refusal: exit 1, one line naming the file, and nothing written."""
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out"
    model, extra = compiled_seed, []
    img = _png(work / "img.png", (40, 40, 3))
    if case == "missing":
        inputs, needles = [work / "nope.npy"], [str(work / "nope.npy"), "no such file"]
    elif case == "not_onnx":
        model = work / "bad.onnx"
        model.write_bytes(b"garbage \xff" * 10)
        inputs, needles = [img], [str(model), "not an ONNX model"]
    elif case == "uncompiled":
        model, inputs, needles = SEED, [img], ["not a compiled model"]
    elif case == "wrong_size":
        inputs, extra = [img], ["--no-resize"]
        needles = [str(img), "image is 40x40", "resizing is off"]
    elif case == "bad_image":
        bad = work / "broken.jpg"
        bad.write_bytes(b"\x00" * 64)
        inputs, needles = [img, bad], [str(bad), "not a readable image"]
    elif case == "bad_npy":
        bad = work / "small.npy"
        np.save(bad, np.zeros((2, 3, 8, 8), np.float32))
        inputs, needles = [bad], [str(bad), "[2, 3, 8, 8] does not fit input 'input'"]
    elif case == "out_is_file":
        out.write_text("a file")
        inputs, needles = [img], [str(out), "not a folder"]
    elif case == "out_under_file":
        blocker = tmp_path / "blocker"
        blocker.write_text("a file")
        out = blocker / "out"
        inputs, needles = [img], [str(out), "cannot create the output folder"]
    elif case == "duplicate":
        np.save(work / "img.npy", np.zeros((3, 32, 32), np.float32))
        inputs, needles = [img, work / "img.npy"], [str(work / "img.npy"), "same files"]
    elif case == "target":
        inputs, extra, needles = [img], ["--target", "100"], ["--target 100", "100 classes"]
    elif case == "preprocess":
        spec = work / "pre.json"
        spec.write_text('{"mean": [1, 2]}')
        inputs, extra = [img], ["--preprocess", spec]
        needles = [str(spec), "mean has 2 values"]
    elif case == "nan":
        model = tmp_path / "nan.lrp.onnx"
        from lrp_onnx import LRP

        LRP(_nan_model(work / "nan.onnx")).save(model)
        x = work / "x.npy"
        np.save(x, np.ones((2, 4), np.float32))
        inputs, needles = [x], [str(x), "not finite"]
    else:
        inputs, needles = [img, img], [str(img), "given twice"]
    before = sorted(p.name for p in work.iterdir())
    assert_refused(cli(capsys, "explain", model, *inputs, "--out", out, *extra), *needles)
    assert sorted(p.name for p in work.iterdir()) == before
    assert not out.is_dir() or list(out.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_explain_unwritable_out(tmp_path: Path, compiled_seed: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert_refused(cli(capsys, "explain", compiled_seed, MODELS / "seed_vgg_input.npy",
                           "--out", out), str(out), "not writable")
    finally:
        out.chmod(0o700)


def test_explain_unwritable_out_simulated(tmp_path: Path, compiled_seed: Path, monkeypatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The same refusal where the tests run as root (a read-only folder is writable there)."""
    import tempfile

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    assert_refused(cli(capsys, "explain", compiled_seed, MODELS / "seed_vgg_input.npy",
                       "--out", tmp_path), str(tmp_path), "not writable", "Permission denied")
    assert list(tmp_path.iterdir()) == []


def test_explain_forced_cuda_without_cuda(compiled_digits: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from lrp_onnx.runtime import default_providers

    if any("CUDA" in str(p) for p in default_providers("auto")):
        pytest.skip("a GPU is present")
    assert_refused(cli(capsys, "explain", compiled_digits, DIGIT_SAMPLES, "--device", "cuda"),
                   "--device cuda", "not available")


@pytest.mark.parametrize("args", [["--batch-size", "0"], ["--size", "3"], ["--alpha", "2"],
                                  ["--percentile", "0"], ["--scale", "1/0"], ["--mode", "P"],
                                  ["--size", "8", "8", "--no-resize"]])
def test_explain_usage_errors(args: list[str], compiled_digits: Path) -> None:
    from lrp_onnx.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["explain", str(compiled_digits), str(DIGIT_SAMPLES), *args])
    assert info.value.code == 2


def test_explain_bad_image_subprocess(tmp_path: Path, compiled_digits: Path) -> None:
    bad = tmp_path / "digit.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    out = tmp_path / "out"
    assert_clean_failure(run_cli("explain", compiled_digits, bad, "--out", out), str(bad))
    assert not out.exists()


# -- check -------------------------------------------------------------------------------------
def test_check_original_model(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, stderr = cli(capsys, "check", SEED, "--composite", "EpsilonPlusFlat")
    assert code == 0 and stderr == ""
    lines = stdout.splitlines()
    assert lines[0] == (f"{SEED}: compiled with EpsilonPlusFlat; 4 random samples (seed 0); "
                        "execution provider: CPUExecutionProvider")
    assert [ln.split(":")[0] for ln in lines[1:-1]] == [
        "PASS onnx_checker", "PASS outputs_unchanged", "PASS relevance_finite",
        "PASS conservation_layers", "SKIP conservation_total"]
    assert lines[-1] == "OK: 4 passed, 0 failed, 1 skipped"


def test_check_compiled_model_json(compiled_digits: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = cli(capsys, "check", compiled_digits, "--json", "--samples", "2",
                          "--seed", "3")
    assert code == 0
    report = json.loads(stdout)
    assert report["ok"] is True and report["compiled_input"] is True
    assert report["samples"] == 2 and report["seed"] == 3
    assert {r["name"] for r in report["results"]} >= {"onnx_checker", "outputs_unchanged",
                                                      "relevance_finite", "recorded_rules"}


def test_check_failing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _nan_model(tmp_path / "nan.onnx")
    result = cli(capsys, "check", model)
    assert_refused(result, str(model), "check(s) failed", "relevance_finite")
    assert "FAIL relevance_finite: NaN/Inf in relevance" in result[1]
    assert result[1].splitlines()[-1].startswith("FAILED: ")
    code, stdout, stderr = cli(capsys, "check", model, "--json")
    assert code == 1 and json.loads(stdout)["ok"] is False
    assert len(stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == [model]


def test_check_refused_model(tmp_path: Path, compiled_digits: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage \xff" * 10)
    assert_refused(cli(capsys, "check", bad), str(bad), "not an ONNX model")
    result = cli(capsys, "check", bad, "--json")
    assert_refused(result, str(bad))
    assert json.loads(result[1]) == {"label": str(bad), "ok": False, "results": [],
                                     "error": result[2].strip()[len("lrp-onnx: error: "):]}
    assert_refused(cli(capsys, "check", compiled_digits, "--composite", "EpsilonPlus"),
                   "already compiled")
    assert_refused(cli(capsys, "check", tmp_path / "missing.onnx"), "no such file")


def test_check_subprocess_exit_code(tmp_path: Path) -> None:
    model = _nan_model(tmp_path / "nan.onnx")
    proc = run_cli("check", model, "--json")
    assert_clean_failure(proc, "check(s) failed")
    assert json.loads(proc.stdout)["ok"] is False


# -- --output-relevance and --input ------------------------------------------------------------
@pytest.fixture(scope="module")
def seeded_seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """seed_vgg.onnx converted with --output-relevance (EpsilonPlusFlat)."""
    from lrp_onnx.cli.main import main

    path = tmp_path_factory.mktemp("seeded") / "seed.seeded.onnx"
    assert main(["convert", str(SEED), str(path), "--composite", "EpsilonPlusFlat",
                 "--output-relevance"]) == 0
    return path


def test_output_relevance_round_trip(tmp_path: Path, seeded_seed: Path, compiled_seed: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A one-hot seed file gives the --target run's relevance; check re-checks the file."""
    capsys.readouterr()
    seed = np.zeros(100, np.float64)  # any real dtype: cast to the model's
    seed[7] = 1.0
    np.save(tmp_path / "seed.npy", seed)
    code, stdout, _ = cli(capsys, "explain", seeded_seed, MODELS / "seed_vgg_input.npy",
                          "--output-relevance", tmp_path / "seed.npy", "--out", tmp_path / "a")
    assert code == 0
    assert "seed_vgg_input.npy: output_relevance sum 1, relevance sum" in stdout
    assert cli(capsys, "explain", compiled_seed, MODELS / "seed_vgg_input.npy", "--target", "7",
               "--out", tmp_path / "b")[0] == 0
    got = np.load(tmp_path / "a" / "seed_vgg_input.relevance.npy")
    want = np.load(tmp_path / "b" / "seed_vgg_input.relevance.npy")
    np.testing.assert_array_equal(got, want)
    code, stdout, _ = cli(capsys, "check", seeded_seed)
    assert code == 0 and "PASS recorded_rules" in stdout
    assert cli(capsys, "check", SEED, "--composite", "EpsilonPlusFlat",
               "--output-relevance")[0] == 0


def test_output_relevance_per_sample_seeds(tmp_path: Path, seeded_seed: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    x = np.load(MODELS / "seed_vgg_input.npy")
    np.save(tmp_path / "x.npy", np.stack([x, x, x]))
    seeds = np.zeros((3, 100), np.float32)
    seeds[0, 1], seeds[1, 2], seeds[2, 3] = 1.0, 2.0, -1.0
    np.save(tmp_path / "seeds.npy", seeds)
    code, stdout, _ = cli(capsys, "explain", seeded_seed, tmp_path / "x.npy", "--batch-size",
                          "2", "--output-relevance", tmp_path / "seeds.npy")
    assert code == 0
    sums = [line.split("output_relevance sum ")[1].split(",")[0]
            for line in stdout.splitlines() if "output_relevance sum" in line]
    assert sums == ["1", "2", "-1"]


@pytest.mark.parametrize("case", ["target_given", "seed_missing", "seed_for_target_model",
                                  "seed_shape", "seed_count", "logit_seed"])
def test_output_relevance_refusals(case: str, tmp_path: Path, seeded_seed: Path,
                                   compiled_seed: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 1, one line, nothing written."""
    out = tmp_path / "out"
    seed = tmp_path / "seed.npy"
    np.save(seed, np.ones(100, np.float32))
    x = MODELS / "seed_vgg_input.npy"
    if case == "target_given":
        args, needles = [seeded_seed, x, "--target", "3"], ["--target", "--output-relevance"]
    elif case == "seed_missing":
        args, needles = [seeded_seed, x], ["compiled with --output-relevance", "[N, 100]"]
    elif case == "seed_for_target_model":
        args, needles = [compiled_seed, x, "--output-relevance", seed], ["compiled without it"]
    elif case == "seed_shape":
        np.save(seed, np.ones((7,), np.float32))
        args, needles = [seeded_seed, x, "--output-relevance", seed], [str(seed), "[7]"]
    elif case == "seed_count":
        np.save(seed, np.ones((2, 100), np.float32))
        args, needles = [seeded_seed, x, "--output-relevance", seed], ["one per sample (1)"]
    else:
        result = cli(capsys, "convert", SEED, tmp_path / "m.onnx", "--output-relevance",
                     "--logit-seed")
        assert_refused(result, "--logit-seed", "--output-relevance")
        assert not (tmp_path / "m.onnx").exists()
        return
    assert_refused(cli(capsys, "explain", *args, "--out", out), *needles)
    assert not out.exists()


def _masked_model_file(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["input", "mask"], ["xm"], name="masking"),
         helper.make_node("MatMul", ["xm", "W"], ["logits"], name="fc")], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializer=[w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), path)
    return path


def test_input_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _masked_model_file(tmp_path / "masked.onnx")
    out = tmp_path / "masked.lrp.onnx"
    for cmd in (["convert", model, out], ["show", model], ["check", model]):
        assert_refused(cli(capsys, *cmd), "'input', 'mask'", "--input NAME")
    assert not out.exists()
    assert_refused(cli(capsys, "convert", model, out, "--input", "W"), "'W'")
    assert not out.exists()
    assert cli(capsys, "convert", model, out, "--input", "input")[0] == 0
    compiled = onnx.load(out)
    assert [i.name for i in compiled.graph.input] == ["input", "mask", "target"]
    code, stdout, _ = cli(capsys, "show", model, "--input", "mask", "--flat")
    assert code == 0 and "layers" in stdout
    assert cli(capsys, "check", model, "--input", "input")[0] == 0
    assert cli(capsys, "check", out)[0] == 0  # the explained input is read from the file
    np.save(tmp_path / "x.npy", np.ones((1, 4), np.float32))
    assert_refused(cli(capsys, "explain", out, tmp_path / "x.npy"), "also takes 'mask'",
                   "inputs=")


def test_output_relevance_subprocess_error_is_one_line(tmp_path: Path, seeded_seed: Path
                                                       ) -> None:
    assert_clean_failure(run_cli("explain", seeded_seed, MODELS / "seed_vgg_input.npy",
                                 "--target", "1"), "--output-relevance")


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    """Compiled models and explain's files are created as normal files (the umask applies),
    not with a temporary file's 0o600."""
    from lrp_onnx.cli.main import main

    old = os.umask(0o022)
    try:
        dest = tmp_path / "digits.lrp.onnx"
        assert main(["convert", str(MODELS / "digits_cnn.onnx"), str(dest)]) == 0
        out = tmp_path / "out"
        assert main(["explain", str(dest), str(MODELS / "digits_samples.npy"), "--out",
                     str(out), "--device", "cpu"]) == 0
    finally:
        os.umask(old)
    for path in (dest, *out.iterdir()):
        assert path.stat().st_mode & 0o777 == 0o644, path
