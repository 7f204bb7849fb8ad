"""``lrp-onnx export-repo``: the Triton model repository entry, its ``config.pbtxt`` parsed back
(a small protobuf text-format reader) and checked against the compiled model's inputs and
outputs; the copied model runs; refusals are one line and write nothing."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import MODELS, ort_session
from lrp_onnx import LRP, EpsilonPlus
from lrp_onnx.cli.export_repo import triton_config
from lrp_onnx.cli.main import main

TOKEN = re.compile(r'\s*(?:(?P<str>"[^"]*")|(?P<num>-?\d+)|(?P<word>[A-Za-z_]\w*)'
                   r'|(?P<p>[\[\]{}:,]))')


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format as nested dicts; a repeated field (``name [ ... ]`` or given
    twice) becomes a list."""
    tokens = [m.group(m.lastgroup) for m in TOKEN.finditer(text)]
    assert "".join(tokens) == re.sub(r"\s+", "", text), "unparsed text"
    pos = 0

    def value():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "{":
            return message("}")
        if tok == "[":
            items = []
            while tokens[pos] != "]":
                items.append(value())
                if tokens[pos] == ",":
                    pos += 1
            pos += 1
            return items
        if tok.startswith('"'):
            return tok[1:-1]
        return int(tok) if re.fullmatch(r"-?\d+", tok) else tok

    def message(end):
        nonlocal pos
        out: dict = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            out[key] = value()
            if pos < len(tokens) and tokens[pos] == ",":
                pos += 1
        pos += 1
        return out

    return message(None)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "digits.lrp.onnx"
    LRP(MODELS / "digits_cnn.onnx", EpsilonPlus()).save(path)
    return path


def test_repository_entry_parses_back(compiled: Path, tmp_path: Path, capsys) -> None:
    repo = tmp_path / "repo"
    assert main(["export-repo", str(compiled), str(repo), "--name", "digits",
                 "--max-batch-size", "32", "--kind", "cpu"]) == 0
    assert capsys.readouterr().out == (f"wrote {repo}/digits/1/model.onnx and "
                                       f"{repo}/digits/config.pbtxt\n")
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == [
        "digits", "digits/1", "digits/1/model.onnx", "digits/config.pbtxt"]
    assert (repo / "digits" / "1" / "model.onnx").read_bytes() == compiled.read_bytes()
    config = parse_pbtxt((repo / "digits" / "config.pbtxt").read_text())
    assert config == {
        "name": "digits", "backend": "onnxruntime", "max_batch_size": 32,
        "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [1, 8, 8]},
                  {"name": "target", "data_type": "TYPE_INT64", "dims": [1],
                   "reshape": {"shape": []}}],
        "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [10]},
                   {"name": "relevance", "data_type": "TYPE_FP32", "dims": [1, 8, 8]}],
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "dynamic_batching": {},
    }
    # what Triton feeds after its reshape: input [B, 1, 8, 8], target [B]
    x = np.load(MODELS / "digits_samples.npy")[:3]
    logits, rel = ort_session(repo / "digits" / "1" / "model.onnx").run(
        None, {"input": x, "target": np.full(3, -1, np.int64)})
    assert logits.shape == (3, 10) and rel.shape == (3, 1, 8, 8)


def test_static_batch_has_no_batching(compiled: Path) -> None:
    model = onnx.load(compiled)
    for vi in [*model.graph.input, *model.graph.output]:
        vi.type.tensor_type.shape.dim[0].dim_value = 4
    config = parse_pbtxt(triton_config(model, "d", 64))
    assert config["max_batch_size"] == 0 and "dynamic_batching" not in config
    assert config["input"][1]["dims"] == [4] and config["output"][1]["dims"] == [4, 1, 8, 8]


@pytest.mark.parametrize("case", ["not-compiled", "exists", "bad-name"])
def test_refusals_are_one_line_and_write_nothing(compiled: Path, tmp_path: Path, capsys,
                                                 case: str) -> None:
    repo = tmp_path / "repo"
    model, name = str(compiled), "digits"
    if case == "not-compiled":
        model = str(MODELS / "digits_cnn.onnx")
    elif case == "exists":
        (repo / "digits").mkdir(parents=True)
    else:
        name = "../x"
    assert main(["export-repo", model, str(repo), "--name", name]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lrp-onnx: error: ")
    assert {
        "not-compiled": "not a compiled model", "exists": "exists; remove it",
        "bad-name": "give a plain folder name"}[case] in err
    assert [p.name for p in tmp_path.rglob("*")] == (["repo", "digits"] if case == "exists"
                                                      else [])
