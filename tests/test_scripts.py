"""The measuring scripts run (smoke mode, tiny model): ``scripts/bench.py --smoke`` as CI's
benchmark step and ``scripts/profile_lrp.py`` on the seed model. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
        for key in ("forward_ms", "lrp_ms", "ratio", "zennit_epsilon_plus_flat_ms",
                    "zennit_speedup", "compile_s", "peak_rss_mb", "model_mb"):
            assert row[key] > 0, key
        assert len(row["rounds"]["lrp_ms"]) == data["args"]["rounds"]
    assert "seed      cpu    1 epsilon_plus_flat" in text


def test_profile_reports_the_convolution_floor(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    text = _run("scripts/profile_lrp.py", "models/seed_vgg.onnx", "--composite",
                "epsilon_plus_flat", "--runs", "2", "--json", str(out))
    data = json.loads(out.read_text())
    assert 0 < data["convolution_ms"] < data["kernels_ms"]
    assert data["by_op"]["Conv"] > 0 and "Conv (fwd)" in data["by_tag"]
    assert "# convolution floor:" in text.splitlines()[-1]
