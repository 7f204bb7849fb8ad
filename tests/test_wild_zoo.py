"""Model-zoo-style graphs written with onnx.helper (issue 19, item 6), against Zennit.

The ONNX model zoo's classic CNNs were converted from Caffe/Caffe2 at opsets 7–12 with IR 3: they
use ``LRN`` (AlexNet, GoogLeNet), Caffe2's variadic ``Sum`` for residuals, classifier heads that
end in ``[N, K, 1, 1]`` (SqueezeNet: a 1×1 conv and a GlobalAveragePool without Flatten, often
followed by ``Softmax(axis=1)``), and list every initializer as a graph input too. Each graph here
is written node by node from the parameters of a small seeded torch model (two independent
implementations of the same forward pass), at opsets 17 and 13 and at old opsets with IR 3. Each
is compiled, passed through :func:`lrp_onnx.check_model`, and its relevance compared with Zennit
on the torch model (EpsilonPlusFlat, as ``tests/test_zennit.py``: same targets, one-hot seed,
relative L2 <= 1e-4 and correlation >= 0.9999 per sample). Zennit has no rule for
``LocalResponseNorm`` (its gradient would be used): it gets ``Pass``, the rule under test, and
MaxPool gets Zennit's ``Norm`` (exactly our ZeroRule on a pool, see ``tests/test_zennit.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper, version_converter

torch = pytest.importorskip("torch")
zennit = pytest.importorskip("zennit")

import zennit.composites as zc  # noqa: E402
from torch import nn  # noqa: E402
from zennit.layer import Sum as ZSum  # noqa: E402
from zennit.rules import Norm, Pass  # noqa: E402

import lrp_onnx  # noqa: E402
from conftest import ort_session  # noqa: E402
from lrp_onnx import LRP, EpsilonPlusFlat, check_model  # noqa: E402
from lrp_onnx.testing import oracle  # noqa: E402

SHAPE = (3, 16, 16)
CLASSES = 10
#: (opset, old): opsets 17/13 as current exporters write them; 11 and 7 with IR 3 and the
#: initializers listed as graph inputs, as the model zoo's files are.
OPSETS = [(17, False), (13, False), (11, True), (7, True)]


# -- the torch models (reference side) ------------------------------------------------------------
class AlexNetLike(nn.Module):
    """Conv-ReLU-LRN-MaxPool twice, then two dense layers (AlexNet/ZFNet's pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 12, 3, padding=1)
        # alpha large enough that the normalization matters (AlexNet's 1e-4 barely does here)
        self.lrn1 = nn.LocalResponseNorm(5, 0.5, 0.75, 1.0)
        self.lrn2 = nn.LocalResponseNorm(3, 0.3, 0.75, 2.0)
        self.pool1, self.pool2 = nn.MaxPool2d(2), nn.MaxPool2d(2)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.flat = nn.Flatten()
        self.fc1, self.fc2 = nn.Linear(12 * 4 * 4, 32), nn.Linear(32, CLASSES)

    def forward(self, x: Any) -> Any:
        x = self.pool1(self.lrn1(self.relu1(self.conv1(x))))
        x = self.pool2(self.lrn2(self.relu2(self.conv2(x))))
        return self.fc2(self.relu3(self.fc1(self.flat(x))))


class GoogLeNetLike(nn.Module):
    """Stem conv, MaxPool, LRN, one inception block (three branches, Concat), GAP, dense."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.pool = nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(3, 2, padding=1)
        self.lrn = nn.LocalResponseNorm(5, 0.4, 0.75, 1.0)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b2a, self.b2b = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 6, 3, padding=1)
        self.b3pool, self.b3 = nn.MaxPool2d(3, 1, padding=1), nn.Conv2d(8, 4, 1)
        self.relus = nn.ModuleList([nn.ReLU() for _ in range(5)])
        self.gap, self.flat, self.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(14, CLASSES)

    def forward(self, x: Any) -> Any:
        r = self.relus
        x = self.lrn(self.pool(r[0](self.stem(x))))
        y = torch.cat([r[1](self.b1(x)), r[3](self.b2b(r[2](self.b2a(x)))),
                       r[4](self.b3(self.b3pool(x)))], dim=1)
        return self.fc(self.flat(self.gap(y)))


class ResNetSum(nn.Module):
    """Caffe2-style residual blocks whose merges are ``Sum`` of 2 and of 3 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c, self.d = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.sum2, self.sum3 = ZSum(), ZSum()
        self.relus = nn.ModuleList([nn.ReLU() for _ in range(4)])
        self.gap, self.flat, self.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES)

    def forward(self, x: Any) -> Any:
        r = self.relus
        s = r[0](self.stem(x))
        h = r[2](self.sum2(torch.stack([self.b(r[1](self.a(s))), s], dim=-1)))
        h = r[3](self.sum3(torch.stack([self.c(h), self.d(h), h], dim=-1)))
        return self.fc(self.flat(self.gap(h)))


