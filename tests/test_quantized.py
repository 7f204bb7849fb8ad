"""Quantized (QDQ) models explained as deployed, against Zennit on a torch copy.

The models are quantized here with ``onnxruntime.quantization.quantize_static``
(``QuantFormat.QDQ``, int8 activations and weights, per-tensor and per-channel): a small
torch-exported CNN (conv/relu/pool/linear) calibrated on seeded random inputs, and the shipped
``models/digits_cnn.onnx`` calibrated on ``models/digits_samples.npy``. Each compiles, passes
``lrp_onnx.check.check_model``, and is compared with Zennit on a torch model built from the
quantized file alone (:func:`qdq_torch`): weights and biases dequantized with numpy from the int8
/ int32 initializers (``(q - zp) * scale`` per channel), and every ``QuantizeLinear ->
DequantizeLinear`` pair of the data path a :class:`FakeQuant` module, ``torch.fake_quantize_
per_tensor_affine`` with the pair's scale and zero point in the forward pass and the identity in
the backward pass (relevance passes the pair unchanged, as in the compiled model).

Tolerance: the float models' bound (``oracle.MAX_REL_L2`` = 1e-4 relative L2 and correlation
``oracle.MIN_CORR`` = 0.9999 per sample, tests/test_zennit.py), not widened. Both sides round
the activations to the same int8 grid, so what differs is float32 summation order in the
pre-activations (~1e-7 relative) and, as for the float models, our ZeroRule on MaxPool against
Zennit's plain gradient (a factor ``y / (y + 1e-6)`` at the winners). A pre-activation within
float32 rounding of a rounding midpoint could land one quantization step apart on the two
sides; on these models and inputs none does (the outputs agree to float32 rounding, asserted
first). Measured: up to 1.6e-5 relative L2 (see docs/wild-models.md, "Quantized (QDQ) models").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")
zennit = pytest.importorskip("zennit")
quantization = pytest.importorskip("onnxruntime.quantization")

import zennit.composites as zc  # noqa: E402

import lrp_onnx as L  # noqa: E402
from conftest import ort_session  # noqa: E402
from lrp_onnx.check import check_model  # noqa: E402
from lrp_onnx.testing import oracle  # noqa: E402
from lrp_onnx.testing.quantized import quantize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COMPOSITES = [("EpsilonPlus", L.EpsilonPlus, zc.EpsilonPlus),
              ("EpsilonAlpha2Beta1Flat", L.EpsilonAlpha2Beta1Flat, zc.EpsilonAlpha2Beta1Flat)]


# -- quantizing -------------------------------------------------------------------------------
def small_cnn() -> object:
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 10)).eval()


# -- the torch oracle, built from the quantized file ------------------------------------------
class FakeQuant(torch.nn.Module):
    """``DequantizeLinear(QuantizeLinear(x))`` forward (scale, zero point of the pair), identity
    backward: relevance passes through unchanged."""

    def __init__(self, scale: float, zero_point: int, low: int, high: int) -> None:
        super().__init__()
        self.args = (float(scale), int(zero_point), int(low), int(high))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fq = torch.fake_quantize_per_tensor_affine(x, *self.args)
        return x + (fq - x).detach()


def dequantized(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The float value of the ``DequantizeLinear`` output ``name`` (an initializer's), from the
    formula ``(q - zp) * scale`` along the node's axis, in float32 as ONNX Runtime computes it."""
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.output[0] == name)
    assert node.op_type == "DequantizeLinear", name
    q, scale = init[node.input[0]], init[node.input[1]]
    zero = init[node.input[2]] if len(node.input) > 2 else np.zeros_like(scale, dtype=q.dtype)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    shape = [1] * q.ndim
    if scale.size > 1:  # per channel along ``axis`` (a 1-D bias has only axis 0)
        shape[axis if q.ndim > 1 else 0] = -1
    diff = (q.astype(np.int64) - zero.astype(np.int64).reshape(shape)).astype(np.float32)
    return diff * scale.reshape(shape)


def qdq_torch(model: onnx.ModelProto) -> object:
    """A ``torch.nn.Sequential`` computing the QDQ chain model: FakeQuant per Q/DQ pair, the
    float layers with dequantized weights (Conv, Gemm with transB=1, MaxPool, Flatten, Relu)."""
    from torch import nn

    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    modules: list[nn.Module] = []
    for n in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "DequantizeLinear" and n.input[0] in init:
            continue  # a weight: read by its layer below
        if n.op_type == "QuantizeLinear":
            (dq,) = readers[n.output[0]]
            zp = init[n.input[2]]
            info = np.iinfo(zp.dtype)
            modules.append(FakeQuant(float(init[n.input[1]]), int(zp), info.min, info.max))
        elif n.op_type == "DequantizeLinear":
            continue  # the second half of the pair above
        elif n.op_type == "Conv":
            w, b = dequantized(model, n.input[1]), dequantized(model, n.input[2])
            pads = attrs.get("pads", [0, 0, 0, 0])
            assert pads[:2] == pads[2:], pads
            conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], stride=attrs.get("strides", 1),
                             padding=tuple(pads[:2]))
            with torch.no_grad():
                conv.weight.copy_(torch.from_numpy(w))
                conv.bias.copy_(torch.from_numpy(b))
            modules.append(conv)
        elif n.op_type == "Gemm":
            assert attrs.get("transB") == 1
            w, b = dequantized(model, n.input[1]), dequantized(model, n.input[2])
            dense = nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                dense.weight.copy_(torch.from_numpy(w))
                dense.bias.copy_(torch.from_numpy(b))
            modules.append(dense)
        elif n.op_type == "MaxPool":
            modules.append(nn.MaxPool2d(attrs["kernel_shape"], attrs.get("strides")))
        elif n.op_type == "Flatten":
            modules.append(nn.Flatten())
        elif n.op_type == "Relu":
            modules.append(nn.ReLU())
        else:
            raise AssertionError(f"no torch twin for {n.op_type}")
    return nn.Sequential(*modules).eval()


