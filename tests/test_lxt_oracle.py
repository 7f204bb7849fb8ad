"""The LXT 2.1 oracle for torchvision ViTs (:mod:`lrp_onnx.testing.transformers`): exports that
match torch, CP-LRP conservation with zero offsets, and a parent process that stays unpatched."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("onnxscript")

from conftest import ROOT  # noqa: E402
from lrp_onnx.testing import transformers as T  # noqa: E402

#: A smaller ViT than the default tiny one (17 tokens, width 48) keeps the tests fast.
SMALL = {"num_layers": 2, "num_heads": 3, "hidden_dim": 48, "mlp_dim": 96, "num_classes": 5,
         "image_size": 64, "patch_size": 16}


def _images(n: int, seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64), dtype=np.float32)


def test_import_does_not_import_torch() -> None:
    code = ("import sys, lrp_onnx, lrp_onnx.testing.transformers; "
            "assert 'torch' not in sys.modules and 'lxt' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_tiny_vit_randomises_every_parameter() -> None:
    import torch

    model = T.tiny_vit(seed=0, **SMALL)
    assert not model.training
    for name, p in model.named_parameters():
        assert torch.count_nonzero(p) == p.numel(), name
    zero = T.tiny_vit(seed=0, **SMALL, zero_offsets=True)
    for name, p in zero.named_parameters():
        offset = name.endswith("bias") or name in ("class_token", "encoder.pos_embedding")
        assert bool(torch.all(p == 0)) == offset, name
    assert torch.equal(zero.heads.head.weight, model.heads.head.weight)
    assert T.vit_config(model) == {**SMALL, "representation_size": None}


@pytest.mark.parametrize(("exporter", "opset", "marker"), [
    ("legacy", 17, "Erf"), ("dynamo", 18, "Erf"), ("dynamo", 20, "Gelu"),
    ("dynamo", 23, "Attention")])
def test_export_runs_and_matches_torch(tmp_path, exporter, opset, marker) -> None:
    model = T.tiny_vit(seed=1, **SMALL)
    path = T.export_vit(model, tmp_path / "vit.onnx", exporter=exporter, opset=opset)
    assert [p.name for p in tmp_path.iterdir()] == ["vit.onnx"]  # self-contained
    hist = T.op_histogram(path)
    assert hist.get(marker, 0) == SMALL["num_layers"], hist  # one per encoder block
    x = _images(3)
    np.testing.assert_allclose(T.ort_logits(path, x), T.torch_logits(model, x), atol=1e-4)


def test_external_data_is_inlined(tmp_path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True,
              location="m.onnx.data", size_threshold=0)
    assert (tmp_path / "m.onnx.data").exists()
    T.inline_external_data(path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    loaded = onnx.load(str(path), load_external_data=False)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]),
                                  numpy_helper.to_array(w))


def test_lxt_conserves_with_zero_offsets_and_leaves_parent_unpatched() -> None:
    pytest.importorskip("lxt")
    import torch

    patched = (torch.nn.MultiheadAttention, torch.nn.LayerNorm, torch.nn.GELU)
    before = [cls.forward for cls in patched]
    model = T.tiny_vit(seed=2, **SMALL, zero_offsets=True)
    x = _images(2)
    logits = T.torch_logits(model, x)
    target = logits.argmax(1)
    rel = T.lxt_relevances(model, x, target)  # one child process, both modes
    assert [cls.forward for cls in patched] == before
    assert "lxt.efficient" not in sys.modules
    explained = logits[np.arange(2), target]
    for mode in T.MODES:
        assert rel[mode].shape == x.shape and rel[mode].dtype == np.float32
    cp = rel["cp"].reshape(2, -1).sum(1, dtype=np.float64)
    np.testing.assert_allclose(cp, explained, rtol=1e-5)
    attn = rel["attnlrp"].reshape(2, -1).sum(1, dtype=np.float64)
    assert np.all(np.abs(attn - explained) > 1e-3 * np.abs(explained))  # softmax absorbs some
    grad = T.grad_x_input(model, x, target)
    assert not np.allclose(grad, rel["cp"], atol=1e-3 * np.abs(rel["cp"]).max())