class SqueezeNetLike(nn.Module):
    """Stem, MaxPool, one fire module (squeeze, two expands, Concat), a 1×1 conv classifier with
    ReLU and GlobalAveragePool; the torch side flattens at the end (the gradient passes a
    Flatten unchanged), the ONNX side ends in ``[N, K, 1, 1]``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.pool = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.MaxPool2d(2)
        self.squeeze = nn.Conv2d(8, 4, 1)
        self.e1, self.e3 = nn.Conv2d(4, 6, 1), nn.Conv2d(4, 6, 3, padding=1)
        self.classifier = nn.Conv2d(12, CLASSES, 1)
        self.relus = nn.ModuleList([nn.ReLU() for _ in range(5)])
        self.gap, self.flat = nn.AdaptiveAvgPool2d(1), nn.Flatten()

    def forward(self, x: Any) -> Any:
        r = self.relus
        s = r[1](self.squeeze(self.pool(r[0](self.stem(x)))))
        y = torch.cat([r[2](self.e1(s)), r[3](self.e3(s))], dim=1)
        return self.flat(self.gap(r[4](self.classifier(y))))


# -- the same forward passes written with onnx.helper -------------------------------------------
class Writer:
    """Nodes and initializers of a zoo-style graph, named like the Caffe2 converter's."""

    def __init__(self, opset: int, old: bool) -> None:
        self.opset, self.old = opset, old
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def _node(self, op: str, inputs: list[str], **attrs: Any) -> str:
        out = f"{op.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def _param(self, name: str, value: Any) -> str:
        self.inits.append(numpy_helper.from_array(value.detach().numpy().astype(np.float32), name))
        return name

    def conv(self, x: str, m: Any, relu: bool = True) -> str:
        k = len(self.nodes)
        y = self._node("Conv", [x, self._param(f"conv{k}_w", m.weight),
                                self._param(f"conv{k}_b", m.bias)],
                       kernel_shape=list(m.kernel_size), strides=list(m.stride),
                       pads=[*m.padding, *m.padding])
        return self._node("Relu", [y]) if relu else y

    def dense(self, x: str, m: Any, relu: bool = False) -> str:
        k = len(self.nodes)
        y = self._node("Gemm", [x, self._param(f"fc{k}_w", m.weight),
                                self._param(f"fc{k}_b", m.bias)], transB=1)
        return self._node("Relu", [y]) if relu else y

    def lrn(self, x: str, m: Any) -> str:
        return self._node("LRN", [x], size=m.size, alpha=m.alpha, beta=m.beta, bias=m.k)

    def maxpool(self, x: str, m: Any) -> str:
        k, s, p = m.kernel_size, m.stride, m.padding
        return self._node("MaxPool", [x], kernel_shape=[k, k], strides=[s, s],
                          pads=[p, p, p, p])

    def op(self, op: str, *inputs: str, **attrs: Any) -> str:
        return self._node(op, list(inputs), **attrs)

    def model(self, out: str, out_shape: list[Any]) -> onnx.ModelProto:
        inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", *SHAPE])]
        if self.old:  # IR 3: every initializer is also a graph input
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for t in self.inits]
        graph = helper.make_graph(self.nodes, "zoo", inputs,
                                  [helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                                                 out_shape)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  producer_name="onnx-caffe2")
        model.ir_version = 3 if self.old else 8
        onnx.checker.check_model(model, full_check=True)
        return model


