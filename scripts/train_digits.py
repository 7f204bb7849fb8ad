"""Train a small CNN on scikit-learn's handwritten digits and export it to models/digits_cnn.onnx.

    python scripts/train_digits.py [--out models] [--check] [--figures docs/images]

The data is ``sklearn.datasets.load_digits`` (1,797 grey 8x8 images, pixel values 0..16, bundled
with scikit-learn: no download). The last 20% (359 images, in the data set's order) are held out;
the model never sees them during training. Training is reproducible: fixed seeds, one thread,
``torch.use_deterministic_algorithms(True)``, a fixed shuffling generator; it takes a few
seconds on one CPU core.

The model's input is ``pixels / 16`` (values in ``[0, 1]``), named ``input``, float32
``[N, 1, 8, 8]`` with a dynamic batch axis; the scaling is done by the caller (it is not part of
the ONNX graph). The output ``logits`` is ``[N, 10]``. Layers: Conv(1->16, 3x3, pad 1) + ReLU,
Conv(16->32, 3x3, pad 1) + ReLU, MaxPool 2x2, Flatten, Linear(512->64) + ReLU, Linear(64->10).

Writes into ``--out`` (default ``models/``):

* ``digits_cnn.onnx``: legacy exporter, opset 17, ``ir_version`` 8 (ONNX Runtime 1.31 rejects
  the newer IR versions onnx stamps), byte-reproducible (see below);
* ``digits_samples.npy``: float32 ``[10, 1, 8, 8]``, the first held-out image of each digit
  0..9 that the model classifies correctly, already scaled (``pixels / 16``);
* ``digits_labels.npy``: int64 ``[10]``, their labels (``0..9``).

``--check`` retrains into a temporary folder and exits 1 unless all three files are identical to
the shipped ones. ``--figures DIR`` draws ``DIR/digits_epsilon_plus_flat.png`` from the shipped
files (see ``docs/heatmaps.md``).

Byte-identity: the same script gives the same bytes for the same torch build (checked here
with torch 2.14.1 on an AVX-512 CPU, and with ``ATEN_CPU_CAPABILITY=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2`` standing in for an AVX2-only CPU).
Training runs in float64 so that instruction-set-specific rounding does not reach the float32
weights (see :func:`train`); another torch release, another CPU architecture (e.g. aarch64) or
torch's non-vectorised fallback (``ATEN_CPU_CAPABILITY=default``, which changed the weights in
that check) may still give different weights, and ``--check`` then says so.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
ONNX_NAME = "digits_cnn.onnx"
SAMPLES_NAME = "digits_samples.npy"
LABELS_NAME = "digits_labels.npy"
FILES = (ONNX_NAME, SAMPLES_NAME, LABELS_NAME)

SEED = 0
EPOCHS = 30
BATCH = 32
LR = 3e-3
HELD_OUT = 0.2
SCALE = 16.0        # load_digits pixel values are 0..16; the model's input is pixels / SCALE
IR_VERSION = 8      # ONNX Runtime 1.31 rejects the IR versions newer onnx releases stamp


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: scaled float32 ``[n, 1, 8, 8]`` and int64 labels;
    the last 20% of ``load_digits`` (in its order) is the held-out test set."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(SCALE))[:, None]
    y = digits.target.astype(np.int64)
    n_train = len(x) - int(round(HELD_OUT * len(x)))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def build_model(seed: int = SEED) -> Any:
    """The untrained CNN (``torch.manual_seed(seed)`` initialisation), ``[N,1,8,8] -> [N,10]``."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def load_weights(model: Any, onnx_path: str | os.PathLike[str]) -> Any:
    """Copy the initializers of an exported ``digits_cnn.onnx`` into ``model`` (``build_model()``);
    returns it in eval mode. The legacy exporter keeps the torch parameter names."""
    import onnx
    import torch
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_path))
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    state = model.state_dict()
    missing = sorted(set(state) - set(weights))
    if missing:
        raise ValueError(f"{onnx_path}: no initializers for {missing}")
    model.load_state_dict({k: torch.from_numpy(np.array(weights[k])) for k in state})
    return model.eval()


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y``."""
    return float((predict(model, x) == y).mean())


def predict(model: Any, x: np.ndarray) -> np.ndarray:
    """Argmax class of each sample (int64)."""
    import torch

    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(x)))
    pred: np.ndarray = logits.argmax(dim=1).numpy().astype(np.int64)
    return pred


def shift(x: Any, gen: Any) -> Any:
    """Each image of a batch ``[n, 1, 8, 8]`` moved by a random -1, 0 or +1 pixel along each
    axis (zero fill), drawn from ``gen``: the training augmentation."""
    import torch

    pad = torch.nn.functional.pad(x, (1, 1, 1, 1))
    off = torch.randint(0, 3, (len(x), 2), generator=gen)
    out = torch.empty_like(x)
    for dy in range(3):
        for dx in range(3):
            sel = (off[:, 0] == dy) & (off[:, 1] == dx)
            out[sel] = pad[sel, :, dy:dy + 8, dx:dx + 8]
    return out


def train(seed: int = SEED, epochs: int = EPOCHS) -> tuple[Any, float]:
    """Train :func:`build_model` reproducibly; returns ``(model in eval mode, held-out accuracy)``.

    Adam (lr 3e-3), 30 epochs, batches of 32 reshuffled each epoch and shifted by up to one
    pixel (:func:`shift`), both drawn from one seeded generator; cross-entropy loss.
    Runs on one thread with deterministic algorithms; the process-wide settings are restored.

    Training runs in float64 and the trained weights are rounded to float32. CPU kernels differ
    in their last bits from one instruction set to another (AVX2 vs AVX-512 vector widths change
    summation orders; vectorised ``exp``/``log``), and training amplifies such bits: trained in
    float32 under ``ATEN_CPU_CAPABILITY=avx2`` (MKL and oneDNN limited to AVX2 too) instead of
    AVX-512, the weights ended up to 47% apart. In float64 the two runs ended 1.7e-13 apart
    (relative, max), far below float32's resolution: the rounded weights, and so the ONNX file,
    were identical.
    """
    import torch

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        x_train, y_train, x_test, y_test = load_data()
        model = build_model(seed).double()
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        gen = torch.Generator().manual_seed(seed)
        xt, yt = torch.from_numpy(x_train).double(), torch.from_numpy(y_train)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(xt), generator=gen)
            for start in range(0, len(xt), BATCH):
                idx = order[start:start + BATCH]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(shift(xt[idx], gen)), yt[idx])
                torch.autograd.backward(loss)
                opt.step()
        model = model.float().eval()   # float32 from here on: export, accuracy, samples
        return model, accuracy(model, x_test, y_test)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def export_bytes(model: Any, held_out_accuracy: float) -> bytes:
    """The serialized ONNX model: legacy exporter, opset 17, dynamic batch, ``ir_version`` 8."""
    import onnx
    import torch

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # "You are using the legacy TorchScript-based ONNX export": chosen on purpose.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), f"{tmp}/model.onnx", dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
        proto = onnx.load(f"{tmp}/model.onnx")
    proto.ir_version = IR_VERSION
    proto.doc_string = ("Small CNN trained on scikit-learn's handwritten digits "
                        "(scripts/train_digits.py). input: float32 [N,1,8,8], pixel values / 16 "
                        "(in [0, 1]); logits: [N,10], classes 0..9.")
    onnx.helper.set_model_props(proto, {"held_out_accuracy": f"{held_out_accuracy:.4f}"})
    onnx.checker.check_model(proto, full_check=True)
    return bytes(proto.SerializeToString())


def pick_samples(model: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(samples, labels)``: the first correctly classified held-out image of each digit."""
    _, _, x_test, y_test = load_data()
    pred = predict(model, x_test)
    idx = [int(np.flatnonzero((y_test == d) & (pred == d))[0]) for d in range(10)]
    return x_test[idx].astype(np.float32), y_test[idx].astype(np.int64)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_all(out: str | os.PathLike[str], *, seed: int = SEED, epochs: int = EPOCHS
              ) -> dict[str, float]:
    """Train, export and write the three files into ``out``; returns accuracy and seconds."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, acc = train(seed, epochs)
    seconds = time.perf_counter() - start
    samples, labels = pick_samples(model)
    _write_atomic(out / ONNX_NAME, export_bytes(model, acc))
    _write_atomic(out / SAMPLES_NAME, _npy_bytes(samples))
    _write_atomic(out / LABELS_NAME, _npy_bytes(labels))
    return {"held_out_accuracy": acc, "train_seconds": seconds}


def check(shipped: str | os.PathLike[str] = MODELS) -> list[str]:
    """Retrain into a temporary folder; the names of the shipped files that differ (or miss)."""
    with tempfile.TemporaryDirectory() as tmp:
        write_all(tmp)
        return [name for name in FILES
                if not (Path(shipped) / name).is_file()
                or (Path(shipped) / name).read_bytes() != (Path(tmp) / name).read_bytes()]


# -- figures ----------------------------------------------------------------------------------
TILE = 16   # screen pixels per digit pixel in the figures
GAP = 6     # screen pixels between tiles


def _tile(rgb: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(rgb, TILE, axis=0), TILE, axis=1)


def input_rgb(sample: np.ndarray) -> np.ndarray:
    """A scaled digit ``[1, 8, 8]`` as uint8 RGB ``(8, 8, 3)``: dark ink on white paper."""
    grey = np.rint(255.0 * (1.0 - np.clip(sample[0], 0.0, 1.0))).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def figure_grid(rows: list[list[np.ndarray]]) -> np.ndarray:
    """Tiles (uint8 ``(8, 8, 3)`` each) upscaled and laid out in a grid on a light grey
    background, one list per row."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    side = 8 * TILE
    grid = np.full((GAP + n_rows * (side + GAP), GAP + n_cols * (side + GAP), 3), 200, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            top, left = GAP + i * (side + GAP), GAP + j * (side + GAP)
            grid[top:top + side, left:left + side] = _tile(tile)
    return grid


def render_figures(out_dir: str | os.PathLike[str], models: str | os.PathLike[str] = MODELS
                   ) -> list[Path]:
    """Draw ``digits_epsilon_plus_flat.png`` into ``out_dir`` from the shipped model and samples.

    One column per digit 0..9. Rows: the digit (dark ink on white, :func:`input_rgb`); its
    EpsilonPlusFlat heatmap for the true class (:func:`lrp_onnx.cli.heatmap.heatmap`, defaults);
    that heatmap over the digit (:func:`lrp_onnx.cli.heatmap.overlay`, alpha 0.5); the EpsilonPlus
    heatmap (z⁺ instead of Flat on the first conv), to show what Flat does at the input layer.
    """
    from lrp_onnx import LRP, EpsilonPlus, EpsilonPlusFlat
    from lrp_onnx.cli.heatmap import heatmap, overlay, save_png

    models = Path(models)
    x = np.load(models / SAMPLES_NAME)
    y = np.load(models / LABELS_NAME)
    digits = [input_rgb(s) for s in x]
    heat = {}
    for name, composite in (("flat", EpsilonPlusFlat()), ("plus", EpsilonPlus())):
        rel = LRP(models / ONNX_NAME, composite).analyze(x, y, device="cpu").relevance
        heat[name] = [heatmap(r) for r in rel]
    rows = [digits, heat["flat"], [overlay(h, d) for h, d in zip(heat["flat"], digits)],
            heat["plus"]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "digits_epsilon_plus_flat.png"
    save_png(figure_grid(rows), path)
    return [path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", default=str(MODELS), help="output folder (default: models/)")
    parser.add_argument("--check", action="store_true",
                        help="retrain into a temporary folder and compare with the files in --out")
    parser.add_argument("--figures", metavar="DIR",
                        help="draw the docs figures from the files in --out into DIR instead")
    args = parser.parse_args(argv)
    if args.figures:
        for path in render_figures(args.figures, args.out):
            print(f"wrote {path}")
        return 0
    if args.check:
        differ = check(args.out)
        for name in differ:
            print(f"DIFFERS: {Path(args.out) / name}", file=sys.stderr)
        print("check: " + ("files differ" if differ else "all files identical"))
        return 1 if differ else 0
    info = write_all(args.out)
    print(f"held-out accuracy {info['held_out_accuracy']:.4f} "
          f"(trained in {info['train_seconds']:.1f} s); wrote {', '.join(FILES)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
