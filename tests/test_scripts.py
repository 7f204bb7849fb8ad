"""The measuring scripts run (smoke mode, tiny model): ``scripts/bench.py --smoke`` as CI's
benchmark step and ``scripts/profile_lrp.py`` on the seed model. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_bench_smoke_writes_every_column(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    text = _run("scripts/bench.py", "--smoke", "--json", str(out))
    data = json.loads(out.read_text())
    assert {"python", "onnxruntime", "cpus"} <= set(data["machine"])
    rows = data["rows"]
    assert [(r["model"], r["composite"]) for r in rows] == [
        ("seed", "zero"), ("seed", "epsilon_plus_flat")]
    for row in rows:
        for key in ("forward_ms", "lrp_ms", "ratio", "reference_ms", "reference_speedup",
                    "compile_s", "peak_rss_mb", "model_mb"):
            assert row[key] > 0, key
        assert row["reference"] == "zennit_epsilon_plus_flat"
        assert len(row["rounds"]["lrp_ms"]) == data["args"]["rounds"]
    assert "seed      cpu    1 epsilon_plus_flat" in text


def test_bench_times_a_vit_against_lxt(tmp_path: Path) -> None:
    """The ViT rows: CPLRP and AttnLRP, each against LXT's own mode."""
    pytest.importorskip("lxt")
    out = tmp_path / "bench.json"
    _run("scripts/bench.py", "--models", "vit_tiny", "--batches", "1", "--repeat", "2",
         "--rounds", "1", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["composite"] for r in rows] == ["cplrp", "attnlrp"]
    for row in rows:
        assert row["reference"] == "lxt" and row["reference_speedup"] > 0
        assert row["ratio"] > 0 and row["compile_s"] > 0


def test_bench_times_text_models_against_lxt(tmp_path: Path) -> None:
    """The text rows: a classifier and an LM on token ids, AttnLRP against LXT's attnLRP map
    (CP-LRP timed, with no reference: LXT's maps cannot be stacked in one process)."""
    pytest.importorskip("lxt")
    out = tmp_path / "bench.json"
    _run("scripts/bench.py", "--models", "bert_tiny,gpt2_tiny", "--batches", "1", "--repeat",
         "2", "--rounds", "1", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["composite"]) for r in rows] == [
        ("bert_tiny", "cplrp"), ("bert_tiny", "attnlrp"), ("gpt2_tiny", "cplrp"),
        ("gpt2_tiny", "attnlrp")]
    for row in rows:
        assert row["ratio"] > 0 and row["compile_s"] > 0
        if row["composite"] == "attnlrp":
            assert row["reference"] == "lxt" and row["reference_speedup"] > 0
        else:
            assert row["reference"] is None


def test_profile_reports_the_convolution_floor(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    text = _run("scripts/profile_lrp.py", "models/seed_vgg.onnx", "--composite",
                "epsilon_plus_flat", "--runs", "2", "--json", str(out))
    data = json.loads(out.read_text())
    assert 0 < data["convolution_ms"] < data["kernels_ms"]
    assert data["by_op"]["Conv"] > 0 and "Conv (fwd)" in data["by_tag"]
    assert "# convolution floor:" in text.splitlines()[-1]
