"""``lrp-onnx export-web``: the page explains in the browser what Python explains.

The browser test exports the digits CNN (compiled with EpsilonPlus), serves the folder on
127.0.0.1 (``.wasm`` as ``application/wasm``) and drives the page in headless Chromium (the
system ``chromium``) with ``playwright-core`` (tests/web/drive.mjs). onnxruntime-web and
playwright-core are installed into tests/web with ``npm ci --ignore-scripts`` at the versions
pinned in tests/web/package-lock.json (the install scripts only download browsers). Without
``chromium``/``node``/``npm``, or when the install fails, the browser tests skip with the reason,
unless ``LRP_ONNX_REQUIRE_BROWSER=1`` (as in ``.ci/run``): then they fail.

Tolerance: the browser runs onnxruntime-web's WebAssembly kernels (single-threaded, SIMD), not
the MLAS kernels of Python's CPU provider, so float32 sums may be ordered differently. Measured
here (onnxruntime-web 1.31.1, Python onnxruntime 1.31.1) the largest difference is 3.3e-7 of
the largest value; the bound
``max |R_web - R_py| <= 1e-5 * max |R_py|`` (the same for the logits) leaves room for another
release's kernels, and the top classes must be identical.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import MODELS, ROOT, ort_session
from lrp_onnx.cli.main import main
from lrp_onnx.cli.web import CONFIG_FILE, MODEL_FILE, ORT_FILES, ORT_WEB_VERSION, PAGE_FILES
from npm_folder import NpmFolder

WEB_DIR = ROOT / "tests" / "web"
REQUIRE_ENV = "LRP_ONNX_REQUIRE_BROWSER"
RUN_TIMEOUT_S = 180
RTOL = 1e-5  # relative to the largest magnitude of the Python result (see the module docstring)
PACKAGES = ("onnxruntime-web", "playwright-core")


NPM = NpmFolder(WEB_DIR, PACKAGES, "browser test", REQUIRE_ENV)


def ensure_tools() -> tuple[str, str]:
    """``(node, chromium)``, with the pinned npm packages installed in tests/web."""
    node, npm = NPM.node_and_npm()
    chromium = shutil.which("chromium")
    if chromium is None:
        NPM.unavailable("`chromium` must be on PATH (Debian: apt-get install chromium)")
    NPM.install(npm)
    return node, chromium


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files with the types browsers insist on (module scripts, streamed wasm)."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".wasm": "application/wasm", ".mjs": "text/javascript",
                      ".js": "text/javascript", ".json": "application/json"}

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass


@pytest.fixture(scope="module")
def tools() -> tuple[str, str]:
    return ensure_tools()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lrp_onnx import LRP, EpsilonPlus

    path = tmp_path_factory.mktemp("web") / "digits.lrp.onnx"
    LRP(MODELS / "digits_cnn.onnx", EpsilonPlus()).save(path)
    return path


@pytest.fixture(scope="module")
def served(tools: tuple[str, str], compiled: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """The exported page's folder and its URL on a free port of 127.0.0.1."""
    site = tmp_path_factory.mktemp("site") / "page"
    ort_web = WEB_DIR / "node_modules" / "onnxruntime-web"
    assert main(["export-web", str(compiled), str(site), "--ort-web", str(ort_web)]) == 0
    handler = functools.partial(_Handler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield site, f"http://127.0.0.1:{server.server_address[1]}/index.html"
    finally:
        server.shutdown()
        server.server_close()


def drive(tools: tuple[str, str], url: str, request: dict, workdir: Path,
          screenshot: Path | None = None) -> dict:
    """Run tests/web/drive.mjs on ``request``; returns its result."""
    node, chromium = tools
    (workdir / "request.json").write_text(json.dumps(request))
    cmd = [node, str(WEB_DIR / "drive.mjs"), chromium, url, str(workdir / "request.json"),
           str(workdir / "result.json"), *([str(screenshot)] if screenshot else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    log = (workdir / "result.json").read_text() if (workdir / "result.json").exists() else ""
    assert proc.returncode == 0, f"drive.mjs failed ({proc.returncode}):\n{proc.stderr}\n{log}"
    result: dict = json.loads(log)
    return result


def python_outputs(model: Path, x: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort_session(model)
    logits, rel = sess.run(["logits", "relevance"], {"input": x, "target": target})
    return {"logits": logits, "relevance": rel}


def assert_same(web: dict, py: dict[str, np.ndarray], target: np.ndarray) -> float:
    """Web and Python agree (module docstring); returns the largest relative difference."""
    worst = 0.0
    for name in ("logits", "relevance"):
        ref = py[name]
        got = np.asarray(web[name], dtype=np.float64).reshape(web[f"{name}Dims"])
        assert got.shape == ref.shape, name
        scale = float(np.abs(ref).max())
        diff = float(np.abs(got - ref).max())
        assert scale > 0 and np.isfinite(got).all(), name
        assert diff <= RTOL * scale, (
            f"{name}: max |web - python| = {diff:.3g} > {RTOL} * max |python| = {scale:.3g}")
        worst = max(worst, diff / scale)
    top = np.where(target == -1, py["logits"].argmax(1), target)
    np.testing.assert_array_equal(web["target"], top)
    return worst


def digit_picture(x: np.ndarray) -> Image.Image:
    """A digit as a user would drop it: larger than the model's 8x8 (27x29, so both axes are
    resampled by a non-integer factor) and in colour (RGB, converted to grey by the page)."""
    grey = Image.fromarray(np.rint(x * 255).astype(np.uint8), mode="L")
    big = np.asarray(grey.resize((29, 27), Image.Resampling.BICUBIC), dtype=np.float64)
    tint = np.stack([big, 0.8 * big + 20, 0.6 * big + 40], axis=-1)
    return Image.fromarray(np.clip(np.rint(tint), 0, 255).astype(np.uint8), mode="RGB")


def test_browser_matches_python(tools: tuple[str, str], served: tuple[Path, str],
                                compiled: Path, tmp_path: Path) -> None:
    """The digits samples (top class, explicit classes) through the page's explainArray hook;
    a digit as a PNG file, preprocessed by the page as `explain` does; a screenshot."""
    from lrp_onnx.cli.inputs import Preprocess, read_image

    x = np.load(MODELS / "digits_samples.npy").astype(np.float32)
    site, url = served
    digit_picture(x[0, 0]).save(site / "digit.png")
    targets = [np.full(len(x), -1), np.arange(len(x)) % 10]
    request = {"calls": [{"data": x.ravel().tolist(), "dims": list(x.shape),
                          "target": t.tolist()} for t in targets],
               "image": "digit.png"}
    shot = tmp_path / "web.png"
    result = drive(tools, url, request, tmp_path, shot)
    assert not [m for m in result["console"] if m.startswith(("error", "pageerror"))], result
    worst = max(assert_same(web, python_outputs(compiled, x, t.astype(np.int64)), t)
                for web, t in zip(result["calls"], targets, strict=True))
    # The page's preprocessing (Pillow's grey conversion and bilinear resize, then / 255) gives
    # exactly the input `lrp-onnx explain` reads from the same file.
    pre = Preprocess(size=(8, 8), mode="L")
    xi = read_image(site / "digit.png", pre)[0][None]
    np.testing.assert_array_equal(np.asarray(result["image"]["input"], np.float32).reshape(
        xi.shape), xi)
    one = np.array([-1])
    worst = max(worst, assert_same(result["image"], python_outputs(compiled, xi, one), one))
    print(f"max relative difference web vs python: {worst:.3g}")
    with Image.open(shot) as im:
        assert im.size == (720, 560)
    if os.environ.get("LRP_ONNX_WEB_SCREENSHOT"):  # docs/images/web.png is made this way
        shutil.copyfile(shot, os.environ["LRP_ONNX_WEB_SCREENSHOT"])


def test_page_files(served: tuple[Path, str]) -> None:
    site, _ = served
    config = json.loads((site / CONFIG_FILE).read_text())
    assert config == {"model": MODEL_FILE, "input": "input", "output": "logits", "channels": 1,
                      "classes": 10, "onnxruntime_web": ORT_WEB_VERSION,
                      "preprocess": {"size": [8, 8], "mode": "L", "scale": 1 / 255,
                                     "mean": [0.0], "std": [1.0]}}
    written = sorted(p.name for p in site.iterdir() if p.name != "digit.png")  # the test's
    assert written == sorted([*PAGE_FILES, MODEL_FILE, CONFIG_FILE, "ort"])
    assert sorted(p.name for p in (site / "ort").iterdir()) == sorted(ORT_FILES)


def test_pinned_exactly() -> None:
    """package.json pins exact versions, package-lock.json agrees, and export-web names the
    onnxruntime-web version the test installs."""
    lock = json.loads((WEB_DIR / "package-lock.json").read_text())
    for name, version in NPM.pinned().items():
        assert lock["packages"][f"node_modules/{name}"]["version"] == version
    assert NPM.pinned()["onnxruntime-web"] == ORT_WEB_VERSION


def test_missing_tools_skip_or_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """No node on PATH: a skip with the reason, a failure under LRP_ONNX_REQUIRE_BROWSER=1."""
    NPM.check_missing_tools(ensure_tools, monkeypatch)


# -- export-web without a browser: a stand-in onnxruntime-web package -----------------------
@pytest.fixture
def fake_ort(tmp_path: Path) -> Path:
    """A folder shaped as the onnxruntime-web npm package, with stand-in dist files."""
    pkg = tmp_path / "node_modules" / "onnxruntime-web"
    (pkg / "dist").mkdir(parents=True)
    (pkg / "package.json").write_text(json.dumps({"name": "onnxruntime-web",
                                                  "version": ORT_WEB_VERSION}))
    for name in ORT_FILES:
        (pkg / "dist" / name).write_text(f"stand-in {name}")
    return pkg


def test_export_from_folder_dist_and_tarball(compiled: Path, fake_ort: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    tgz = tmp_path / f"onnxruntime-web-{ORT_WEB_VERSION}.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(fake_ort, arcname="package")
    for i, source in enumerate([fake_ort, fake_ort / "dist", tgz]):
        out = tmp_path / f"page{i}"
        assert main(["export-web", str(compiled), str(out), "--ort-web", str(source)]) == 0
        assert (out / "ort" / ORT_FILES[0]).read_text() == f"stand-in {ORT_FILES[0]}"
        assert (out / MODEL_FILE).read_bytes() == compiled.read_bytes()
    assert capsys.readouterr().out.splitlines()[:2] == [
        f"wrote {tmp_path / 'page0'}: index.html, app.js, {MODEL_FILE}, {CONFIG_FILE} (L, 8x8), "
        f"ort/ (onnxruntime-web {ORT_WEB_VERSION}, WebAssembly)",
        f"serve it over HTTP, e.g. `python -m http.server -d {tmp_path / 'page0'}`, and open "
        "http://localhost:8000/"]


def test_default_source_is_node_modules(compiled: Path, fake_ort: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "page").mkdir()  # an empty folder is replaced
    assert main(["export-web", str(compiled), "page"]) == 0
    assert (tmp_path / "page" / "index.html").is_file()


def test_preprocess_file(compiled: Path, fake_ort: Path, tmp_path: Path) -> None:
    pre = tmp_path / "pre.json"
    pre.write_text(json.dumps({"mean": [0.5], "std": [0.25]}))
    out = tmp_path / "page"
    assert main(["export-web", str(compiled), str(out), "--ort-web", str(fake_ort),
                 "--preprocess", str(pre)]) == 0
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["preprocess"] == {"size": [8, 8], "mode": "L", "scale": 1 / 255,
                                    "mean": [0.5], "std": [0.25]}


@pytest.mark.parametrize("case", ["not-compiled", "dir-not-empty", "no-ort-web",
                                  "ort-web-lacks-wasm", "not-ort-web", "not-a-tarball",
                                  "bad-preprocess"])
def test_refusals(case: str, compiled: Path, fake_ort: Path, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """One line, exit 1, and no DIR (nor a temporary folder) left behind."""
    monkeypatch.chdir(tmp_path)
    model, out, extra = str(compiled), tmp_path / "page", ["--ort-web", str(fake_ort)]
    expected = {
        "not-compiled": "not a compiled model",
        "dir-not-empty": "exists and is not an empty folder",
        "no-ort-web": f"npm install onnxruntime-web@{ORT_WEB_VERSION}",
        "ort-web-lacks-wasm": f"lacks dist/{ORT_FILES[1]}",
        "not-ort-web": "not the onnxruntime-web npm package",
        "not-a-tarball": "not a readable npm tarball",
        "bad-preprocess": "'mode' must be",
    }[case]
    if case == "not-compiled":
        model = str(MODELS / "digits_cnn.onnx")
    elif case == "dir-not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "no-ort-web":
        extra = []
        shutil.rmtree(tmp_path / "node_modules")
    elif case == "ort-web-lacks-wasm":
        (fake_ort / "dist" / ORT_FILES[1]).unlink()
    elif case == "not-ort-web":
        (fake_ort / "package.json").write_text(json.dumps({"name": "left-pad"}))
    elif case == "not-a-tarball":
        (tmp_path / "pre.json").write_text("not gzip")
        extra = ["--ort-web", "pre.json"]
    else:
        (tmp_path / "pre.json").write_text(json.dumps({"mode": "CMYK"}))
        extra += ["--preprocess", "pre.json"]
    assert main(["export-web", model, str(out), *extra]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and expected in err, err
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("node_modules", "pre.json"))
    assert left == (["page"] if case == "dir-not-empty" else []), left
    if case == "dir-not-empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
