"""Loading: external data, and the locations that are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import lrp_onnx as L
from conftest import MODELS, ort_session

SEED = MODELS / "seed_vgg.onnx"


def test_external_data_is_read(tmp_path: Path, rng: np.random.Generator) -> None:
    model = onnx.load(SEED)
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.data", size_threshold=1024)
    assert (tmp_path / "ext.data").stat().st_size > 2_000_000 and path.stat().st_size < 100_000
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    from_ext = L.LRP(path, L.EpsilonPlusFlat()).analyze(x, target=[1, 2]).relevance
    plain = L.LRP(SEED, L.EpsilonPlusFlat()).analyze(x, target=[1, 2]).relevance
    np.testing.assert_array_equal(from_ext, plain)


@pytest.mark.parametrize("location", ["../outside.data", "/etc/passwd", "missing.data",
                                      "link.data", "sub/../../outside.data"])
def test_bad_external_locations_are_refused(tmp_path: Path, location: str) -> None:
    model = onnx.load(SEED)
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save_model(model, folder / "m.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.data", size_threshold=1024)
    (tmp_path / "outside.data").write_bytes((folder / "w.data").read_bytes())
    (folder / "sub").mkdir()
    # A link inside the folder that resolves outside it.
    (folder / "link.data").symlink_to(tmp_path / "outside.data")
    patched = onnx.load(folder / "m.onnx", load_external_data=False)
    for t in patched.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    with open(folder / "m.onnx", "wb") as fh:
        fh.write(patched.SerializeToString())
    with pytest.raises(L.ModelLoadError, match="m.onnx: tensor"):
        L.LRP(folder / "m.onnx")


def test_compiled_model_runs_from_saved_file(tmp_path: Path, rng: np.random.Generator) -> None:
    analyzer = L.LRP(SEED, L.EpsilonPlusFlat())
    analyzer.save(tmp_path / "c.onnx")
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    _, rel = ort_session(tmp_path / "c.onnx").run(None, {"input": x, "target": np.array([-1])})
    np.testing.assert_array_equal(rel, analyzer.analyze(x).relevance)
    assert [p.name for p in tmp_path.iterdir()] == ["c.onnx"]  # no temporary file left


def test_streamed_read_equals_protobuf_parse(tmp_path: Path) -> None:
    """``read_model`` parses initializers one by one; the result is ``ParseFromString``'s, for
    a model whose fields come in an unusual order (initializers before nodes, a repeated
    graph field merged) too."""
    from lrp_onnx.io import read_model

    model = onnx.load(SEED)
    with SEED.open("rb") as fh:
        assert read_model(fh) == model
    # graph fields in another order, and the graph split over two fields (protobuf merges)
    first, second = onnx.GraphProto(), onnx.GraphProto()
    first.initializer.extend(model.graph.initializer[:3])
    second.CopyFrom(model.graph)
    del second.initializer[:3]
    shell = onnx.ModelProto()
    shell.CopyFrom(model)
    shell.ClearField("graph")
    key = bytes([onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number << 3 | 2])

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n >> 7 else 0))
            n >>= 7
            if not n:
                return bytes(out)

    parts = [key + varint(g.ByteSize()) + g.SerializeToString() for g in (first, second)]
    data = parts[0] + shell.SerializeToString() + parts[1]
    path = tmp_path / "odd.onnx"
    path.write_bytes(data)
    expected = onnx.ModelProto()
    expected.ParseFromString(data)
    with path.open("rb") as fh:
        assert read_model(fh) == expected


@pytest.mark.parametrize("cut", [1, 7, 1000, -5])
def test_truncated_file_is_a_clean_error(tmp_path: Path, cut: int) -> None:
    data = SEED.read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(L.ModelLoadError, match="cut.onnx: "):
        L.LRP(path)
