"""Portability: a compiled model run by ONNX Runtime for Node.js gives Python's relevance.

The script Node runs is the ```javascript block of docs/deployment.md, verbatim (so the doc's
example is executed here). It runs with ``onnxruntime-node`` at the version pinned in
``tests/node/package.json``; when ``tests/node/node_modules`` lacks it, the test installs it with
``npm ci --ignore-scripts`` (the CPU binary is bundled in the npm package; the install script
would only download GPU binaries). Without ``node``/``npm``, or when the install fails, the tests
skip with the reason, unless ``LRP_ONNX_REQUIRE_NODE=1`` (as in ``.ci/run``): then they fail.

Tolerance: Node and Python run the same compiled file on ONNX Runtime's CPU kernels (MLAS),
with the same default graph optimizations; measured here (onnxruntime-node 1.30.0 against
Python onnxruntime 1.31) the relevance and logits are bit-identical. The bound allows what a
different ORT release or thread partitioning may legitimately change, a reordered float32 sum:
``max |R_node - R_py| <= 1e-6 * max |R_py|`` (about 8 float32 ulps of the largest relevance),
the same for the logits, and identical top classes where ``-1`` asked for them.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import MODELS, ROOT, ort_session
from npm_folder import NpmFolder

NODE_DIR = ROOT / "tests" / "node"
DOC = ROOT / "docs" / "deployment.md"
REQUIRE_ENV = "LRP_ONNX_REQUIRE_NODE"
RUN_TIMEOUT_S = 120
MIN_NODE_MAJOR = 18
RTOL = 1e-6  # relative to the largest magnitude of the Python result (see the module docstring)


NPM = NpmFolder(NODE_DIR, ("onnxruntime-node",), "Node.js test", REQUIRE_ENV)


def pinned_version() -> str:
    return NPM.pinned()["onnxruntime-node"]


def ensure_onnxruntime_node() -> str:
    """The ``node`` executable, with the pinned onnxruntime-node installed in tests/node."""
    node, npm = NPM.node_and_npm()
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=60)
    major = re.match(r"v(\d+)\.", version.stdout.strip())
    if version.returncode != 0 or major is None or int(major.group(1)) < MIN_NODE_MAJOR:
        NPM.unavailable(f"needs node >= {MIN_NODE_MAJOR}, found "
                        f"{version.stdout.strip() or version.stderr.strip()!r}")
    NPM.install(npm)  # the CPU binary is bundled in the npm package
    return node


@pytest.fixture(scope="module")
def node() -> str:
    return ensure_onnxruntime_node()


def doc_script() -> str:
    """The one ```javascript block of docs/deployment.md."""
    blocks = re.findall(r"```javascript\n(.*?)```\n", DOC.read_text(), re.S)
    assert len(blocks) == 1, f"docs/deployment.md has {len(blocks)} javascript blocks, not 1"
    return str(blocks[0])


def run_doc_script(node: str, workdir: Path, model: Path, x: np.ndarray,
                   targets: list[int]) -> dict[str, np.ndarray]:
    """Run the doc's script under Node on ``x``; returns its outputs by name."""
    script = workdir / "explain.mjs"
    script.write_text(doc_script())
    # Node resolves `import "onnxruntime-node"` from the script's folder upwards.
    link = workdir / "node_modules"
    if not link.exists():
        link.symlink_to(NODE_DIR / "node_modules", target_is_directory=True)
    np.save(workdir / "input.npy", x)
    proc = subprocess.run([node, str(script), str(model), str(workdir / "input.npy"),
                           str(workdir / "out"), *map(str, targets)],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=workdir)
    assert proc.returncode == 0, f"node failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    outs = {}
    for line in proc.stdout.splitlines():
        name = line.split(":")[0]
        outs[name] = np.load(workdir / f"out.{name}.npy")
    return outs


def python_outputs(model: Path, x: np.ndarray, targets: list[int]) -> dict[str, np.ndarray]:
    sess = ort_session(model)
    n = x.shape[0]
    t = np.array(targets * n if len(targets) == 1 else targets, dtype=np.int64)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"input": x, "target": t})))


@pytest.fixture(scope="module", params=["EpsilonPlusFlat", "ZeroRule"])
def compiled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed model compiled with EpsilonPlusFlat, or with LRP(model)'s ZeroRule everywhere."""
    from lrp_onnx import LRP, EpsilonPlusFlat

    composite = EpsilonPlusFlat() if request.param == "EpsilonPlusFlat" else None
    path = tmp_path_factory.mktemp("node") / f"seed_vgg.{request.param}.lrp.onnx"
    LRP(MODELS / "seed_vgg.onnx", composite).save(path)
    return path


def assert_same(node_out: dict[str, np.ndarray], py_out: dict[str, np.ndarray],
                targets: list[int]) -> None:
    assert sorted(node_out) == sorted(py_out) == ["logits", "relevance"]
    for name, ref in py_out.items():
        got = node_out[name]
        assert got.shape == ref.shape and got.dtype == ref.dtype == np.float32, name
        scale = float(np.abs(ref).max())
        assert scale > 0 and np.isfinite(got).all(), name
        diff = float(np.abs(got - ref).max())
        assert diff <= RTOL * scale, (
            f"{name}: max |node - python| = {diff:.3g} > {RTOL} * max |python| = {scale:.3g}")
    n = py_out["logits"].shape[0]
    asked = np.array(targets * n if len(targets) == 1 else targets)
    top = asked == -1
    np.testing.assert_array_equal(node_out["logits"].argmax(1)[top],
                                  py_out["logits"].argmax(1)[top])


def test_node_matches_python_seed_input(node: str, compiled: Path, tmp_path: Path) -> None:
    x = np.load(MODELS / "seed_vgg_input.npy")[None].astype(np.float32)
    targets = [-1]
    assert_same(run_doc_script(node, tmp_path, compiled, x, targets),
                python_outputs(compiled, x, targets), targets)


def test_node_matches_python_batch(node: str, compiled: Path, tmp_path: Path,
                                   rng: np.random.Generator) -> None:
    x = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    targets = [-1, 7, 99]  # top class, an explicit class, the last class
    assert_same(run_doc_script(node, tmp_path, compiled, x, targets),
                python_outputs(compiled, x, targets), targets)


def test_pinned_exactly() -> None:
    """package.json pins an exact version, and package-lock.json agrees with it."""
    assert re.fullmatch(r"\d+\.\d+\.\d+", pinned_version()), pinned_version()
    lock = json.loads((NODE_DIR / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/onnxruntime-node"]["version"] == pinned_version()


def test_missing_node_skips_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """No node on PATH: a skip with the reason, a failure under LRP_ONNX_REQUIRE_NODE=1."""
    NPM.check_missing_tools(ensure_onnxruntime_node, monkeypatch)
