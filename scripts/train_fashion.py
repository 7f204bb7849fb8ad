"""Train a small CNN on Fashion-MNIST and export it to models/fashion_cnn.onnx (for
docs/evaluation.md's second data set).

    apt-get install dataset-fashion-mnist      # Debian: Expat (MIT), (c) 2017 Zalando SE
    python scripts/train_fashion.py [--data /usr/share/datasets/fashion-mnist] [--out models]

The data are the Debian package's idx files (60,000 training and 10,000 test images, 28x28,
10 classes); nothing is downloaded. The model's input is ``pixels / 255`` (in ``[0, 1]``),
float32 ``[N, 1, 28, 28]``, named ``input``; the output ``logits`` is ``[N, 10]``. Layers:
Conv(1->16, 3x3, pad 1) + ReLU, MaxPool 2, Conv(16->32, 3x3, pad 1) + ReLU, MaxPool 2, Flatten,
Linear(1568->64) + ReLU, Linear(64->10) (105,866 parameters). Adam (lr 1e-3), batch 64,
3 epochs, seed 0, two threads.

Writes into ``--out``: ``fashion_cnn.onnx`` (legacy exporter, opset 17, ``ir_version`` 8),
``fashion_samples.npy`` (float32 ``[200, 1, 28, 28]``: the first 200 test images, scaled) and
``fashion_labels.npy`` (int64 ``[200]``). Training is seeded but not bit-reproducible across
machines (float32, two threads).
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = Path("/usr/share/datasets/fashion-mnist")
SAMPLES = 200
IR_VERSION = 8


def read_idx(path: Path) -> np.ndarray:
    """An idx file (``.gz``) as a numpy array (uint8 images ``[n, 28, 28]`` or labels ``[n]``)."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: scaled float32 ``[n, 1, 28, 28]`` and int64 labels of ``train`` or ``t10k``."""
    x = read_idx(folder / f"{part}-images-idx3-ubyte.gz").astype(np.float32)[:, None] / 255
    y = read_idx(folder / f"{part}-labels-idx1-ubyte.gz").astype(np.int64)
    return x, y


def build_model(seed: int = 0) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))


def train(folder: Path, epochs: int = 3, seed: int = 0) -> tuple[Any, float, float]:
    """``(model in eval mode, test accuracy, training seconds)``."""
    import torch

    torch.set_num_threads(2)
    x, y = load(folder, "train")
    xt, yt = load(folder, "t10k")
    model = build_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=gen)
        for i in range(0, len(xs), 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
            opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(b) for b in torch.from_numpy(xt).split(1000)]).argmax(1)
    return model, float((pred.numpy() == yt).mean()), seconds


def export(model: Any, path: Path, accuracy: float) -> None:
    import onnx
    import torch

    from lrp_onnx.testing.oracle import export as export_onnx

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        proto = onnx.load(str(export_onnx(model, f"{tmp}/m.onnx", torch.zeros(1, 1, 28, 28))))
    proto.ir_version = IR_VERSION
    proto.doc_string = ("Small CNN trained on Fashion-MNIST (scripts/train_fashion.py). input: "
                        "float32 [N,1,28,28], pixels / 255; logits: [N,10].")
    onnx.helper.set_model_props(proto, {"test_accuracy": f"{accuracy:.4f}"})
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "models")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    if not (args.data / "t10k-images-idx3-ubyte.gz").is_file():
        print(f"{args.data}: no Fashion-MNIST idx files (apt-get install dataset-fashion-mnist)",
              file=sys.stderr)
        return 1
    model, acc, seconds = train(args.data, args.epochs)
    args.out.mkdir(parents=True, exist_ok=True)
    export(model, args.out / "fashion_cnn.onnx", acc)
    x, y = load(args.data, "t10k")
    np.save(args.out / "fashion_samples.npy", x[:SAMPLES])
    np.save(args.out / "fashion_labels.npy", y[:SAMPLES])
    print(f"test accuracy {acc:.4f}, trained in {seconds:.1f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
