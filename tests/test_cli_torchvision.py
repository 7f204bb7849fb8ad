"""Every ``lrp-onnx`` command on torchvision VGG16 and ResNet-18 exports (random weights).

The relevance itself is compared with Zennit in tests/test_zoo.py; here the commands run on the
real-size models as a user runs them: convert, show, check (original and compiled), explain on
ImageNet-style JPEG/PNG images (resized and normalized by a preprocessing file) and on a .npy
batch, whose relevance must equal ``LRP.analyze`` on the same array.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")

from lrp_onnx import LRP, EpsilonPlusFlat  # noqa: E402
from lrp_onnx.cli.main import main  # noqa: E402
from lrp_onnx.testing import oracle, zoo  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
def test_every_command_on_torchvision_export(name: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    try:
        model = oracle.export(zoo.build(name), tmp_path / f"{name}.onnx",
                              torch.zeros(1, 3, 224, 224))
        compiled = tmp_path / f"{name}.lrp.onnx"
        assert main(["convert", str(model), str(compiled), "--composite", "EpsilonPlusFlat"]) == 0
        assert f"wrote {compiled}" in capsys.readouterr().out

        assert main(["show", str(model), "--composite", "EpsilonPlusFlat", "--flat"]) == 0
        shown = capsys.readouterr().out
        assert "FlatRule()" in shown and "ZPlusRule()" in shown

        for args in (["check", str(model), "--composite", "EpsilonPlusFlat", "--json"],
                     ["check", str(compiled), "--json", "--samples", "2"]):
            assert main(args) == 0
            report = json.loads(capsys.readouterr().out)
            assert report["ok"] is True, report
            status = {r["name"]: r["ok"] for r in report["results"]}
            assert status["outputs_unchanged"] is True and status["relevance_finite"] is True

        rng = np.random.default_rng(0)
        images = tmp_path / "images"
        images.mkdir()
        Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)).save(
            images / "a.jpg")
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(
            images / "b.png")
        prep = tmp_path / "imagenet.json"
        prep.write_text(json.dumps({"size": [224, 224], "mean": MEAN, "std": STD}))
        out = tmp_path / "out"
        assert main(["explain", str(compiled), str(images), "--preprocess", str(prep),
                     "--out", str(out), "--overlay", "--device", "cpu"]) == 0
        printed = capsys.readouterr().out
        assert "execution provider: CPUExecutionProvider" in printed
        for stem in ("a", "b"):
            for suffix in (".png", ".overlay.png", ".relevance.npy"):
                assert (out / f"{stem}{suffix}").is_file(), f"{stem}{suffix}"
            with Image.open(out / f"{stem}.png") as png:
                assert png.size == (224, 224) and png.mode == "RGB"
        # The PNG input unresized: its relevance is the compiled model's on the normalized array.
        # (float64 arithmetic, one rounding to float32, as documented in docs/cli.md)
        pixels = np.asarray(Image.open(images / "b.png").convert("RGB"), dtype=np.float64)
        x_b = ((pixels / 255.0 - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)[None]
        analyzer = LRP(model, EpsilonPlusFlat())
        want = analyzer.analyze(x_b.astype(np.float32), device="cpu").relevance
        got = np.load(out / "b.relevance.npy")
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())

        batch = rng.standard_normal((2, 3, 224, 224)).clip(-3, 3).astype(np.float32)
        np.save(tmp_path / "batch.npy", batch)
        assert main(["explain", str(compiled), str(tmp_path / "batch.npy"), "--target", "7",
                     "--out", str(out), "--device", "cpu"]) == 0
        capsys.readouterr()
        want = analyzer.analyze(batch, 7, device="cpu").relevance
        for i in range(2):
            got = np.load(out / f"batch_{i}.relevance.npy")
            np.testing.assert_array_equal(got[0], want[i])
    finally:  # VGG16's export and compiled model are 1 GB
        shutil.rmtree(tmp_path, ignore_errors=True)
