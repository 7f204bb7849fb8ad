"""``lrp_onnx.ray.explain_dataset`` and ``lrp-onnx explain --ray`` on a local 2-CPU Ray cluster:
equal to the in-process ``LRP.analyze`` on the same rows, other columns kept, the target column
honoured, bad rows (NaN, wrong shape) under both ``on_error`` modes, the Parquet output."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import MODELS

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pq = pytest.importorskip("pyarrow.parquet")

from lrp_onnx import LRP, EpsilonPlus, InvalidInput  # noqa: E402
from lrp_onnx.cli.main import main  # noqa: E402
from lrp_onnx.ray import explain_dataset, row_error  # noqa: E402

X = np.load(MODELS / "digits_samples.npy")  # (10, 1, 8, 8) float32


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A private local cluster; its temp dir under pytest's (or a short /tmp path where that
    is too long for Ray's unix sockets, ~107 characters)."""
    temp = tmp_path_factory.mktemp("ray")
    own = len(str(temp)) > 40
    if own:
        temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=str(temp),
             logging_level=logging.ERROR, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
    if own:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LRP]:
    analyzer = LRP(MODELS / "digits_cnn.onnx", EpsilonPlus())
    path = tmp_path_factory.mktemp("model") / "digits.lrp.onnx"
    analyzer.save(path)
    return path, analyzer


def _rows(xs: list[np.ndarray]) -> list[dict]:
    return [{"id": i, "name": f"digit{i}", "input": x} for i, x in enumerate(xs)]


def test_equal_to_in_process_and_other_columns_kept(cluster, compiled) -> None:
    path, analyzer = compiled
    ds = ray.data.from_items(_rows(list(X)))
    got = sorted(explain_dataset(ds, path, batch_size=4).take_all(), key=lambda r: r["id"])
    ref = analyzer.analyze(X)
    assert [r["id"] for r in got] == list(range(10))
    assert [r["name"] for r in got] == [f"digit{i}" for i in range(10)]
    assert set(got[0]) == {"id", "name", "input", "relevance", "logits", "target"}
    np.testing.assert_array_equal(np.stack([r["input"] for r in got]), X)
    np.testing.assert_array_equal([r["target"] for r in got], ref.target)
    np.testing.assert_allclose(np.stack([r["relevance"] for r in got]), ref.relevance,
                               rtol=1e-5, atol=1e-6 * np.abs(ref.relevance).max())
    np.testing.assert_allclose(np.stack([r["logits"] for r in got]), ref.output, rtol=1e-5,
                               atol=1e-6)


def test_target_column(cluster, compiled) -> None:
    path, analyzer = compiled
    targets = [(i + 3) % 10 for i in range(10)]
    rows = [{**r, "cls": t} for r, t in zip(_rows(list(X)), targets)]
    got = sorted(explain_dataset(ray.data.from_items(rows), path, target_column="cls",
                                 batch_size=3).take_all(), key=lambda r: r["id"])
    ref = analyzer.analyze(X, targets)
    assert [r["target"] for r in got] == targets == [r["cls"] for r in got]
    np.testing.assert_allclose(np.stack([r["relevance"] for r in got]), ref.relevance,
                               rtol=1e-5, atol=1e-6 * np.abs(ref.relevance).max())


def _bad_rows() -> list[dict]:
    xs = list(X)
    xs[3] = np.full((1, 8, 8), np.nan, dtype=np.float32)
    xs[6] = np.zeros((1, 9, 8), dtype=np.float32)
    return _rows(xs)


def test_bad_rows_get_an_error_column(cluster, compiled) -> None:
    path, analyzer = compiled
    got = sorted(explain_dataset(ray.data.from_items(_bad_rows()), path, batch_size=4,
                                 on_error="column").take_all(), key=lambda r: r["id"])
    assert [r["id"] for r in got] == list(range(10))
    errors = {r["id"]: r["error"] for r in got if r["error"]}
    assert errors == {3: "the sample holds NaN/Inf",
                      6: "the sample has shape [1, 9, 8]; the model takes [N, 1, 8, 8]"}
    good = [i for i in range(10) if i not in errors]
    ref = analyzer.analyze(X[good])
    np.testing.assert_allclose(np.stack([got[i]["relevance"] for i in good]), ref.relevance,
                               rtol=1e-5, atol=1e-6 * np.abs(ref.relevance).max())
    for i in errors:
        assert got[i]["target"] == -1
        assert not got[i]["relevance"].any() and got[i]["relevance"].shape == (1, 8, 8)
    assert got[6]["input"].shape == (1, 9, 8)  # the input is kept as it was


