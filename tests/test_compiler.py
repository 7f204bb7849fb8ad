"""The compiled model's contract and the compiler's graph-level behaviour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrp_onnx as L
from conftest import MODELS, ort_session

SEED = MODELS / "seed_vgg.onnx"


@pytest.fixture(scope="module")
def compiled() -> onnx.ModelProto:
    return L.compile(SEED, L.EpsilonPlusFlat())


def test_inputs_outputs_contract(compiled: onnx.ModelProto) -> None:
    original = onnx.load(SEED)
    ins = {i.name: i for i in compiled.graph.input}
    outs = {o.name: o for o in compiled.graph.output}
    assert list(ins) == [i.name for i in original.graph.input] + ["target"]
    assert list(outs) == [o.name for o in original.graph.output] + ["relevance"]
    target = ins["target"].type.tensor_type
    assert target.elem_type == TensorProto.INT64 and len(target.shape.dim) == 1
    rel, x = outs["relevance"].type.tensor_type, ins["input"].type.tensor_type
    assert rel.elem_type == x.elem_type
    assert [d.dim_value for d in rel.shape.dim][1:] == [3, 32, 32]
    # the batch dimension stays dynamic
    assert rel.shape.dim[0].dim_param and target.shape.dim[0].dim_param == x.shape.dim[0].dim_param


def test_full_checker_passes(compiled: onnx.ModelProto) -> None:
    onnx.checker.check_model(compiled, full_check=True)


def test_original_outputs_unchanged(compiled: onnx.ModelProto, rng: np.random.Generator) -> None:
    x = rng.standard_normal((5, 3, 32, 32)).astype(np.float32)
    (ref,) = ort_session(SEED).run(None, {"input": x})
    out, rel = ort_session(compiled).run(None, {"input": x, "target": np.full(5, -1, np.int64)})
    # The forward nodes are the input model's own: ORT computes them bit for bit the same.
    np.testing.assert_array_equal(out, ref)
    assert rel.shape == x.shape and np.isfinite(rel).all()


def test_dynamic_batch_and_per_sample_independence(compiled: onnx.ModelProto,
                                                    rng: np.random.Generator) -> None:
    sess = ort_session(compiled)
    x = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    t = np.array([1, -1, 7], np.int64)
    _, batched = sess.run(None, {"input": x, "target": t})
    for i in range(3):
        _, single = sess.run(None, {"input": x[i:i + 1], "target": t[i:i + 1]})
        np.testing.assert_allclose(single[0], batched[i], rtol=0,
                                   atol=1e-6 * np.abs(batched[i]).max())


def test_target_minus_one_is_argmax(compiled: onnx.ModelProto, rng: np.random.Generator) -> None:
    sess = ort_session(compiled)
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    logits, auto = sess.run(None, {"input": x, "target": np.full(2, -1, np.int64)})
    _, explicit = sess.run(None, {"input": x, "target": logits.argmax(1).astype(np.int64)})
    np.testing.assert_array_equal(auto, explicit)
    _, other = sess.run(None, {"input": x, "target": (logits.argmax(1) + 1).astype(np.int64) % 100})
    assert not np.allclose(other, auto)


def test_logit_seed_scales_by_logit(rng: np.random.Generator) -> None:
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    one = L.LRP(SEED, L.EpsilonPlusFlat()).analyze(x, target=-1)
    logit = L.LRP(SEED, L.EpsilonPlusFlat(), normalize_output_relevance=False).analyze(x)
    scale = one.output[np.arange(2), one.target][:, None, None, None]
    np.testing.assert_allclose(logit.relevance, one.relevance * scale, rtol=1e-5,
                               atol=1e-6 * np.abs(logit.relevance).max())


def test_input_model_not_modified() -> None:
    model = onnx.load(SEED)
    before = model.SerializeToString()
    L.compile(model, L.EpsilonGammaBox(-3, 3))
    assert model.SerializeToString() == before


def test_deterministic_output() -> None:
    a = L.compile(SEED, L.EpsilonPlusFlat()).SerializeToString()
    b = L.compile(SEED, L.EpsilonPlusFlat()).SerializeToString()
    assert a == b


def test_emitted_names_are_prefixed(compiled: onnx.ModelProto) -> None:
    original = {n.name for n in onnx.load(SEED).graph.node}
    new = [n.name for n in compiled.graph.node if n.name not in original]
    assert new and all(name.startswith("lrp/") for name in new)
    inits = {t.name for t in onnx.load(SEED).graph.initializer}
    assert all(t.name.startswith("lrp/") for t in compiled.graph.initializer
               if t.name not in inits)


def _added_elements(model: onnx.ModelProto, original: set[str]) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name not in original)


@pytest.mark.parametrize("composite", [None, L.EpsilonPlusFlat()], ids=["zero", "epf"])
def test_no_weight_is_copied(composite: L.Composite | None) -> None:
    """Modified weights (W⁺, flipped kernels) are ops on the model's own initializers, and
    Epsilon/Zero reuse the forward pre-activation: the compiled file adds no weight-sized
    tensor. With ``modifiers_as_ops`` off they are stored (the switch does something)."""
    seed = onnx.load(SEED)
    original = {t.name for t in seed.graph.initializer}
    conv_elements = sum(int(np.prod(t.dims)) for t in seed.graph.initializer if len(t.dims) == 4)
    model = L.compile(SEED, composite)
    assert _added_elements(model, original) < 10_000
    flips = [n for n in model.graph.node if n.name.endswith("/W/flipT")]
    assert flips and all(n.op_type == "Slice" for n in flips)
    lrp_convs = [n for n in model.graph.node if n.op_type == "Conv" and n.name.startswith("lrp/")]
    if composite is None:  # no recomputed forward conv: only Conv-form transposes
        assert lrp_convs and all(n.name.endswith("/convT") for n in lrp_convs)

    stored = L.compile(SEED, composite, optimizations=L.Optimizations(modifiers_as_ops=False))
    assert _added_elements(stored, original) >= conv_elements  # at least the flipped kernels


def _two_output_model() -> onnx.ModelProto:
    """input -> Relu -> (MatMul -> logits) and a dead branch Relu -> Exp -> aux."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "w")
    nodes = [helper.make_node("Relu", ["input"], ["h"], name="relu"),
             helper.make_node("MatMul", ["h", "w"], ["logits"], name="head"),
             helper.make_node("Exp", ["h"], ["aux"], name="aux_branch")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["N", 4])], initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_dead_branch_emits_nothing() -> None:
    model = L.compile(_two_output_model())
    assert not any(n.name.startswith("lrp/aux_branch") for n in model.graph.node)
    assert [o.name for o in model.graph.output] == ["logits", "aux", "relevance"]


