"""Export small Keras CNNs through tf2onnx into the test fixtures ``tests/data/keras_*.onnx``.

    /work/venv-tf/bin/python scripts/export_keras_cnn.py [--out tests/data] [--check]

Needs TensorFlow, which the project's own environment does not have; a separate venv::

    python3 -m venv /work/venv-tf
    /work/venv-tf/bin/pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0 tf-keras==2.21.0

(checked 2026-12-05 with these versions, Python 3.11, onnx 1.23.2 and protobuf 7.36 as pip
resolved them). The tests (``tests/test_exporters_tf.py``) read the committed files and never
import TensorFlow.

Two exporter routes (users meet both), each with tf2onnx's optimizers on and off:

* ``keras_cnn.onnx``: a ``tf_keras`` (Keras 2, ``TF_USE_LEGACY_KERAS=1``) model through
  ``tf2onnx.convert.from_keras``, opset 15, all tf2onnx optimizers on (the default). Layers:
  Conv2D(3->4, 3x3, ``same``) + ReLU, MaxPooling2D 2x2, Conv2D(4->6, 3x3, ``valid``) + ReLU,
  Flatten, Dense(216->8) + ReLU, Dense(8->5) logits (no softmax).
* ``keras3_cnn_softmax.onnx``: the same layers in Keras 3 (``keras`` 3.x, TF 2.21's default),
  with AveragePooling2D instead of MaxPooling2D and a final ``softmax`` activation.
  ``tf2onnx.convert.from_keras`` fails on Keras 3 models in tf2onnx 1.17 (``KeyError:
  'keras_tensor_6'``: it looks the output up by the Keras tensor's name), so the model is wrapped
  in a ``tf.function`` and converted with ``from_function``, opset 15. This route keeps the
  Flatten's target shape computed at run time (``Shape -> Gather -> Cast -> Slice -> Concat ->
  Cast -> Reshape``), which the first route folds to a constant.
* ``keras_cnn_unoptimized.onnx``: the first model converted with ``optimizers={}`` (tf2onnx's
  optimizers off): each NHWC Conv2D and the MaxPool is wrapped in its own
  ``Transpose -> op -> Transpose`` pair, the ReLUs run in NHWC between them, the Flatten's shape
  is ``Cast`` of an int32 constant and the output passes two ``Identity`` nodes.
* ``keras_depthwise.onnx`` / ``keras_depthwise_unoptimized.onnx``: DepthwiseConv2D(3x3, ``same``)
  + ReLU, Conv2D(3->4, 1x1) + ReLU, GlobalAveragePooling2D, Dense(4->5) on ``[N, 8, 8, 3]``, with
  the optimizers on (a ``Conv`` with ``group=3``, ``GlobalAveragePool``, ``Squeeze``) and off. Off,
  the depthwise weight is computed from initializers, ``Transpose(perm=[3, 2, 0, 1])`` of
  ``Reshape(W_hwcm, shape)``, its bias is a separate NHWC ``Add`` after the output Transpose, and
  the pooling is ``ReduceMean(axes=[1, 2])`` in NHWC: the form tf2onnx writes before its constant
  folding, which ``lrp_onnx`` needs to fold itself (docs/wild-models.md).

Every model takes float32 ``input`` ``[N, H, W, C]`` (NHWC, dynamic batch). Weights are not
trained: they are drawn from ``numpy.random.default_rng(SEED)`` (``normal(0, 1/sqrt(fan_in))``,
biases ``normal(0, 0.1)``, float32) and set with ``set_weights``, so they do not depend on
TensorFlow's initializers. ``keras_samples.npz`` holds ``x_<architecture>`` (float32
``[4, H, W, C]``, uniform in ``[0, 1)``) and, per model, Keras's own outputs on it (``<stem>``),
which the tests compare with ONNX Runtime's (the conversion is faithful).

``--check`` exports into a temporary folder and exits 1 unless the weights and the Keras outputs
equal the shipped ones (the ONNX bytes carry tf2onnx's version and node names, which may change
between releases, so the bytes are not compared).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

# tf.keras is tf_keras (Keras 2), which tf2onnx.convert.from_keras understands; ``import keras``
# still gives Keras 3.
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

SEED = 0x19
OPSET = 15
CLASSES = 5
#: stem -> (Keras flavour, architecture, final activation, tf2onnx optimizers: None = all)
MODELS: dict[str, tuple[str, str, str | None, Any]] = {
    "keras_cnn": ("tf_keras", "cnn_max", None, None),
    "keras3_cnn_softmax": ("keras3", "cnn_avg", "softmax", None),
    "keras_cnn_unoptimized": ("tf_keras", "cnn_max", None, {}),
    "keras_depthwise": ("tf_keras", "depthwise", None, None),
    "keras_depthwise_unoptimized": ("tf_keras", "depthwise", None, {}),
}
#: input shape (NHWC, without the batch) per architecture
SHAPES = {"cnn_max": (16, 16, 3), "cnn_avg": (16, 16, 3), "depthwise": (8, 8, 3)}


def _layers(keras: Any, arch: str, activation: str | None) -> Any:
    layers = keras.layers
    if arch == "depthwise":
        body = [layers.DepthwiseConv2D(3, padding="same", activation="relu"),
                layers.Conv2D(4, 1, activation="relu"),
                layers.GlobalAveragePooling2D()]
    else:
        pool = layers.MaxPooling2D(2) if arch == "cnn_max" else layers.AveragePooling2D(2)
        body = [layers.Conv2D(4, 3, padding="same", activation="relu"),
                pool,
                layers.Conv2D(6, 3, padding="valid", activation="relu"),
                layers.Flatten(),
                layers.Dense(8, activation="relu")]
    return keras.Sequential([keras.Input(SHAPES[arch]), *body,
                             layers.Dense(CLASSES, activation=activation)])


def _seeded_weights(model: Any) -> list[np.ndarray]:
    rng = np.random.default_rng(SEED)
    weights = []
    for w in model.get_weights():
        if w.ndim == 1:  # bias
            weights.append(rng.normal(0.0, 0.1, w.shape).astype(np.float32))
        else:  # HWIO kernel or [in, out] dense matrix
            fan_in = int(np.prod(w.shape[:-1]))
            weights.append(rng.normal(0.0, 1.0 / np.sqrt(fan_in), w.shape).astype(np.float32))
    return weights


def export(stem: str, x: np.ndarray) -> tuple[onnx.ModelProto, np.ndarray, list[np.ndarray]]:
    """Build, seed and convert one model; returns (ONNX model, Keras outputs on x, weights)."""
    flavour, arch, activation, optimizers = MODELS[stem]
    import tensorflow as tf
    import tf2onnx

    if flavour == "tf_keras":
        import tf_keras as keras
    else:
        import keras  # type: ignore[no-redef]
    model = _layers(keras, arch, activation)
    weights = _seeded_weights(model)
    model.set_weights(weights)
    spec = (tf.TensorSpec((None, *SHAPES[arch]), tf.float32, name="input"),)
    if flavour == "tf_keras":
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET,
                                              optimizers=optimizers)
    else:
        fn = tf.function(lambda t: model(t), input_signature=spec)
        assert optimizers is None, "from_function always runs tf2onnx's optimizers"
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=OPSET)
    outputs = np.asarray(model(x, training=False), np.float32)
    return proto, outputs, weights


def export_all(out: Path) -> None:
    samples: dict[str, np.ndarray] = {}
    for arch, shape in SHAPES.items():
        samples[f"x_{arch}"] = np.random.default_rng(SEED + 1).random((4, *shape)).astype(
            np.float32)
    for stem in MODELS:
        proto, outputs, _ = export(stem, samples[f"x_{MODELS[stem][1]}"])
        onnx.save(proto, out / f"{stem}.onnx")
        samples[stem] = outputs
    np.savez(out / "keras_samples.npz", **samples)


def _float_inits(path: Path) -> list[np.ndarray]:
    model = onnx.load(path)
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer]
    return sorted((a for a in arrays if a.dtype == np.float32), key=lambda a: (a.shape, a.sum()))


def check(shipped: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        export_all(fresh)
        bad = []
        a, b = np.load(shipped / "keras_samples.npz"), np.load(fresh / "keras_samples.npz")
        bad += [f"keras_samples.npz[{k}]" for k in a.files if not np.array_equal(a[k], b[k])]
        for stem in MODELS:
            old, new = _float_inits(shipped / f"{stem}.onnx"), _float_inits(fresh / f"{stem}.onnx")
            if len(old) != len(new) or not all(np.array_equal(p, q) for p, q in zip(old, new)):
                bad.append(f"{stem}.onnx weights")
    if bad:
        print("differs from the shipped files: " + ", ".join(bad), file=sys.stderr)
        return 1
    print("the shipped fixtures match a fresh export")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "tests" / "data")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if args.check:
        return check(args.out)
    export_all(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
