"""How transformer exports are read: GELU and LayerNorm decompositions are one layer each, the
fused ``Attention`` op (opset 23) is lowered, and unsupported nodes are refused all at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrp_onnx import CPLRP, LRP, AttnLRP, CanonizerError, UnsupportedOp
from lrp_onnx.testing.references import Net

torch = pytest.importorskip("torch")


def _export(module: object, path: Path, opset: int, dynamo: bool, shape: tuple[int, ...]) -> Path:
    x = torch.zeros(*shape)
    if dynamo:
        torch.onnx.export(module, (x,), dynamo=True, opset_version=opset, input_names=["input"],
                          output_names=["logits"]).save(str(path))
    else:
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return path


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("opset,dynamo", [(17, False), (18, True)])
def test_gelu_decompositions_are_one_activation(tmp_path: Path, approximate: str, opset: int,
                                                dynamo: bool) -> None:
    """The legacy exporter and dynamo at opset 18 spell GELU (exact and tanh) in elementwise
    ops, each in its own multiplication order; the layer view folds each into the Dense layer,
    so the identity rule applies (a uniform split of ``x * Φ(x)`` would be wrong)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(approximate=approximate),
                              torch.nn.Linear(4, 3)).eval()
    path = _export(net, tmp_path / "gelu.onnx", opset, dynamo, (1, 4))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Gelu" not in ops and ("Tanh" in ops or "Erf" in ops)
    analyzer = LRP(path, AttnLRP())
    assert [la.summary for la in analyzer.layers] == ["Dense(4 => 4, gelu)", "Dense(4 => 3)"]