def write_alexnet(t: AlexNetLike, w: Writer, softmax: bool) -> tuple[str, list[Any]]:
    x = w.maxpool(w.lrn(w.conv("data", t.conv1), t.lrn1), t.pool1)
    x = w.maxpool(w.lrn(w.conv(x, t.conv2), t.lrn2), t.pool2)
    x = w.dense(w.dense(w.op("Flatten", x, axis=1), t.fc1, relu=True), t.fc2)
    return x, ["N", CLASSES]


def write_googlenet(t: GoogLeNetLike, w: Writer, softmax: bool) -> tuple[str, list[Any]]:
    x = w.lrn(w.maxpool(w.conv("data", t.stem), t.pool), t.lrn)
    y = w.op("Concat", w.conv(x, t.b1), w.conv(w.conv(x, t.b2a), t.b2b),
             w.conv(w.maxpool(x, t.b3pool), t.b3), axis=1)
    return w.dense(w.op("Flatten", w.op("GlobalAveragePool", y), axis=1), t.fc), ["N", CLASSES]


def write_resnet(t: ResNetSum, w: Writer, softmax: bool) -> tuple[str, list[Any]]:
    s = w.conv("data", t.stem)
    h = w.op("Relu", w.op("Sum", w.conv(w.conv(s, t.a), t.b, relu=False), s))
    h = w.op("Relu", w.op("Sum", w.conv(h, t.c, relu=False), w.conv(h, t.d, relu=False), h))
    return w.dense(w.op("Flatten", w.op("GlobalAveragePool", h), axis=1), t.fc), ["N", CLASSES]


def write_squeezenet(t: SqueezeNetLike, w: Writer, softmax: bool) -> tuple[str, list[Any]]:
    s = w.conv(w.maxpool(w.conv("data", t.stem), t.pool), t.squeeze)
    y = w.op("Concat", w.conv(s, t.e1), w.conv(s, t.e3), axis=1)
    out = w.op("GlobalAveragePool", w.conv(y, t.classifier))
    if softmax:
        out = w.op("Softmax", out, axis=1)
    return out, ["N", CLASSES, 1, 1]


#: name -> (torch class, writer, seed)
FAMILIES: dict[str, tuple[type, Callable[..., tuple[str, list[Any]]], int]] = {
    "alexnet_lrn": (AlexNetLike, write_alexnet, 1),
    "googlenet_lrn_concat": (GoogLeNetLike, write_googlenet, 2),
    "resnet_sum": (ResNetSum, write_resnet, 3),
    "squeezenet_head": (SqueezeNetLike, write_squeezenet, 4),
}


def torch_model(name: str) -> Any:
    cls, _, seed = FAMILIES[name]
    torch.manual_seed(seed)
    model = cls().eval()
    with torch.no_grad():  # larger biases than torch's default init: the rules must use them
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.normal_(0.0, 0.1)
    return model


def zoo_model(name: str, opset: int, old: bool, softmax: bool = False) -> onnx.ModelProto:
    """The ONNX graph of ``name`` written at ``opset`` (IR 3 with initializer inputs if
    ``old``)."""
    _, write, _ = FAMILIES[name]
    w = Writer(opset, old)
    out, shape = write(torch_model(name), w, softmax)
    return w.model(out, shape)


# -- the Zennit reference (once per family) ----------------------------------------------------
def zennit_composite() -> Any:
    return zc.EpsilonPlusFlat(layer_map=[(nn.LocalResponseNorm, Pass()), (nn.MaxPool2d, Norm())])


_REFERENCE: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}


