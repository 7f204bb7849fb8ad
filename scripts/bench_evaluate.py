"""Time ``lrp_onnx.evaluate`` against the same protocol in torch (Zennit + autograd).

    python scripts/bench_evaluate.py [--samples 450] [--steps 64] [--repeat 3] [--json FILE]

The protocol: the shipped digits model (``models/digits_cnn.onnx``), the last ``--samples``
images of scikit-learn's digits, explained for their labels with EpsilonGammaBox(low=0,
high=1), Gradient×Input and Random; pixel flipping with noise replacement, ``--steps`` steps,
MoRF and LeRF. The torch side loads the same weights, attributes with Zennit (EpsilonGammaBox,
logit seed) and autograd (Gradient×Input), and perturbs and scores in torch with the same
random draws and order (``torch.set_num_threads`` = the CPU count). Both sides report their
AOPC, which agree up to float32 rounding. Wall times: best and median of ``--repeat``
interleaved runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
METHODS = ("EpsilonGammaBox(low=0.0, high=1.0)", "GradientXInput", "Random")


def load(samples: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[-samples:] / 16).astype(np.float32)[:, None]
    return x, d.target[-samples:].astype(np.int64)


def run_onnx(x: np.ndarray, y: np.ndarray, steps: int) -> tuple[float, dict[str, float]]:
    from lrp_onnx import evaluate

    start = time.perf_counter()
    result = evaluate(MODEL, x, y, METHODS, steps=steps, seed=0)
    return time.perf_counter() - start, {r.method: r.aopc for r in result.results}


def _torch_model() -> Any:
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_digits

    return train_digits.load_weights(train_digits.build_model(), MODEL)


def _attribute(net: Any, method: str, x: Any, y: Any, rng: np.random.Generator) -> Any:
    import torch

    if method == "Random":
        return torch.from_numpy(rng.random(tuple(x.shape), dtype=np.float32))
    xg = x.clone().requires_grad_(True)
    if method == "GradientXInput":
        net(xg)[torch.arange(len(x)), y].sum().backward()
        return (xg.grad * x).detach()
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonGammaBox

    with Gradient(net, EpsilonGammaBox(low=0.0, high=1.0)) as attributor:
        out = net(x)
        seed = torch.zeros_like(out)
        seed[torch.arange(len(x)), y] = out[torch.arange(len(x)), y]
        _, rel = attributor(x, seed)
    return rel.detach()


def run_torch(x_np: np.ndarray, y_np: np.ndarray, steps: int) -> tuple[float, dict[str, float]]:
    """The same protocol in torch: same draws (numpy, seed 0), same order, torch forward."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    net = _torch_model()
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    n = len(x)
    rng = np.random.default_rng(0)
    jitter = rng.random((n, 64))
    values = torch.from_numpy(rng.uniform(float(x_np.min()), float(x_np.max()),
                                          size=x_np.shape).astype(np.float32))
    aopc = {}
    for method in METHODS:
        a = _attribute(net, method, x, y, np.random.default_rng([0, 1]))
        scores = a.double().sum(dim=1).reshape(n, -1).numpy()
        order = np.lexsort((jitter, -scores), axis=-1)
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(64)[None], axis=-1)
        drops = []
        with torch.no_grad():
            base = net(x)[torch.arange(n), y]
            for r in (ranks, 63 - ranks):
                pix = torch.from_numpy(r.reshape(n, 1, 8, 8))
                counts = torch.arange(1, steps + 1).reshape(-1, 1, 1, 1, 1)
                xs = torch.where(pix[None] < counts, values[None], x[None]).reshape(-1, 1, 8, 8)
                out = torch.cat([net(b) for b in xs.split(256)]).reshape(steps, n, -1)
                f = out[:, torch.arange(n), y].T.double()
                drops.append(float((base[:, None].double() - torch.cat(
                    [base[:, None].double(), f], dim=1)).mean()))
        aopc[method] = drops[0]
    return time.perf_counter() - start, aopc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=450)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    x, y = load(args.samples)
    onnx_runs, torch_runs = [], []
    for _ in range(args.repeat):  # interleaved, so that both see the same machine load
        onnx_runs.append(run_onnx(x, y, args.steps))
        torch_runs.append(run_torch(x, y, args.steps))
    t_onnx, aopc_onnx = min(onnx_runs, key=lambda r: r[0])
    t_torch, aopc_torch = min(torch_runs, key=lambda r: r[0])
    med_onnx = float(np.median([r[0] for r in onnx_runs]))
    med_torch = float(np.median([r[0] for r in torch_runs]))
    print(f"{args.samples} images x {len(METHODS)} methods x {args.steps} steps, MoRF + LeRF, "
          f"{os.cpu_count()} CPU cores")
    print(f"lrp_onnx.evaluate (ONNX Runtime): best {t_onnx:.2f} s, median {med_onnx:.2f} s")
    print(f"torch + Zennit, same protocol:    best {t_torch:.2f} s, median {med_torch:.2f} s "
          f"({t_torch / t_onnx:.1f}x slower, medians {med_torch / med_onnx:.1f}x)")
    for m in METHODS:
        print(f"  AOPC MoRF {m}: onnx {aopc_onnx[m]:.4f}, torch {aopc_torch[m]:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "samples": args.samples, "steps": args.steps, "methods": list(METHODS),
            "onnx_seconds": t_onnx, "torch_seconds": t_torch,
            "onnx_median_seconds": med_onnx, "torch_median_seconds": med_torch,
            "aopc_onnx": aopc_onnx, "aopc_torch": aopc_torch}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