def test_choose_explained_output() -> None:
    # "aux" is explained through its Exp node, which has no rule: the error names it.
    with pytest.raises(L.UnsupportedOp, match="'aux_branch' \\(Exp\\)"):
        L.compile(_two_output_model(), output="aux")
    with pytest.raises(L.UnsupportedModel, match="no graph output 'nope'"):
        L.compile(_two_output_model(), output="nope")


def test_fan_out_accumulates() -> None:
    """x feeds two dense branches that are added: R(x) is the sum of both branches' shares."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((4, 3)).astype(np.float32)
    w2 = rng.standard_normal((4, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["input", "w1"], ["a"], name="a"),
             helper.make_node("MatMul", ["input", "w2"], ["b"], name="b"),
             helper.make_node("Add", ["a", "b"], ["logits"], name="add")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((2, 4)).astype(np.float32) + 1.0
    rel = L.LRP(model, [L.EpsilonRule(), L.EpsilonRule(), L.ZeroRule()]).analyze(x, 0).relevance
    # numpy reference: proportional split at the Add, then the z-rule of each MatMul.
    x64 = x.astype(np.float64)
    a, b = x64 @ w1, x64 @ w2
    y = a + b
    r = np.zeros_like(y)
    r[:, 0] = 1.0

    def stab(z: np.ndarray, eps: float = 1e-6) -> np.ndarray:
        return z + eps * np.where(z >= 0, 1.0, -1.0)

    ra, rb = a * r / stab(y), b * r / stab(y)
    expect = x64 * ((ra / stab(a)) @ w1.T) + x64 * ((rb / stab(b)) @ w2.T)
    np.testing.assert_allclose(rel, expect, rtol=1e-5, atol=1e-6 * np.abs(expect).max())


def test_trailing_softmax_is_kept_but_not_explained(rng: np.random.Generator) -> None:
    """Relevance starts at the Softmax's input (the logit), the output stays the probabilities."""
    w = rng.standard_normal((4, 3)).astype(np.float32)

    def model(head: str | None) -> onnx.ModelProto:
        nodes = [helper.make_node("MatMul", ["input", "w"], ["z" if head else "logits"], name="mm")]
        if head:
            nodes.append(helper.make_node(head, ["z"], ["logits"], name="head", axis=1))
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
            initializer=[numpy_helper.from_array(w, "w")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                 ir_version=8)

    x = rng.standard_normal((2, 4)).astype(np.float32)
    plain = L.LRP(model(None)).analyze(x, target=[0, 2])
    for head in ("Softmax", "LogSoftmax"):
        expl = L.LRP(model(head)).analyze(x, target=[0, 2])
        np.testing.assert_array_equal(expl.relevance, plain.relevance)
        expect = np.exp(plain.output) / np.exp(plain.output).sum(1, keepdims=True)
        if head == "LogSoftmax":
            expect = np.log(expect)
        np.testing.assert_allclose(expl.output, expect, rtol=1e-5, atol=1e-6)
        assert list(expl.target) == [0, 2]


def test_streamed_save_round_trips(tmp_path: Path) -> None:
    """``save`` writes one initializer at a time; the file parses back to the same model."""
    model = L.compile(SEED, L.EpsilonPlusFlat())
    path = tmp_path / "c.onnx"
    L.save_model(model, path)
    back = onnx.load(path)
    assert back == model
    assert back.SerializeToString() == model.SerializeToString()