def test_decomposed_layer_norm_is_the_layer_norm_rule(tmp_path: Path) -> None:
    """Below opset 17 torch writes LayerNorm as ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/
    Add (or with the square as ``Mul(c, c)``): one ``DecomposedLayerNorm`` layer whose relevance
    equals that of the ``LayerNormalization`` op in the opset-17 export of the same module."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8),
                              torch.nn.Linear(8, 3)).eval()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.2, 0.2)
    old = _export(net, tmp_path / "ln14.onnx", 14, False, (1, 6))
    new = _export(net, tmp_path / "ln17.onnx", 17, False, (1, 6))
    assert "LayerNormalization" not in {n.op_type for n in onnx.load(str(old)).graph.node}
    # the square also spelled Mul(c, c) (as graph optimizers rewrite Pow(c, 2))
    model = onnx.load(str(old))
    square = next(n for n in model.graph.node if n.op_type == "Pow")
    square.op_type, square.input[1] = "Mul", square.input[0]
    mul = tmp_path / "ln14_mul.onnx"
    onnx.save(model, mul)
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    for decomposed in (old, mul):
        kinds = [la.kind for la in LRP(decomposed, AttnLRP()).layers]
        assert kinds == ["Gemm", "DecomposedLayerNorm", "Gemm"]
        for composite in (AttnLRP(), AttnLRP(epsilon=1e-3)):
            a = LRP(decomposed, composite).analyze(x).relevance
            b = LRP(new, composite).analyze(x).relevance
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())


def test_unsupported_nodes_are_listed_at_once(rng: np.random.Generator) -> None:
    """A division by an activation and two ops without a rule: one error names all three."""
    net = Net(rng, (6,))
    a = net.node("MatMul", [net.x, net.param("W1", (6, 6))], "proj_a")
    c = net.node("MatMul", [net.x, net.param("W2", (6, 6))], "proj_b")
    q = net.node("Div", [a, c], "quotient")
    e = net.node("Exp", [q], "exp")
    net.head(net.node("Cos", [e], "cos"))
    with pytest.raises(UnsupportedOp) as info:
        LRP(net.model(), CPLRP())
    text = str(info.value)
    assert "3 node(s)" in text
    for name, kind in (("quotient", "DivByActivation"), ("exp", "Exp"), ("cos", "Cos")):
        assert f"'{name}' ({kind})" in text


# -- the fused Attention op (opset 23) ------------------------------------------------------------
def _attention_model(rng: np.random.Generator, *, heads: int = 2, kv_heads: int = 2,
                     seq: int = 5, hd: int = 4, mask: bool = False, causal: bool = False,
                     past: bool = False) -> onnx.ModelProto:
    """``x [N, heads, seq, hd]`` -> q/k/v = x @ W -> Attention -> Reshape -> Gemm -> logits."""
    inits, nodes = [], []
    for name in ("Wq", "Wk", "Wv"):
        inits.append(numpy_helper.from_array(rng.standard_normal((hd, hd)).astype(np.float32),
                                             name))
        nodes.append(helper.make_node("MatMul", ["x", name], [name[1].lower()], name=name[1]))
    inputs = ["q", "k", "v"]
    if kv_heads != heads:  # fewer key/value heads: slice them
        nodes += [helper.make_node("Slice", [t, "s0", "s1", "s_ax"], [f"{t}_g"], name=f"g{t}")
                  for t in ("k", "v")]
        inputs = ["q", "k_g", "v_g"]
        inits += [numpy_helper.from_array(np.array(v, np.int64), n)
                  for n, v in (("s0", [0]), ("s1", [kv_heads]), ("s_ax", [1]))]
    attrs = {"is_causal": 1} if causal else {}
    if mask:
        keep = rng.random((seq, seq)) > 0.3
        np.fill_diagonal(keep, True)
        inits.append(numpy_helper.from_array(keep, "mask"))
        inputs.append("mask")
    if past:
        inputs += ["", "past_k", "past_v"]
        inits += [numpy_helper.from_array(np.zeros((1, heads, 1, hd), np.float32), n)
                  for n in ("past_k", "past_v")]
    nodes.append(helper.make_node("Attention", inputs, ["ctx"], name="attention", **attrs))
    inits.append(numpy_helper.from_array(np.array([-1, heads * seq * hd], np.int64), "flat"))
    inits.append(numpy_helper.from_array(
        rng.standard_normal((3, heads * seq * hd)).astype(np.float32) * 0.3, "Wo"))
    nodes += [helper.make_node("Reshape", ["ctx", "flat"], ["ctx2"], name="flatten"),
              helper.make_node("Gemm", ["ctx2", "Wo"], ["logits"], name="head", transB=1)]
    graph = helper.make_graph(
        nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                      ["N", heads, seq, hd])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return model


def _unfused(model: onnx.ModelProto, hd: int = 4) -> onnx.ModelProto:
    """The same model with attention written out by hand in another spelling than the lowering
    (``Div`` of the scores by ``√hd``, the mask as an additive constant): the rules are local and
    the scale's rule is the identity, so the relevance must agree."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    node = next(n for n in out.graph.node if n.op_type == "Attention")
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    seq = 5
    bias = np.zeros((seq, seq), np.float32)
    if len(node.input) > 3 and node.input[3]:
        bias = np.where(inits[node.input[3]], 0.0, -np.inf).astype(np.float32)
    if any(a.name == "is_causal" and a.i for a in node.attribute):
        bias = bias + np.where(np.tril(np.ones((seq, seq), bool)), 0.0, -np.inf).astype(np.float32)
    out.graph.initializer.extend([numpy_helper.from_array(bias, "m/bias"),
                                  numpy_helper.from_array(np.float32(np.sqrt(hd)), "m/root")])
    q, k, v = node.input[:3]
    body = [helper.make_node("Transpose", [k], ["m/kT"], name="m/kT", perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", [q, "m/kT"], ["m/s"], name="m/s"),
            helper.make_node("Div", ["m/s", "m/root"], ["m/scaled"], name="m/scaled"),
            helper.make_node("Add", ["m/scaled", "m/bias"], ["m/masked"], name="m/masked"),
            helper.make_node("Softmax", ["m/masked"], ["m/a"], name="m/a", axis=-1),
            helper.make_node("MatMul", ["m/a", v], [node.output[0]], name="m/ctx")]
    nodes = []
    for n in out.graph.node:
        nodes += body if n.op_type == "Attention" else [n]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


@pytest.mark.parametrize("kind", ["plain", "mask", "causal"])
def test_attention_is_lowered(rng: np.random.Generator, kind: str) -> None:
    """The lowered Attention computes what ONNX Runtime's fused kernel computes (logits) and
    gives the relevance of the same attention written out by hand."""
    import onnxruntime as ort

    model = _attention_model(rng, mask=kind == "mask", causal=kind == "causal")
    x = rng.standard_normal((2, 2, 5, 4)).astype(np.float32)
    fused = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = fused.run(None, {"x": x})[0]
    for composite in (AttnLRP(), CPLRP()):
        ours = LRP(model, composite).analyze(x)
        ref = LRP(_unfused(model), composite).analyze(x)
        np.testing.assert_allclose(ours.output, logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ref.output, logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours.relevance, ref.relevance, rtol=1e-4,
                                   atol=1e-5 * np.abs(ref.relevance).max())
        assert np.isfinite(ours.relevance).all()


@pytest.mark.parametrize("what,match", [
    ({"past": True}, "key/value cache"),
    ({"kv_heads": 1}, "grouped-query attention"),
])
def test_attention_refusals_are_one_line(rng: np.random.Generator, what: dict[str, object],
                                         match: str) -> None:
    with pytest.raises(CanonizerError, match=match) as info:
        LRP(_attention_model(rng, **what), CPLRP())  # type: ignore[arg-type]
    assert "'attention' (Attention)" in str(info.value) and "\n" not in str(info.value)
