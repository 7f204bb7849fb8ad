"""Token-id inputs (explained at the embedding lookup's output) and sequence outputs
``[N, T, V]`` (``target_position``), against numpy references; ``explain`` on token ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrp_onnx import LRP, Composite, EpsilonRule, GlobalMap, UnsupportedModel
from lrp_onnx.cli.main import main
from lrp_onnx.emit.contract import read_record, strip_compiled
from lrp_onnx.errors import InvalidInput

V, D, K, T = 11, 4, 3, 5
GRADIENT = Composite(GlobalMap(EpsilonRule(epsilon=0.0)))  # ε = 0: gradient x input


def _model(nodes: list, inputs: list, output: onnx.ValueInfoProto,
           inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "tokens", inputs, [output],
                              [numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f"
                                                       else v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _ids(name: str = "input_ids", length: int | str = T) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, ["N", length])


def classifier(rng: np.random.Generator, *, mask: bool = False, second_ids: bool = False
               ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``logits = Reshape(E[ids] [* mask], [N, T D]) @ W``; optionally a float mask input and a
    second token input (its own table, added to the embedding)."""
    p = {"E": rng.standard_normal((V, D)), "W": rng.standard_normal((T * D, K)),
         "flat": np.array([0, T * D], np.int64), "axis": np.array([2], np.int64),
         "F": rng.standard_normal((2, D))}
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["emb"], name="word_embedding")]
    inputs, h = [_ids()], "emb"
    if second_ids:
        inputs.append(_ids("segment_ids"))
        nodes += [helper.make_node("Gather", ["F", "segment_ids"], ["seg"], name="segment"),
                  helper.make_node("Add", ["emb", "seg"], ["summed"], name="add_segment")]
        h = "summed"
    if mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT,
                                                    ["N", T]))
        nodes += [helper.make_node("Unsqueeze", ["attention_mask", "axis"], ["m3"], name="m3"),
                  helper.make_node("Mul", [h, "m3"], ["masked"], name="apply_mask")]
        h = "masked"
    nodes += [helper.make_node("Reshape", [h, "flat"], ["flat_h"], name="flatten"),
              helper.make_node("MatMul", ["flat_h", "W"], ["logits"], name="head")]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", K])
    return _model(nodes, inputs, out, p), p


