"""``lrp_onnx.evaluate`` and ``lrp-onnx evaluate``: the metrics against a numpy reference written
from the formulas in docs/evaluation.md, the baselines against torch autograd, the orderings on the
shipped digits model, and the command line."""

from __future__ import annotations

import io
import json
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import MODELS, ort_session
from lrp_onnx import evaluate
from lrp_onnx.cli.main import main

N, C, H, W, CLASSES = 12, 2, 4, 6, 3


# -- a tiny model and the numpy reference --------------------------------------------------------
def tiny_model(rng: np.random.Generator) -> onnx.ModelProto:
    """``logits = relu(flatten(x) @ W1) @ W2``: [N, 2, 4, 6] -> [N, 3]."""
    w1 = rng.normal(size=(C * H * W, 8)).astype(np.float32)
    w2 = rng.normal(size=(8, CLASSES)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["input"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", C, H, W])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def ref_impute(x: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """ROAD's linear imputation (no noise): one dense linear solve per channel, each removed
    pixel = its neighbours' weighted mean (1/6 direct, 1/12 diagonal)."""
    h, w = x.shape[-2:]
    pts = [tuple(p) for p in np.argwhere(removed)]
    index = {p: i for i, p in enumerate(pts)}
    out = x.astype(np.float64).copy()
    for c in range(x.shape[0]):
        a = np.zeros((len(pts), len(pts)))
        b = np.zeros(len(pts))
        for n, (i, j) in enumerate(pts):
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    if (di, dj) == (0, 0) or not (0 <= i + di < h and 0 <= j + dj < w):
                        continue
                    wt = 1 / 6 if di == 0 or dj == 0 else 1 / 12
                    a[n, n] += wt
                    if (i + di, j + dj) in index:
                        a[n, index[(i + di, j + dj)]] -= wt
                    else:
                        b[n] += wt * x[c, i + di, j + dj]
        if pts:
            out[c][removed] = np.linalg.solve(a, b)
    return out


def reference(session, x, labels, a, metric, replacement, steps, patch, seed, absolute=False):
    """The MoRF and LeRF curves ``[N, K+1]`` of the target score, from the definitions."""
    n, _, h, w = x.shape
    rows, cols = -(-h // patch), -(-w // patch)
    nf = rows * cols
    rng = np.random.default_rng(seed)
    jitter = rng.random((n, nf))
    lo, hi = float(x.min()), float(x.max())
    if replacement == "noise":
        values = rng.uniform(lo, hi, size=x.shape).astype(np.float32)
    elif replacement == "mean":
        values = np.broadcast_to(x.astype(np.float64).mean(axis=0).astype(np.float32), x.shape)
    elif replacement == "zero":
        values = np.zeros_like(x)
    else:
        noise = rng.normal(0.0, 0.01 * (hi - lo), size=x.shape).astype(np.float32)
    counts = ([round(k * nf / (steps + 1)) for k in range(steps + 1)] if metric == "road"
              else list(range(steps + 1)))
    curves = {"morf": np.zeros((n, steps + 1)), "lerf": np.zeros((n, steps + 1))}
    for s in range(n):
        score = {}
        for r in range(rows):
            for c in range(cols):
                block = a[s, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
                block = np.abs(block) if absolute else block
                score[r * cols + c] = float(block.astype(np.float64).sum())
        morf = sorted(range(nf), key=lambda f: (-score[f], jitter[s, f]))
        for name, order in (("morf", morf), ("lerf", morf[::-1])):
            for k, count in enumerate(counts):
                removed = np.zeros((h, w), dtype=bool)
                for f in order[:count]:
                    r, c = divmod(f, cols)
                    removed[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = True
                if metric == "road":
                    xi = np.where(removed, ref_impute(x[s], removed) + noise[s], x[s])
                else:
                    xi = np.where(removed, values[s], x[s])
                out = session.run(None, {"input": xi[None].astype(np.float32)})[0]
                curves[name][s, k] = out[0, labels[s]]
    return curves


CASES = [("pixel-flipping", "noise", 10, 1), ("region-perturbation", "mean", 5, 2),
         ("srg", "zero", 24, 1), ("road", None, 9, 1)]


@pytest.mark.parametrize("metric,replacement,steps,patch", CASES)
def test_metric_matches_numpy_reference(metric, replacement, steps, patch) -> None:
    rng = np.random.default_rng(7)
    model = tiny_model(rng)
    x = rng.uniform(0, 1, size=(N, C, H, W)).astype(np.float32)
    x[:, :, 0, :] = 0.0  # ties in the attributions below
    labels = rng.integers(0, CLASSES, size=N)
    a = np.round(rng.normal(size=x.shape), 1).astype(np.float32) * (x > 0)
    got = evaluate(model, x, labels, attributions={"given": a}, metric=metric,
                   replacement=replacement, steps=steps, patch=patch, seed=3, batch_size=5)
    ref = reference(ort_session(model), x, labels, a, metric, replacement or "road", steps, patch,
                    seed=3)
    r = got["given"]
    exact = metric != "road"  # the imputation is solved iteratively (to 1e-6)
    for name, curve in (("morf", r.morf), ("lerf", r.lerf)):
        want = ref[name].mean(axis=0)
        if exact:
            np.testing.assert_array_equal(curve, want)
        else:
            np.testing.assert_allclose(curve, want, rtol=1e-5, atol=1e-5)
    base = ref["morf"][:, :1]
    aopc = (base - ref["morf"]).mean()
    aopc_lerf = (base - ref["lerf"]).mean()
    np.testing.assert_allclose([r.aopc, r.aopc_lerf, r.srg],
                               [aopc, aopc_lerf, (ref["lerf"] - ref["morf"]).mean()],
                               rtol=1e-12 if exact else 1e-5, atol=1e-12 if exact else 1e-5)
    assert r.srg == pytest.approx(r.aopc - r.aopc_lerf)


def test_same_seed_same_result_and_shared_draws() -> None:
    rng = np.random.default_rng(1)
    model = tiny_model(rng)
    x = rng.uniform(0, 1, size=(N, C, H, W)).astype(np.float32)
    labels = rng.integers(0, CLASSES, size=N)
    one = evaluate(model, x, labels, ["Random"], seed=5, steps=8)
    two = evaluate(model, x, labels, ["Random"], attributions={"copy": x}, seed=5, steps=8)
    np.testing.assert_array_equal(one["Random"].morf, two["Random"].morf)
    other = evaluate(model, x, labels, ["Random"], seed=6, steps=8)
    assert not np.array_equal(one["Random"].morf, other["Random"].morf)
    from lrp_onnx.errors import InvalidInput

    with pytest.raises(InvalidInput, match="method 'nan': the attributions are not finite"):
        evaluate(model, x, labels, attributions={"nan": np.full(x.shape, np.nan)})


# -- baselines against torch autograd ------------------------------------------------------------
@pytest.fixture(scope="module")
def torch_cnn(tmp_path_factory: pytest.TempPathFactory):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(6 * 4 * 4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5)).eval()
    path = tmp_path_factory.mktemp("evaluate") / "cnn.onnx"
    torch.onnx.export(net, torch.zeros(2, 1, 8, 8), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                      dynamo=False, opset_version=17)
    return net, path


def _autograd(net, x: np.ndarray, t: np.ndarray, at: float = 1.0) -> np.ndarray:
    import torch

    xt = torch.tensor(x * np.float32(at), requires_grad=True)
    net(xt)[torch.arange(len(x)), torch.tensor(t)].sum().backward()
    return xt.grad.numpy()


@pytest.mark.parametrize("spec", ["Gradient", "GradientXInput", "IntegratedGradients(steps=8)"])
def test_baselines_match_torch_autograd(torch_cnn, spec: str) -> None:
    from lrp_onnx.evaluation.methods import Attributors, parse_method

    net, path = torch_cnn
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, size=(6, 1, 8, 8)).astype(np.float32)
    t = rng.integers(0, 5, size=6)
    got = Attributors(path, "cpu", 4, 0).get(parse_method(spec))(x, t)
    if spec == "Gradient":
        want = _autograd(net, x, t)
    elif spec == "GradientXInput":
        want = x * _autograd(net, x, t)
    else:
        want = x * np.mean([_autograd(net, x, t, (i + 0.5) / 8) for i in range(8)], axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_unknown_method_and_bad_arguments() -> None:
    from lrp_onnx.errors import LRPError
    from lrp_onnx.evaluation.methods import parse_method

    for spec, words in [("Foo", "unknown method"), ("Gradient(1)", "takes no arguments"),
                        ("IntegratedGradients(steps=0)", "positive integer"),
                        ("IntegratedGradients(n=3)", "only steps")]:
        with pytest.raises(LRPError, match=words):
            parse_method(spec)
    assert parse_method("IntegratedGradients").steps == 32
    assert parse_method("EpsilonGammaBox(low=0.0, high=1.0)").kind == "lrp"


# -- the shipped digits model --------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    folder = tmp_path_factory.mktemp("digits")
    held_out = 359  # the last 20%, never seen in training (scripts/train_digits.py)
    np.save(folder / "x.npy", (d.images[-held_out:] / 16).astype(np.float32)[:, None])
    np.save(folder / "y.npy", d.target[-held_out:].astype(np.int64))
    return folder / "x.npy", folder / "y.npy"


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


EGB = "EpsilonGammaBox(low=0.0, high=1.0)"


def test_digits_orderings(digits: tuple[Path, Path], tmp_path: Path) -> None:
    """Every method beats Random; EpsilonGammaBox beats Gradient×Input under noise replacement
    (AOPC@16 and SRG); zero replacement reverses it (docs/evaluation.md)."""
    x, y = digits
    methods = [EGB, "GradientXInput", "Gradient", "EpsilonPlusFlat", "Random"]
    scores = {}
    for replacement in ("noise", "zero"):
        start = time.perf_counter()
        code, out, err = _cli("evaluate", str(MODELS / "digits_cnn.onnx"), str(x), "--labels",
                              str(y), *[f"--method={m}" for m in methods], "--steps", "16",
                              "--replacement", replacement, "--json",
                              str(tmp_path / f"{replacement}.json"))
        print(f"lrp-onnx evaluate, {len(methods)} methods, {replacement}: "
              f"{time.perf_counter() - start:.1f} s")
        assert code == 0, err
        results = json.loads((tmp_path / f"{replacement}.json").read_text())["results"]
        scores[replacement] = {r["method"]: r for r in results}
    noise, zero = scores["noise"], scores["zero"]
    for m in methods[:-1]:
        assert noise[m]["aopc"] > 1.2 * noise["Random"]["aopc"], m
        assert noise[m]["srg"] > noise["Random"]["srg"] + 1.0, m
    assert noise[EGB]["aopc"] > noise["GradientXInput"]["aopc"] + 1.0
    assert noise[EGB]["srg"] > noise["GradientXInput"]["srg"] + 3.0
    assert zero["GradientXInput"]["aopc"] > zero[EGB]["aopc"]


# -- the command line ----------------------------------------------------------------------------
def test_cli_table_json_and_plot(digits: tuple[Path, Path], tmp_path: Path) -> None:
    x, y = digits
    code, out, err = _cli("evaluate", str(MODELS / "digits_cnn.onnx"), str(x), "--labels",
                          str(y), "--method", "GradientXInput", "--method", "Random",
                          "--metric", "region-perturbation", "--steps", "8",
                          "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "c.png"))
    assert code == 0, err
    lines = out.splitlines()
    assert "region-perturbation, noise replacement, 8 steps over 16 2x2 regions" in lines[0]
    assert lines[1].split() == ["method", "AOPC", "MoRF", "AOPC", "LeRF", "SRG", "time"]
    assert lines[2].startswith("GradientXInput") and lines[3].startswith("Random")
    data = json.loads((tmp_path / "r.json").read_text())
    assert set(data) == {"results", "settings"}
    assert {"method", "aopc", "aopc_lerf", "srg", "morf", "lerf", "seconds"} <= set(
        data["results"][0])
    assert data["settings"]["metric"] == "region-perturbation"
    assert data["settings"]["patch"] == 2 and data["settings"]["steps"] == 8
    assert len(data["results"][0]["morf"]) == 9
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bad_inputs(digits: tuple[Path, Path], tmp_path: Path) -> None:
    x, y = digits
    short = tmp_path / "short.npy"
    np.save(short, np.zeros(3, dtype=np.int64))
    junk = tmp_path / "junk.npy"
    junk.write_text("not an array")
    model = str(MODELS / "digits_cnn.onnx")
    cases = [
        ([str(x), "--labels", str(short), "--method", "Random"], "short.npy: expected 359"),
        ([str(x), "--labels", str(y), "--method", "Nope"], "unknown method 'Nope'"),
        ([str(junk), "--labels", str(y), "--method", "Random"], "junk.npy: not a readable"),
        ([str(tmp_path / "missing.npy"), "--labels", str(y), "--method", "Random"],
         "missing.npy: cannot read data"),
        ([str(x), "--labels", str(y), "--method", "Random", "--metric", "pixel-flipping",
          "--patch", "2"], "pixel flipping perturbs single pixels"),
        ([str(x), "--labels", str(y), "--method", "Random", "--steps", "65"],
         "steps must be in [1, 64]"),
    ]
    compiled = tmp_path / "compiled.onnx"
    assert _cli("convert", model, str(compiled))[0] == 0
    cases.append(([str(x), "--labels", str(y), "--method", "Random"], "this is a compiled model"))
    for args, words in cases:
        out_json, out_png = tmp_path / "r.json", tmp_path / "c.png"
        which = str(compiled) if "compiled" in words else model
        code, _, err = _cli("evaluate", which, *args, "--json", str(out_json),
                            "--plot", str(out_png))
        assert code == 1, (args, err)
        assert err.count("\n") == 1 and err.startswith("lrp-onnx: error: "), err
        assert words in err, err
        assert "Traceback" not in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["compiled.onnx", "junk.npy",
                                                              "short.npy"]


def test_bench_script_runs_and_agrees_with_torch(tmp_path: Path) -> None:
    """scripts/bench_evaluate.py (smoke size): both sides run and give the same AOPC; no time
    is asserted."""
    pytest.importorskip("zennit")
    pytest.importorskip("sklearn")
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("bench_evaluate",
                                                  ROOT / "scripts" / "bench_evaluate.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    with redirect_stdout(io.StringIO()):
        assert bench.main(["--samples", "20", "--steps", "4", "--repeat", "1",
                           "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    for method in figures["methods"]:
        assert figures["aopc_onnx"][method] == pytest.approx(figures["aopc_torch"][method],
                                                             rel=1e-4, abs=1e-4)


def test_rule_file_method(digits: tuple[Path, Path], tmp_path: Path) -> None:
    """A rule file is a method; it scores as the preset it spells."""
    x, y = digits
    rules = tmp_path / "rules.toml"
    rules.write_text('preset = "EpsilonPlusFlat"\n')
    xs, ys = np.load(x)[:40], np.load(y)[:40]
    result = evaluate(MODELS / "digits_cnn.onnx", xs, ys, [str(rules), "EpsilonPlusFlat"],
                      steps=8)
    np.testing.assert_array_equal(result[str(rules)].morf, result["EpsilonPlusFlat"].morf)


def test_fashion_model_and_its_reader(tmp_path: Path) -> None:
    """models/fashion_cnn.onnx classifies most of its shipped samples; the idx reader of
    scripts/train_fashion.py reads the format's header."""
    import gzip
    import importlib.util

    from conftest import ROOT

    x = np.load(MODELS / "fashion_samples.npy")
    y = np.load(MODELS / "fashion_labels.npy")
    assert x.shape == (200, 1, 28, 28) and x.dtype == np.float32 and y.shape == (200,)
    logits = ort_session(MODELS / "fashion_cnn.onnx").run(None, {"input": x})[0]
    assert (logits.argmax(axis=1) == y).mean() > 0.8
    spec = importlib.util.spec_from_file_location("train_fashion",
                                                  ROOT / "scripts" / "train_fashion.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "t-images-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in images.shape)
    path.write_bytes(gzip.compress(header + images.tobytes()))
    np.testing.assert_array_equal(script.read_idx(path), images)
