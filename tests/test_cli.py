"""The lrp-onnx command line: success paths and refusals (exit code, one line, no file left)."""

from __future__ import annotations

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
    for cmd in ("convert", "show", "explain"):
        proc = run_cli(cmd, "--help")
        assert proc.returncode == 0 and "usage:" in proc.stdout