@pytest.mark.parametrize("bad", [3, 6], ids=["nan", "wrong-shape"])
def test_bad_row_fails_the_job_naming_the_row(cluster, compiled, bad: int) -> None:
    path, _ = compiled
    rows = [r for r in _bad_rows() if r["id"] not in ({3, 6} - {bad})]
    with pytest.raises(Exception) as info:
        explain_dataset(ray.data.from_items(rows), path, batch_size=4).materialize()
    message = row_error(info.value)
    assert message is not None
    assert message.startswith(f"row {{'id': {bad}, 'name': 'digit{bad}'}}: ")


def test_refusals_before_any_row_is_read(compiled) -> None:
    path, _ = compiled
    with pytest.raises(InvalidInput, match="on_error must be"):
        explain_dataset(None, path, on_error="skip")
    with pytest.raises(InvalidInput, match="not a compiled model"):
        explain_dataset(None, MODELS / "digits_cnn.onnx")


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_npy_to_parquet(cluster, compiled, tmp_path: Path, capsys) -> None:
    path, analyzer = compiled
    out = tmp_path / "out"
    code, stdout, err = _cli(capsys, "explain", str(path), str(MODELS / "digits_samples.npy"),
                             "--out", str(out), "--ray", "--batch-size", "4")
    assert code == 0, err
    assert stdout.endswith(f"explained 10 row(s) on Ray; wrote Parquet to {out}\n")
    table = pq.read_table(out).sort_by("index")
    assert table.column_names == ["path", "index", "relevance", "logits", "target"]
    rel = np.stack([np.asarray(v).reshape(1, 8, 8) for v in table.column("relevance")
                    .to_pylist()])
    ref = analyzer.analyze(X)
    np.testing.assert_array_equal(table.column("target").to_numpy(), ref.target)
    np.testing.assert_allclose(rel, ref.relevance, rtol=1e-5,
                               atol=1e-6 * np.abs(ref.relevance).max())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_parquet_in_and_out(cluster, compiled, tmp_path: Path, capsys) -> None:
    path, _ = compiled
    src = tmp_path / "in"
    rows = [{**r, "cls": 7} for r in _bad_rows()]
    ray.data.from_items(rows).write_parquet(str(src))
    out = tmp_path / "out"
    code, stdout, err = _cli(capsys, "explain", str(path), str(src), "--out", str(out),
                             "--ray", "--target-column", "cls", "--on-error", "column")
    assert code == 0, err
    assert "explained 10 row(s) on Ray; 2 row(s) with an error" in stdout
    table = pq.read_table(out).sort_by("id")
    assert {"id", "name", "input", "cls", "relevance", "logits", "target", "error"} \
        <= set(table.column_names)
    assert table.column("target").to_pylist() == [7, 7, 7, -1, 7, 7, -1, 7, 7, 7]
    assert [bool(e) for e in table.column("error").to_pylist()].count(True) == 2
    code, _, err = _cli(capsys, "explain", str(path), str(src), "--out", str(tmp_path / "o2"),
                        "--ray", "--column", "pixels")
    assert code == 1
    assert err.startswith(f"lrp-onnx: error: {src}: no column 'pixels' (--column); its columns: ")


def test_cli_bad_row_is_one_line_and_writes_nothing(cluster, compiled, tmp_path: Path,
                                                    capsys) -> None:
    path, _ = compiled
    bad = tmp_path / "bad.npy"
    np.save(bad, np.concatenate([X[:2], np.full((1, 1, 8, 8), np.nan, np.float32)]))
    out = tmp_path / "out"
    code, _, err = _cli(capsys, "explain", str(path), str(bad), "--out", str(out), "--ray")
    assert code == 1
    assert err == (f"lrp-onnx: error: {path}: row {{'path': '{bad}', 'index': 2}}: the sample "
                   "holds NaN/Inf\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npy"]


def test_cli_ray_refuses_without_out(compiled, capsys) -> None:
    path, _ = compiled
    code, _, err = _cli(capsys, "explain", str(path), str(MODELS / "digits_samples.npy"),
                        "--ray")
    assert code == 1
    assert err == "lrp-onnx: error: --ray writes Parquet: give --out DIR\n"


def test_cli_ray_options_need_ray(compiled, capsys) -> None:
    path, _ = compiled
    code, _, err = _cli(capsys, "explain", str(path), str(MODELS / "digits_samples.npy"),
                        "--on-error", "column")
    assert code == 1
    assert err == "lrp-onnx: error: --on-error applies with --ray only\n"


def test_import_lrp_onnx_does_not_import_ray() -> None:
    code = ("import sys, lrp_onnx, lrp_onnx.cli.main; "
            "sys.exit(1 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
