"""lrp_onnx.cli.inputs: finding, checking, preprocessing and streaming explain's inputs.

The preprocessing references call Pillow and numpy directly (never lrp_onnx.cli.inputs).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lrp_onnx.cli.inputs import (
    InputFileError,
    ModelInput,
    Preprocess,
    Sample,
    batches,
    duplicate_stems,
    expand_inputs,
    load_preprocess,
    plan_inputs,
    read_image,
)
from lrp_onnx.errors import InvalidInput, LRPError

RGB32 = ModelInput("input", (None, 3, 32, 32), np.dtype(np.float32))
GREY8 = ModelInput("input", (None, 1, 8, 8), np.dtype(np.float32))
DYNAMIC = ModelInput("input", (None, 3, None, None), np.dtype(np.float32))
FLAT = ModelInput("input", (None, 4), np.dtype(np.float32))


def _png(path: Path, shape: tuple[int, ...], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def _reference(path: Path, mode: str, hw: tuple[int, int] | None, scale: float,
               mean: list[float], std: list[float]) -> np.ndarray:
    """Pillow + numpy: convert, bilinear resize, (p * scale - mean) / std, channels first."""
    im = Image.open(path).convert(mode)
    if hw is not None and im.size != (hw[1], hw[0]):
        im = im.resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
    a = np.asarray(im).astype(np.float64)
    chw = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    m = np.asarray(mean, np.float64)[:, None, None]
    s = np.asarray(std, np.float64)[:, None, None]
    return ((chw * scale - m) / s).astype(np.float32)


# -- preprocessing -----------------------------------------------------------------------------
def test_resize_and_normalize_match_pillow_and_numpy(tmp_path: Path) -> None:
    path = _png(tmp_path / "a.png", (40, 50, 3))
    pre = Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)).resolve(RGB32)
    assert pre.mode == "RGB" and pre.size == (32, 32)
    x, image = read_image(path, pre)
    ref = _reference(path, "RGB", (32, 32), 1 / 255, [0.485, 0.456, 0.406],
                     [0.229, 0.224, 0.225])
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(x, ref)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8


def test_rgb_image_to_grey_model_and_scale(tmp_path: Path) -> None:
    path = _png(tmp_path / "a.jpg", (20, 16, 3), seed=1)
    pre = Preprocess(scale=1.0, mean=(128.0,), std=(64.0,)).resolve(GREY8)
    assert pre.mode == "L"
    x, image = read_image(path, pre)
    np.testing.assert_array_equal(x, _reference(path, "L", (8, 8), 1.0, [128.0], [64.0]))
    assert x.shape == (1, 8, 8) and image.shape == (8, 8)


def test_no_resize_when_size_already_fits(tmp_path: Path) -> None:
    path = _png(tmp_path / "a.png", (32, 32, 3))
    x, image = read_image(path, Preprocess(resize=False).resolve(RGB32))
    np.testing.assert_array_equal(image, np.asarray(Image.open(path)))
    np.testing.assert_array_equal(x, _reference(path, "RGB", None, 1 / 255, [0.0], [1.0]))


def test_dynamic_model_keeps_image_size(tmp_path: Path) -> None:
    path = _png(tmp_path / "a.png", (12, 9, 3))
    pre = Preprocess().resolve(DYNAMIC)
    assert pre.size is None
    assert read_image(path, pre)[0].shape == (3, 12, 9)
    assert read_image(path, Preprocess(size=(5, 6)).resolve(DYNAMIC))[0].shape == (3, 5, 6)


@pytest.mark.parametrize("pre, spec, needle", [
    (Preprocess(), FLAT, "[N, 1 or 3, H, W]"),
    (Preprocess(mode="RGB"), GREY8, "mode RGB gives 3"),
    (Preprocess(mean=(0.1, 0.2)), RGB32, "mean has 2 values"),
    (Preprocess(std=(0.0,)), RGB32, "std must not be 0"),
    (Preprocess(size=(28, 28)), RGB32, "size 28 28 does not fit"),
    (Preprocess(size=(32, 32), resize=False), RGB32, "contradict"),
])
def test_options_that_do_not_fit_the_model(pre: Preprocess, spec: ModelInput,
                                           needle: str) -> None:
    with pytest.raises(InvalidInput) as info:
        pre.resolve(spec)
    assert needle in str(info.value)


def test_preprocess_file(tmp_path: Path) -> None:
    spec = tmp_path / "pre.json"
    spec.write_text(json.dumps({"size": [32, 32], "mode": "RGB", "scale": 0.5,
                                "mean": [1, 2, 3], "std": 2, "resize": True}))
    values = load_preprocess(spec)
    assert values == {"size": (32, 32), "mode": "RGB", "scale": 0.5, "mean": (1.0, 2.0, 3.0),
                      "std": (2.0,), "resize": True}
    pre = Preprocess().updated(**values).updated(scale=None, std=(4.0,))
    assert pre.scale == 0.5 and pre.std == (4.0,)


@pytest.mark.parametrize("text, needle", [
    ("{", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"sizes": [1, 2]}', "unknown key(s) 'sizes'"),
    ('{"size": [32]}', "'size' must be [H, W]"),
    ('{"size": [0, 3]}', "'size' must be [H, W]"),
    ('{"mode": "CMYK"}', "'mode' must be"),
    ('{"scale": "1/255"}', "'scale' must be a finite number"),
    ('{"mean": []}', "'mean' must not be empty"),
    ('{"std": [1, true]}', "'std' must be a finite number"),
    ('{"resize": 1}', "'resize' must be true or false"),
])
def test_bad_preprocess_file(tmp_path: Path, text: str, needle: str) -> None:
    spec = tmp_path / "pre.json"
    spec.write_text(text)
    with pytest.raises(InputFileError) as info:
        load_preprocess(spec)
    message = str(info.value)
    assert message.startswith(f"{spec}: ") and needle in message and "\n" not in message
    with pytest.raises(InputFileError, match="no such file"):
        load_preprocess(tmp_path / "missing.json")


# -- finding and checking files ----------------------------------------------------------------
def test_expand_inputs_sorted_and_filtered(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.png", "a.NPY", "c.jpeg", "sub/d.jpg"):
        (folder / name).write_bytes(b"")
    (folder / "notes.txt").write_text("skip me")
    single = tmp_path / "x.npy"
    single.write_bytes(b"")
    names = [p.name for p in expand_inputs([single, folder])]
    assert names == ["x.npy", "a.NPY", "b.png", "c.jpeg"]
    assert [p.name for p in expand_inputs([folder], recursive=True)] == \
        ["a.NPY", "b.png", "c.jpeg", "d.jpg"]


@pytest.mark.parametrize("make, needle", [
    (lambda d: d / "missing.png", "no such file or folder"),
    (lambda d: (d / "m.txt", (d / "m.txt").write_text("x"))[0], "not a .npy, .png"),
    (lambda d: (d / "empty", (d / "empty").mkdir())[0], "folder holds no"),
])
def test_expand_inputs_refusals(tmp_path: Path, make, needle: str) -> None:
    path = make(tmp_path)
    with pytest.raises(InputFileError) as info:
        expand_inputs([path])
    assert str(info.value).startswith(f"{path}: ") and needle in str(info.value)
    assert isinstance(info.value, LRPError)


def test_plan_npy_single_and_batched(tmp_path: Path) -> None:
    one, many = tmp_path / "one.npy", tmp_path / "many.npy"
    np.save(one, np.zeros((3, 32, 32), np.float64))
    np.save(many, np.zeros((3, 3, 32, 32), np.float32))
    plan = plan_inputs([one, many], RGB32)
    assert [(s.stem, s.label) for s in plan.samples] == [
        ("one", "one.npy"), ("many_0", "many.npy[0]"), ("many_1", "many.npy[1]"),
        ("many_2", "many.npy[2]")]
    assert plan.preprocess is None


@pytest.mark.parametrize("array, needle", [
    (np.zeros((3, 8, 8), np.float32), "array of shape [3, 8, 8] does not fit input 'input'"),
    (np.zeros((0, 3, 32, 32), np.float32), "holds no samples"),
    (np.zeros((3, 32, 32), np.complex64), "expected real numbers"),
    (np.array([{"a": 1}], dtype=object), "not a readable .npy array"),
])
def test_plan_npy_refusals(tmp_path: Path, array: np.ndarray, needle: str) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, array, allow_pickle=True)
    with pytest.raises(InputFileError) as info:
        plan_inputs([path], RGB32)
    assert str(info.value).startswith(f"{path}: ") and needle in str(info.value)


def test_plan_image_refusals(tmp_path: Path) -> None:
    big = _png(tmp_path / "big.png", (40, 40, 3))
    with pytest.raises(InputFileError, match=r"big.png: image is 40x40 .* resizing is off"):
        plan_inputs([big], RGB32, Preprocess(resize=False))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(InputFileError, match="broken.png: not a readable image"):
        plan_inputs([broken], RGB32)
    with pytest.raises(InputFileError, match=r"big.png: images need a model input"):
        plan_inputs([big], FLAT)
    spec = tmp_path / "pre.json"
    with pytest.raises(InputFileError, match=r"pre.json: mean has 2 values"):
        plan_inputs([big], RGB32, Preprocess(mean=(1.0, 2.0)), source=str(spec))


def test_truncated_image_fails_when_read(tmp_path: Path) -> None:
    path = _png(tmp_path / "t.png", (32, 32, 3))
    path.write_bytes(path.read_bytes()[:60])
    plan = plan_inputs([path], RGB32)  # the header is fine
    with pytest.raises(InputFileError, match="t.png: cannot decode image"):
        list(batches(plan, RGB32, 4))


def test_duplicate_stems(tmp_path: Path) -> None:
    a, b = Sample(tmp_path / "x.png"), Sample(tmp_path / "sub" / "x.npy")
    assert duplicate_stems([a, b]) == (a, b)
    assert duplicate_stems([Sample(tmp_path / "x.npy", 0), Sample(tmp_path / "x_0.png")])
    assert duplicate_stems([a, Sample(tmp_path / "y.png")]) is None


# -- streaming ---------------------------------------------------------------------------------
def test_batches_stream_with_bounded_memory(tmp_path: Path, monkeypatch) -> None:
    import lrp_onnx.cli.inputs as inputs

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(7):
        _png(folder / f"img{i}.png", (32, 32, 3), seed=i)
    arr = np.random.default_rng(0).standard_normal((5, 3, 32, 32))
    np.save(tmp_path / "arr.npy", arr)
    plan = plan_inputs(expand_inputs([folder, tmp_path / "arr.npy"]), RGB32)
    reads: list[str] = []
    real = inputs.read_image
    monkeypatch.setattr(inputs, "read_image",
                        lambda p, *a, **k: (reads.append(p.name), real(p, *a, **k))[1])
    stream = batches(plan, RGB32, 3, keep_images=True)
    first = next(stream)
    assert len(reads) == 3  # nothing read ahead of the batch
    assert first.x.shape == (3, 3, 32, 32) and first.x.dtype == np.float32
    assert [s.label for s in first.samples] == ["img0.png", "img1.png", "img2.png"]
    rest = list(stream)
    assert [len(b.samples) for b in rest] == [3, 3, 3]
    assert all(img is not None for img in first.images)
    npy = np.concatenate([b.x for b in rest])[4:]  # img3..img6 first, then the array
    np.testing.assert_array_equal(npy, arr.astype(np.float32))
    assert rest[-1].images == [None, None, None]
    with pytest.raises(ValueError):
        next(batches(plan, RGB32, 0))


def test_batches_split_where_shapes_change(tmp_path: Path) -> None:
    a = _png(tmp_path / "a.png", (10, 10, 3))
    b = _png(tmp_path / "b.png", (10, 10, 3))
    c = _png(tmp_path / "c.png", (12, 10, 3))
    plan = plan_inputs([a, b, c], DYNAMIC)
    shapes = [batch.x.shape for batch in batches(plan, DYNAMIC, 16)]
    assert shapes == [(2, 3, 10, 10), (1, 3, 12, 10)]


def test_model_input_of() -> None:
    import onnx

    from conftest import MODELS

    spec = ModelInput.of(onnx.load(MODELS / "seed_vgg.onnx"), "input")
    assert spec == RGB32 and spec.describe() == "[N, 3, 32, 32]"
    assert spec.fits((3, 32, 32)) and not spec.fits((1, 3, 32, 32))