def reference(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x, logits, target, Zennit relevance)`` for three well-conditioned samples."""
    if name not in _REFERENCE:
        model = torch_model(name)
        x = oracle.well_conditioned_inputs(model, SHAPE, 3, seed=FAMILIES[name][2],
                                           composites=[zennit_composite])
        logits, target = oracle.torch_targets(model, x)
        out, rel = oracle.zennit_relevance(model, x, zennit_composite(), target, CLASSES)
        np.testing.assert_allclose(out, logits, rtol=1e-5, atol=1e-6)
        _REFERENCE[name] = (x, logits, target, rel)
    return _REFERENCE[name]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


CASES = [(name, softmax) for name in FAMILIES for softmax in (False, True)
         if softmax is False or name == "squeezenet_head"]


@pytest.mark.parametrize("opset,old", OPSETS, ids=[f"opset{o}{'-ir3' if d else ''}"
                                                   for o, d in OPSETS])
@pytest.mark.parametrize("name,softmax", CASES,
                         ids=[f"{n}{'+softmax' if s else ''}" for n, s in CASES])
def test_zoo_graph_matches_zennit_and_passes_check(name: str, softmax: bool, opset: int,
                                                   old: bool) -> None:
    x, logits, target, ref = reference(name)
    model = zoo_model(name, opset, old, softmax)
    analyzer = LRP(model, EpsilonPlusFlat())
    assert analyzer.num_classes == CLASSES
    expl = analyzer.analyze(x, target, device="cpu")
    out = np.asarray(expl.output).reshape(len(x), -1)
    np.testing.assert_allclose(out, _softmax(logits) if softmax else logits, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_array_equal(expl.target, target)
    oracle.assert_agreement(expl.relevance, ref, f"{name} opset {opset}")
    # the top class (target -1) is the torch argmax, through a [N, K, 1, 1] head too
    np.testing.assert_array_equal(analyzer.analyze(x, device="cpu").target, target)

    report = check_model(model, EpsilonPlusFlat())
    failed = [r for r in report.results if r.ok is False]
    assert report.ok, failed
    assert all(r.ok for r in report.results if r.name in ("onnx_checker", "outputs_unchanged",
                                                          "relevance_finite",
                                                          "conservation_layers"))


def test_lrn_is_a_normalization_layer_passing_relevance_unchanged() -> None:
    """LRN is its own layer in the NormalizationLayer group (the presets give it PassRule);
    under every rule it accepts it sends back exactly the relevance that arrives at it."""
    model = zoo_model("alexnet_lrn", 17, False)
    x = reference("alexnet_lrn")[0]
    analyzer = LRP(model, EpsilonPlusFlat())
    lrns = [(la, r) for la, r in zip(analyzer.layers, analyzer.rules) if la.kind == "LRN"]
    assert [(la.summary, repr(r)) for la, r in lrns] == [("LRN(5)", "PassRule()"),
                                                       ("LRN(3)", "PassRule()")]
    for rule in (lrp_onnx.PassRule(), lrp_onnx.ZeroRule(), lrp_onnx.EpsilonRule(epsilon=0.1)):
        a = LRP(model, lrp_onnx.Composite(lrp_onnx.GlobalMap(lrp_onnx.EpsilonRule()),
                                          lrp_onnx.GlobalTypeMap({"LRN": rule})), _audit=True)
        session = ort_session(a.model)
        names = [o.name for o in session.get_outputs()]
        outs = dict(zip(names, session.run(None, {"data": x,
                                                  "target": np.full(len(x), -1, np.int64)})))
        for la in (la for la in a.layers if la.kind == "LRN"):
            arrived = outs[f"relevance_out_{la.index + 1}"]
            assert np.abs(arrived).sum() > 0
            np.testing.assert_array_equal(outs[f"relevance_in_{la.index + 1}"], arrived)
    with pytest.raises(lrp_onnx.RuleNotApplicable, match="LRN"):
        LRP(model, lrp_onnx.Composite(lrp_onnx.GlobalMap(lrp_onnx.EpsilonRule()),
                                      lrp_onnx.GlobalTypeMap({"LRN": lrp_onnx.ZPlusRule()})))


@pytest.mark.parametrize("head", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset", [17, 11])
def test_softmax_on_4d_is_the_trailing_head(head: str, opset: int) -> None:
    """``Softmax``/``LogSoftmax(axis=1)`` of ``[N, K, 1, 1]`` is the trailing head: relevance
    starts at its input (the GAP output). ``onnx.version_converter`` writes the opset-11 one as
    ``Reshape(Softmax(Flatten(v)), Shape(v))``, which is recognised as the same head."""
    w = Writer(opset, False)
    out, _ = write_squeezenet(torch_model("squeezenet_head"), w, False)
    w.op(head, out, axis=1)
    model = w.model(w.nodes[-1].output[0], ["N", CLASSES, 1, 1])
    if opset < 13:
        model = version_converter.convert_version(model, 17)
        assert [n.op_type for n in model.graph.node][-4:] == ["Shape", "Flatten", head,
                                                               "Reshape"]
    analyzer = LRP(model, EpsilonPlusFlat())
    record = json.loads({p.key: p.value for p in analyzer.model.metadata_props}["lrp_onnx"])
    assert record["logits"] == out
    x, logits, target, ref = reference("squeezenet_head")
    expl = analyzer.analyze(x, device="cpu")
    np.testing.assert_array_equal(expl.target, target)
    oracle.assert_agreement(expl.relevance, ref, f"{head} opset {opset}")


@pytest.mark.parametrize("shape", [[-1, CLASSES, 1, 1], [0, CLASSES, 1, 1]])
def test_flattened_softmax_reshaped_to_a_constant_shape_is_the_head(shape: list[int]) -> None:
    """The same head with the shape given as a constant (a folded ``Shape``; the batch dim as
    ``-1`` or ``0``); a Reshape to another shape is not a head (relevance goes through it, its
    Softmax and its Flatten)."""
    x, _, target, ref = reference("squeezenet_head")
    for dims, head in ((shape, True), ([-1, CLASSES], False)):
        w = Writer(17, False)
        out, _ = write_squeezenet(torch_model("squeezenet_head"), w, False)
        w.inits.append(numpy_helper.from_array(np.array(dims, np.int64), "shape"))
        w.op("Reshape", w.op("Softmax", w.op("Flatten", out, axis=1), axis=-1), "shape")
        model = w.model(w.nodes[-1].output[0], ["N", *[abs(d) or CLASSES for d in dims[1:]]])
        analyzer = LRP(model, EpsilonPlusFlat())
        record = json.loads({p.key: p.value for p in analyzer.model.metadata_props}["lrp_onnx"])
        assert (record["logits"] == out) is head
        if head:
            expl = analyzer.analyze(x, device="cpu")
            np.testing.assert_array_equal(expl.target, target)
            oracle.assert_agreement(expl.relevance, ref, f"constant shape {shape}")


def test_4d_head_with_output_relevance_and_logit_seed() -> None:
    """An ``output_relevance`` seed shaped ``[N, K, 1, 1]`` (one-hot at the target) gives the
    target's relevance; the logit seed scales each sample by its logit."""
    x, logits, target, ref = reference("squeezenet_head")
    model = zoo_model("squeezenet_head", 17, False)
    seed = np.zeros((len(x), CLASSES, 1, 1), np.float32)
    seed[np.arange(len(x)), target] = 1.0
    explicit = LRP(model, EpsilonPlusFlat(), output_relevance=True)
    oracle.assert_agreement(explicit.analyze(x, output_relevance=seed).relevance, ref,
                            "output_relevance")
    by_logit = LRP(model, EpsilonPlusFlat(), normalize_output_relevance=False)
    top = logits[np.arange(len(x)), target].reshape(-1, 1, 1, 1)
    oracle.assert_agreement(by_logit.analyze(x, target).relevance, ref * top, "logit seed")
    with pytest.raises(lrp_onnx.UnsupportedModel, match=r"target 10 is outside \[-1, 9\]"):
        LRP(model, EpsilonPlusFlat()).analyze(x, 10)