def language_model(rng: np.random.Generator, *, static: bool = True
                   ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``logits[n, p] = sum_s L[s, p] E[ids[n, s]] @ W`` (a causal mix of positions with the
    constant ``L``; ``static=False``: no mix, the sequence length known only at run time). The
    ids pass ``Reshape(ids, [-1, T])`` first, as GPT-2's do."""
    p = {"E": rng.standard_normal((V, D)), "W": rng.standard_normal((D, V)),
         "L": np.triu(rng.random((T, T))), "shape": np.array([0, -1], np.int64)}
    nodes = [helper.make_node("Reshape", ["input_ids", "shape"], ["ids2"], name="ids_view"),
             helper.make_node("Gather", ["E", "ids2"], ["emb"], name="wte")]
    h = "emb"
    if static:
        nodes += [helper.make_node("Transpose", ["emb"], ["et"], name="to_dt", perm=[0, 2, 1]),
                  helper.make_node("MatMul", ["et", "L"], ["mixed"], name="mix"),
                  helper.make_node("Transpose", ["mixed"], ["h"], name="to_td", perm=[0, 2, 1])]
        h = "h"
    else:
        del p["L"]
    nodes.append(helper.make_node("MatMul", [h, "W"], ["logits"], name="lm_head"))
    length = T if static else "T"
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", length, V])
    return _model(nodes, [_ids(length=length)], out, p), p


def test_token_ids_are_explained_at_the_embedding(rng: np.random.Generator) -> None:
    """The compiled model keeps ``input_ids``; ``relevance [N, T]`` is the embedding's
    gradient x input summed over the hidden axis, ``relevance_embedding`` the terms."""
    model, p = classifier(rng)
    lrp = LRP(model, GRADIENT, normalize_output_relevance=False, embedding_relevance=True)
    assert lrp.input_name == "input_ids"
    names = [i.name for i in lrp.model.graph.input]
    assert names == ["input_ids", "target"]
    assert read_record(lrp.model)["tokens"] == V
    ids = rng.integers(0, V, (3, T))
    expl = lrp.analyze(ids)
    emb = p["E"][ids]
    want = emb * p["W"][:, expl.target].T.reshape(3, T, D)
    assert expl.relevance.shape == (3, T) and expl.embedding is not None
    np.testing.assert_allclose(expl.embedding, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(expl.relevance, want.sum(-1), rtol=1e-5, atol=1e-6)
    logits = emb.reshape(3, -1) @ p["W"]
    np.testing.assert_array_equal(expl.target, logits.argmax(1))
    # the original model is inside: same outputs, nothing else
    assert [i.name for i in strip_compiled(lrp.model).graph.input] == ["input_ids"]


def test_a_float_mask_beside_token_ids_is_not_explained(rng: np.random.Generator) -> None:
    model, p = classifier(rng, mask=True)
    lrp = LRP(model, GRADIENT, normalize_output_relevance=False)
    assert lrp.input_name == "input_ids"
    ids = rng.integers(0, V, (2, T))
    mask = np.ones((2, T), np.float32)
    mask[1, 3:] = 0
    expl = lrp.analyze(ids, inputs={"attention_mask": mask})
    want = (p["E"][ids] * mask[..., None] *
            p["W"][:, expl.target].T.reshape(2, T, D)).sum(-1)
    np.testing.assert_allclose(expl.relevance, want, rtol=1e-5, atol=1e-6)
    assert np.all(expl.relevance[1, 3:] == 0)
    # the mask is still explainable when asked for by name
    assert LRP(model, GRADIENT, input="attention_mask").input_name == "attention_mask"


def test_choosing_among_token_inputs(rng: np.random.Generator) -> None:
    model, _ = classifier(rng, second_ids=True)
    assert LRP(model, GRADIENT).input_name == "input_ids"  # the HF name wins
    assert LRP(model, GRADIENT, input="segment_ids").input_name == "segment_ids"
    model.graph.input[0].name = "tokens"
    for node in model.graph.node:
        node.input[:] = ["tokens" if i == "input_ids" else i for i in node.input]
    with pytest.raises(UnsupportedModel, match="2 token inputs .*'tokens' \\(token ids\\), "
                       "'segment_ids' \\(token ids\\)\\); choose the one to explain with input="):
        LRP(model, GRADIENT)
    with pytest.raises(UnsupportedModel, match="'nothing' is no graph input"):
        LRP(model, GRADIENT, input="nothing")


def test_embedding_relevance_needs_token_ids(rng: np.random.Generator) -> None:
    model, _ = classifier(rng, mask=True)
    with pytest.raises(UnsupportedModel, match="embedding_relevance applies to a model "
                       "explained at token ids; 'attention_mask' is a float input"):
        LRP(model, GRADIENT, input="attention_mask", embedding_relevance=True)


@pytest.mark.parametrize("normalize", [True, False])
def test_sequence_output_is_explained_at_target_position(rng: np.random.Generator,
                                                         normalize: bool) -> None:
    """``[N, T, V]`` logits: the seed sits at ``(target_position, target)`` only, ``-1`` being
    the last position; R_emb[n, s] = E[ids[n, s]] * L[s, p] * W[:, t] (times the logit without
    normalisation)."""
    model, p = language_model(rng)
    lrp = LRP(model, GRADIENT, normalize_output_relevance=normalize)
    assert [i.name for i in lrp.model.graph.input] == ["input_ids", "target",
                                                        "target_position"]
    ids = rng.integers(0, V, (3, T))
    emb = p["E"][ids]
    logits = np.einsum("nsd,sp,dv->npv", emb, p["L"], p["W"])
    for position in ([-1, -1, -1], [T - 1, 2, 0], [-2, 1, -5]):
        pos = np.array(position)
        expl = lrp.analyze(ids, position=pos)
        at = np.where(pos < 0, pos + T, pos)
        np.testing.assert_array_equal(expl.position, at)
        scores = logits[np.arange(3), at]
        np.testing.assert_array_equal(expl.target, scores.argmax(1))
        t = expl.target
        want = emb * p["L"][:, at].T[..., None] * p["W"][:, t].T[:, None, :]
        logit = scores[np.arange(3), t]
        np.testing.assert_allclose(want.sum((1, 2)), logit, rtol=1e-9)  # ε = 0 conserves
        if normalize:  # seed 1: the relevance sums to 1
            want = want / logit[:, None, None]
        np.testing.assert_allclose(expl.relevance, want.sum(-1), rtol=1e-4, atol=1e-5)
    with_target = lrp.analyze(ids, target=[1, 2, 3])
    np.testing.assert_array_equal(with_target.target, [1, 2, 3])
    np.testing.assert_array_equal(with_target.position, [T - 1] * 3)


def test_sequence_length_known_only_at_run_time(rng: np.random.Generator) -> None:
    """Without the mix each position explains itself: only the explained token has relevance,
    at sequence lengths other than any fixed one."""
    model, p = language_model(rng, static=False)
    lrp = LRP(model, GRADIENT, normalize_output_relevance=False)
    for length in (1, 3, 8):
        ids = rng.integers(0, V, (2, length))
        expl = lrp.analyze(ids)
        emb = p["E"][ids[:, -1]]
        want = np.zeros((2, length))
        want[:, -1] = np.max(emb @ p["W"], axis=1)  # the explained logit, all on the token
        np.testing.assert_allclose(expl.relevance, want, rtol=1e-5, atol=1e-6)


def test_position_is_checked(rng: np.random.Generator) -> None:
    model, _ = language_model(rng)
    lrp = LRP(model, GRADIENT)
    ids = rng.integers(0, V, (2, T))
    with pytest.raises(InvalidInput, match=f"position {T} is outside \\[-{T}, {T - 1}\\]"):
        lrp.analyze(ids, position=T)
    with pytest.raises(InvalidInput, match="position has shape \\(3,\\); expected \\(2,\\)"):
        lrp.analyze(ids, position=[0, 1, 2])
    classifier_lrp = LRP(classifier(rng)[0], GRADIENT)
    with pytest.raises(InvalidInput, match="no target_position input"):
        classifier_lrp.analyze(ids, position=0)
    with pytest.raises(InvalidInput, match="input 'input_ids' must be int64, got int32"):
        classifier_lrp.analyze(ids.astype(np.int32))


# -- the CLI ----------------------------------------------------------------------------------
@pytest.fixture
def compiled_lm(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    model, p = language_model(np.random.default_rng(3), static=False)
    src = tmp_path / "lm.onnx"
    onnx.save(model, src)
    dest = tmp_path / "lm.lrp.onnx"
    assert main(["convert", str(src), str(dest), "--composite", "CPLRP",
                 "--relevance-embedding"]) == 0
    return dest, p


def test_explain_token_ids(compiled_lm: tuple[Path, dict[str, np.ndarray]], tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """Ids from a text file (two sequences of different lengths, padded) and a ``.npy``;
    each sequence is explained at its own last token; ``.relevance.npy`` and ``.html``."""
    path, p = compiled_lm
    (tmp_path / "ids.txt").write_text("1 2 3 4\n\n5 6\n")
    np.save(tmp_path / "one.npy", np.array([7, 8, 9]))
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(f"w<{i}>" for i in range(V)) + "\n")
    out = tmp_path / "out"
    assert main(["explain", str(path), str(tmp_path / "ids.txt"), str(tmp_path / "one.npy"),
                 "--vocab", str(vocab), "--top", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for label, seq, last in (("ids.txt[0]", [1, 2, 3, 4], 3), ("ids.txt[1]", [5, 6], 1),
                             ("one.npy", [7, 8, 9], 2)):
        t = int(np.argmax(p["E"][seq[-1]] @ p["W"]))
        assert f"{label}: target {t} at position {last} " in text
        rel = np.load(out / f"{Path(label.split('[')[0]).stem}"
                      f"{'_' + label[-2] if '[' in label else ''}.relevance.npy")
        assert rel.shape == (len(seq),)
        assert np.count_nonzero(rel) == 1 and rel[-1] != 0
        assert f"'w&lt;{seq[-1]}&gt;'" not in text  # printed as given, escaped only in HTML
        assert f"'w<{seq[-1]}>'@{last}" in text
    page = (out / "ids_1.html").read_text()
    assert "w&lt;5&gt;</span>" in page and "w&lt;6&gt;</span>" in page
    assert "explained 3 sequence(s); wrote 6 files" in text


@pytest.mark.parametrize(("content", "message"), [
    ("1 2 x\n", "ids.txt: line 1: not whitespace-separated integer token ids"),
    ("1 99\n", f"ids.txt: ids.txt: token id 99 is outside the embedding's \\[0, {V}\\)"),
    ("\n", "ids.txt: holds no token ids"),
])
def test_explain_refuses_bad_ids(compiled_lm: tuple[Path, dict[str, np.ndarray]],
                                 tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 content: str, message: str) -> None:
    path, _ = compiled_lm
    (tmp_path / "ids.txt").write_text(content)
    out = tmp_path / "out"
    assert main(["explain", str(path), str(tmp_path / "ids.txt"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err
    assert not out.exists()


def test_explain_position_options(compiled_lm: tuple[Path, dict[str, np.ndarray]],
                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = compiled_lm
    (tmp_path / "ids.txt").write_text("1 2 3\n")
    assert main(["explain", str(path), str(tmp_path / "ids.txt"), "--position", "0"]) == 0
    printed = capsys.readouterr().out
    assert "ids.txt: target " in printed and " at position 0 " in printed
    assert main(["explain", str(path), str(tmp_path / "ids.txt"), "--position", "3"]) == 1
    assert "--position 3 is outside a sequence of 3 tokens" in capsys.readouterr().err
    model, _ = classifier(np.random.default_rng(0))
    onnx.save(model, tmp_path / "clf.onnx")
    assert main(["convert", str(tmp_path / "clf.onnx"), str(tmp_path / "clf.lrp.onnx")]) == 0
    (tmp_path / "five.txt").write_text("1 2 3 4 5\n")
    assert main(["explain", str(tmp_path / "clf.lrp.onnx"), str(tmp_path / "five.txt"),
                 "--position", "1"]) == 1
    assert "positions apply to a sequence output" in capsys.readouterr().err


def test_show_blocks_groups_layers_by_module_path(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``show --blocks``: one line per run of layers sharing a module path (legacy node names
    ``/block/op``), with each kind's count and rule."""
    model, _ = classifier(np.random.default_rng(0), mask=True)
    names = {"m3": "/mask/Unsqueeze", "apply_mask": "/mask/Mul", "flatten": "/head/Reshape",
             "head": "/head/MatMul"}
    for node in model.graph.node:
        node.name = names.get(node.name, node.name)
    onnx.save(model, tmp_path / "named.onnx")
    assert main(["show", str(tmp_path / "named.onnx"), "--composite", "CPLRP", "--blocks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("named.onnx: 3 layers")
    assert [line.split() for line in lines[1:]] == [
        ["1", "mask", "Mul", "=>", "EpsilonRule(epsilon=0.0)"],
        ["2-3", "head", "Reshape", "=>", "PassRule(),", "Dense", "=>",
         "EpsilonRule(epsilon=0.0)"]]


def test_check_feeds_token_ids_and_follows_conservation(rng: np.random.Generator,
                                                        tmp_path: Path) -> None:
    """``check_model`` on token-id models: ids within the table, the dynamic sequence length
    filled; ε = 0 without biases conserves per layer and in total. A summand that is not data
    (a position embedding) absorbs its share and is not counted as conserving."""
    from lrp_onnx.check import check_model

    for model in (classifier(rng, mask=True)[0], language_model(rng, static=False)[0]):
        report = check_model(model, GRADIENT, samples=3)
        assert report.ok, report.results
        verdicts = {r.name: r.ok for r in report.results}
        assert verdicts["conservation_layers"] and verdicts["conservation_total"], report.results
    model, _ = language_model(rng, static=False)
    pos = numpy_helper.from_array(rng.standard_normal((1, 1, D)).astype(np.float32), "pos")
    model.graph.initializer.append(pos)
    gather = next(n for n in model.graph.node if n.op_type == "Gather")
    model.graph.node.insert(list(model.graph.node).index(gather) + 1, helper.make_node(
        "Add", ["emb", "pos"], ["emb_pos"], name="add_position"))
    for node in model.graph.node:
        if node.name == "lm_head":
            node.input[0] = "emb_pos"
    report = check_model(model, GRADIENT, samples=2)
    layers = next(r for r in report.results if r.name == "conservation_layers")
    assert layers.ok and "not checked: 1" in layers.detail, layers.detail
    assert next(r for r in report.results if r.name == "conservation_total").ok is None


def test_explicit_seed_on_a_sequence_output(rng: np.random.Generator) -> None:
    """``output_relevance=True``: the seed ``[N, T, V]`` as given (no ``target_position``);
    a one-hot seed at (position, class) equals the ``target``/``position`` seed."""
    model, _ = language_model(rng)
    seeded = LRP(model, GRADIENT, output_relevance=True)
    assert [i.name for i in seeded.model.graph.input] == ["input_ids", "output_relevance"]
    ids = rng.integers(0, V, (2, T))
    seed = np.zeros((2, T, V), np.float32)
    seed[0, 1, 4] = seed[1, T - 1, 7] = 1.0
    got = seeded.analyze(ids, output_relevance=seed).relevance
    by_target = LRP(model, GRADIENT)
    want = np.concatenate([by_target.analyze(ids[:1], 4, position=1).relevance,
                           by_target.analyze(ids[1:], 7, position=-1).relevance])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