class _Residual(torch.nn.Module):
    """A ResNet basic block between a stem and a head (BatchNorm folded by the exporter)."""

    def __init__(self) -> None:
        super().__init__()
        from torch import nn

        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                   nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6))
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(6, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(h + self.block(h))


def residual_cnn() -> torch.nn.Module:
    torch.manual_seed(1)
    net = _Residual()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


# -- fixtures -----------------------------------------------------------------------------------
def _inputs(shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, np.ndarray]]:
    """``{name: (quantized model path, test inputs)}``."""
    tmp = tmp_path_factory.mktemp("qdq")
    cnn = oracle.export(small_cnn(), tmp / "cnn.onnx", torch.zeros(1, 3, 12, 12))
    resnet = oracle.export(residual_cnn(), tmp / "resnet.onnx", torch.zeros(1, 3, 12, 12))
    digits = ROOT / "models" / "digits_cnn.onnx"
    samples = np.load(ROOT / "models" / "digits_samples.npy").astype(np.float32)
    calib = _inputs((3, 12, 12), 16, 1)
    return {
        "cnn_per_tensor": (quantize(cnn, tmp / "cnn_q.onnx", calib, False),
                           _inputs((3, 12, 12), 6, 2)),
        "cnn_per_channel": (quantize(cnn, tmp / "cnn_qc.onnx", calib, True),
                            _inputs((3, 12, 12), 6, 2)),
        "digits_per_channel": (quantize(digits, tmp / "digits_q.onnx", samples, True), samples),
        "resnet_per_channel": (quantize(resnet, tmp / "resnet_qc.onnx", calib, True),
                               _inputs((3, 12, 12), 6, 2)),
    }


# -- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cnn_per_tensor", "cnn_per_channel", "digits_per_channel",
                                  "resnet_per_channel"])
def test_quantized_model_compiles_as_deployed(models, name: str) -> None:
    """Compiles, keeps the int8 forward pass, gets the sign facts right and passes ``check``
    (for the residual block too, whose ``Add`` reads two dequantized branches; its Zennit twin
    is not built: ``qdq_torch`` reads chains only)."""
    path, _ = models[name]
    model = onnx.load(str(path))
    lrp = L.LRP(model, L.EpsilonPlus())
    kinds = [la.kind for la in lrp.layers]
    assert kinds[0] == "QuantizeDequantize" and "QuantizeDequantize" in kinds[1:]
    assert ("Add" in kinds) == name.startswith("resnet")
    # sign facts: a pair clamping at zero (zero point = int8 minimum, the dropped ReLU) gives
    # values >= 0, others do not (the CNN's input pair; the digits' pixels are >= 0, so their
    # calibrated input range starts at 0 too)
    from lrp_onnx.api import prepare

    graph = prepare(model, None, None, None).graph
    pairs = [la for la in lrp.layers if la.kind == "QuantizeDequantize"]
    zero_points = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for la in pairs:
        clamps = int(zero_points[la.primary.inputs[2].name]) == -128
        assert graph.is_nonneg(la.output) == clamps, la
    assert any(graph.is_nonneg(la.output) for la in pairs)
    compiled = lrp.model
    # the forward pass is the int8 model's: every QuantizeLinear/DequantizeLinear kept, weights
    # stored as int8 (plus the float copies the relevance pass reads)
    ops = [n.op_type for n in compiled.graph.node if not n.name.startswith("lrp/")]
    assert ops == [n.op_type for n in model.graph.node]
    types = {t.name: t.data_type for t in compiled.graph.initializer}
    for t in model.graph.initializer:
        assert types[t.name] == t.data_type
    for _, composite, _ in COMPOSITES:
        report = check_model(model, composite())
        assert report.ok, report


@pytest.mark.parametrize("name", ["cnn_per_tensor", "cnn_per_channel", "digits_per_channel"])
@pytest.mark.parametrize("preset", COMPOSITES, ids=[c[0] for c in COMPOSITES])
def test_quantized_model_matches_zennit_on_dequantized_torch_copy(models, name: str,
                                                                  preset) -> None:
    path, x = models[name]
    model = onnx.load(str(path))
    twin = qdq_torch(model)
    deployed = ort_session(model).run(None, {"input": x})[0]
    with torch.no_grad():
        out = twin(torch.from_numpy(x)).numpy()
    # same activations on the int8 grid: the outputs agree to float32 rounding
    np.testing.assert_allclose(out, deployed, rtol=1e-5, atol=1e-6)
    target = deployed.argmax(axis=1)
    expl = L.LRP(model, preset[1]()).analyze(x, target, device="cpu")
    np.testing.assert_array_equal(expl.output, deployed)
    _, ref = oracle.zennit_relevance(twin, x, preset[2](), target, deployed.shape[1])
    oracle.assert_agreement(expl.relevance, ref, f"{name} {preset[0]}")