def test_cli_convert_explain_check_on_a_4d_head(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """``lrp-onnx convert``, ``explain --target`` (a class index up to K - 1) and ``check`` on a
    model whose output is ``[N, K, 1, 1]`` after ``Softmax(axis=1)``."""
    from lrp_onnx.cli.main import main

    src, dest = tmp_path / "squeezenet.onnx", tmp_path / "squeezenet.lrp.onnx"
    onnx.save(zoo_model("squeezenet_head", 13, False, softmax=True), src)
    x = reference("squeezenet_head")[0]
    np.save(tmp_path / "x.npy", x)
    assert main(["convert", str(src), str(dest), "--composite", "EpsilonPlusFlat"]) == 0
    capsys.readouterr()
    assert main(["explain", str(dest), str(tmp_path / "x.npy"), "--target", "7",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("target 7 (output ") == len(x), printed
    assert main(["explain", str(dest), str(tmp_path / "x.npy"), "--target", "10",
                 "--device", "cpu"]) == 1
    assert "has 10 classes (0 to 9)" in capsys.readouterr().err
    for model in (src, dest):
        args = ["check", str(model), "--device", "cpu"]
        if model == src:
            args += ["--composite", "EpsilonPlusFlat"]
        assert main(args) == 0
        assert "OK:" in capsys.readouterr().out
