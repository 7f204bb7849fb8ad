"""lrp_onnx.cli.heatmap: colours, scaling, channel reduction, overlays and PNG files.

Every expected colour is computed here from the documented ramp (matplotlib's ``"bwr"``:
``v >= 0 -> (1, 1 - v, 1 - v)``, ``v < 0 -> (1 + v, 1 + v, 1)``, times 255, rounded), never by
calling the module's own helpers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lrp_onnx.cli.heatmap import colorize, heatmap, overlay, save_png

WHITE, RED, BLUE = (255, 255, 255), (255, 0, 0), (0, 0, 255)


def _bwr(v: float) -> tuple[int, int, int]:
    """The documented ramp for one value in [-1, 1] (independent of the module)."""
    fade = int(np.rint(255 * (1 - abs(v))))
    return (255, fade, fade) if v >= 0 else (fade, fade, 255)


def _swap_red_blue(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., ::-1]


# -- colours ----------------------------------------------------------------------------------
def test_sign_gives_colour_and_zero_gives_white() -> None:
    r = np.zeros((4, 4), np.float32)
    r[0, 0], r[1, 1] = 1.0, -1.0
    rgb = heatmap(r, percentile=100)
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == RED
    assert tuple(rgb[1, 1]) == BLUE
    assert (rgb[2:, 2:] == 255).all()


def test_ramp_values(seed: int) -> None:
    """Intermediate values follow the linear blue-white-red ramp, scaled by max|R| at p=100."""
    rng = np.random.default_rng(seed)
    r = rng.uniform(-3, 3, size=(5, 7))
    rgb = heatmap(r, percentile=100)
    scale = np.abs(r).max()
    expected = np.array([[_bwr(v / scale) for v in row] for row in r], dtype=np.uint8)
    np.testing.assert_array_equal(rgb, expected)


def test_ramp_is_smooth_and_monotone() -> None:
    v = np.linspace(-1, 1, 2001)
    rgb = colorize(v).astype(int)
    assert np.abs(np.diff(rgb, axis=0)).max() <= 1          # no jumps: a smooth ramp
    pos, neg = rgb[v >= 0], rgb[v < 0]
    assert (pos[:, 0] == 255).all() and (np.diff(pos[:, 1]) <= 0).all()
    assert (neg[:, 2] == 255).all() and (np.diff(neg[:, 0]) >= 0).all()
    assert (pos[:, 1] == pos[:, 2]).all() and (neg[:, 0] == neg[:, 1]).all()


def test_symmetry(seed: int) -> None:
    """heatmap(-R) is heatmap(R) with red and blue swapped (same scale for both signs)."""
    r = np.random.default_rng(seed).standard_normal((3, 9, 9))
    for reduce in ("sum", "abs", "norm"):
        for p in (50.0, 99.5, 100.0):
            a = heatmap(r, reduce=reduce, percentile=p)
            b = heatmap(-r, reduce=reduce, percentile=p)
            if reduce == "sum":
                np.testing.assert_array_equal(b, _swap_red_blue(a))
            else:   # sign-free reductions: the same picture
                np.testing.assert_array_equal(b, a)


def test_percentile_clipping() -> None:
    """The scale is the percentile of |R|: one outlier does not wash out the rest."""
    r = np.ones((10, 10))
    r[0, 0] = 1000.0
    rgb = heatmap(r, percentile=50)          # scale 1: everything saturates to red
    assert (rgb.reshape(-1, 3) == RED).all()
    rgb = heatmap(r, percentile=100)         # scale 1000: the rest is nearly white
    assert tuple(rgb[0, 0]) == RED
    assert tuple(rgb[5, 5]) == _bwr(1 / 1000)
    # The default is the 99.5th percentile of |R| (numpy's linear interpolation).
    r = np.arange(1, 401, dtype=np.float64).reshape(20, 20) * np.where(
        np.arange(400).reshape(20, 20) % 2, 1, -1)
    scale = np.percentile(np.abs(r), 99.5)
    rgb = heatmap(r)
    expected = np.array([[_bwr(float(np.clip(v / scale, -1, 1))) for v in row] for row in r],
                        dtype=np.uint8)
    np.testing.assert_array_equal(rgb, expected)
    assert tuple(rgb.reshape(-1, 3)[-1]) == RED and tuple(rgb.reshape(-1, 3)[-2]) == BLUE


def test_sparse_relevance_falls_back_to_max() -> None:
    """When the percentile of |R| is zero (fewer nonzeros than 0.5%), max|R| is the scale."""
    r = np.zeros((32, 32))
    r[3, 4] = -2.0
    r[5, 6] = 1.0
    rgb = heatmap(r)
    assert tuple(rgb[3, 4]) == BLUE
    assert tuple(rgb[5, 6]) == _bwr(0.5)


@pytest.mark.parametrize("shape", [(8, 8), (1, 8, 8), (3, 5, 6)])
def test_all_zero_is_white_without_warnings(shape: tuple[int, ...]) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for reduce in ("sum", "abs", "norm"):
            rgb = heatmap(np.zeros(shape, np.float32), reduce=reduce)
            assert rgb.shape == (*shape[-2:], 3)
            assert (rgb == 255).all()


def test_tiny_and_integer_relevance() -> None:
    tiny = np.zeros((4, 4), np.float32)
    tiny[0, 0] = np.float32(1e-40)           # subnormal: still a valid scale
    assert tuple(heatmap(tiny)[0, 0]) == RED
    ints = np.array([[0, 2], [-2, 1]], dtype=np.int64)
    rgb = heatmap(ints, percentile=100)
    assert [tuple(c) for c in rgb.reshape(-1, 3)] == [WHITE, RED, BLUE, _bwr(0.5)]


# -- shapes and channel reduction -------------------------------------------------------------
def test_shapes() -> None:
    assert heatmap(np.ones((7, 5))).shape == (7, 5, 3)
    assert heatmap(np.ones((3, 7, 5))).shape == (7, 5, 3)
    assert heatmap(np.ones((1, 7, 5))).shape == (7, 5, 3)


def test_channel_reduction() -> None:
    """Pixel 0: channels cancel (sum 0, abs 2, norm sqrt 2); pixel 1: (2, 0) -> 2 for all."""
    r = np.zeros((2, 1, 3))
    r[:, 0, 0] = [1.0, -1.0]
    r[:, 0, 1] = [2.0, 0.0]
    r[:, 0, 2] = [-1.0, -1.0]
    s = heatmap(r, reduce="sum", percentile=100)[0]      # sums 0, 2, -2
    assert [tuple(c) for c in s] == [WHITE, RED, BLUE]
    a = heatmap(r, reduce="abs", percentile=100)[0]      # 2, 2, 2
    assert [tuple(c) for c in a] == [RED, RED, RED]
    n = heatmap(r, reduce="norm", percentile=100)[0]     # sqrt2, 2, sqrt2
    assert [tuple(c) for c in n] == [_bwr(np.sqrt(2) / 2), RED, _bwr(np.sqrt(2) / 2)]
    # (H, W) input ignores ``reduce``: abs does not fold the sign away.
    assert tuple(heatmap(np.array([[-1.0]]), reduce="abs")[0, 0]) == BLUE


# -- errors -----------------------------------------------------------------------------------
def test_nan_and_inf_are_errors() -> None:
    r = np.zeros((2, 4, 4), np.float32)
    r[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        heatmap(r)
    r[1, 2, 3] = np.inf
    with pytest.raises(ValueError, match="infinity"):
        heatmap(r)


@pytest.mark.parametrize("kwargs, match", [
    ({"reduce": "max"}, "reduce"),
    ({"percentile": 0}, "percentile"),
    ({"percentile": 100.5}, "percentile"),
    ({"percentile": -5}, "percentile"),
])
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        heatmap(np.ones((4, 4)), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(4,), (1, 1, 4, 4), (2, 1, 3, 4, 4)])
def test_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="expected \\(C, H, W\\) or \\(H, W\\)"):
        heatmap(np.ones(shape))


def test_bad_dtype() -> None:
    with pytest.raises(ValueError, match="dtype"):
        heatmap(np.ones((4, 4), dtype=np.complex64))


# -- overlay ----------------------------------------------------------------------------------
def test_overlay_grey_layouts_agree() -> None:
    """(H, W), (1, H, W), (H, W, 1) and (C, H, W) float images give the same min-max grey."""
    img = np.linspace(-2.0, 6.0, 12).reshape(3, 4)
    rgb = heatmap(np.ones((3, 4)))           # all red
    a = overlay(rgb, img)
    assert a.shape == (3, 4, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, overlay(rgb, img[None]))
    np.testing.assert_array_equal(a, overlay(rgb, img[..., None]))
    np.testing.assert_array_equal(a, overlay(rgb, np.stack([img, img, img])))
    grey = (img - img.min()) / (img.max() - img.min())
    expected = np.rint(255 * (0.5 * np.array([1.0, 0.0, 0.0]) + 0.5 * grey[..., None]))
    np.testing.assert_array_equal(a, expected.astype(np.uint8))


def test_overlay_alpha_extremes_and_uint8_rgb() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    rgb = heatmap(rng.standard_normal((5, 6)))
    np.testing.assert_array_equal(overlay(rgb, image, alpha=1.0), rgb)
    np.testing.assert_array_equal(overlay(rgb, image, alpha=0.0), image)   # uint8 RGB as is
    np.testing.assert_array_equal(overlay(rgb, np.moveaxis(image, -1, 0), alpha=0.0), image)
    mixed = overlay(rgb, image, alpha=0.25)
    expected = np.rint(0.25 * rgb.astype(float) + 0.75 * image.astype(float)).astype(np.uint8)
    assert np.abs(mixed.astype(int) - expected.astype(int)).max() <= 1


def test_overlay_constant_image_is_mid_grey() -> None:
    out = overlay(np.full((2, 2, 3), 255, np.uint8), np.zeros((2, 2)), alpha=0.0)
    assert (out == 128).all()


def test_overlay_errors() -> None:
    rgb = heatmap(np.ones((4, 4)))
    with pytest.raises(ValueError, match="does not match"):
        overlay(rgb, np.ones((5, 5)))
    with pytest.raises(ValueError, match="does not match"):
        overlay(rgb, np.ones((2, 3, 4, 4)))
    with pytest.raises(ValueError, match="alpha"):
        overlay(rgb, np.ones((4, 4)), alpha=1.5)
    with pytest.raises(ValueError, match="uint8"):
        overlay(rgb.astype(np.float32), np.ones((4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        overlay(rgb, np.full((4, 4), np.nan))


# -- PNG files --------------------------------------------------------------------------------
def test_png_round_trip(tmp_path: Path, seed: int) -> None:
    rgb = heatmap(np.random.default_rng(seed).standard_normal((3, 8, 8)))
    save_png(rgb, tmp_path / "h.png")
    with Image.open(tmp_path / "h.png") as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (8, 8)
        np.testing.assert_array_equal(np.asarray(im), rgb)


def test_png_nearest_neighbour_scale(tmp_path: Path) -> None:
    rgb = heatmap(np.array([[1.0, -1.0], [0.0, 0.5]]), percentile=100)
    save_png(rgb, tmp_path / "big.png", scale=16)
    with Image.open(tmp_path / "big.png") as im:
        assert im.size == (32, 32)            # (width, height)
        big = np.asarray(im)
    for i in range(2):
        for j in range(2):
            block = big[16 * i:16 * i + 16, 16 * j:16 * j + 16]
            assert (block == rgb[i, j]).all()


def test_png_non_square_orientation(tmp_path: Path) -> None:
    rgb = np.zeros((2, 5, 3), np.uint8)
    rgb[1, 4] = RED
    save_png(rgb, tmp_path / "wide.png", scale=3)
    with Image.open(tmp_path / "wide.png") as im:
        assert im.size == (15, 6)
        assert tuple(np.asarray(im)[5, 14]) == RED


def test_png_atomic_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "out.png"
    save_png(np.zeros((4, 4, 3), np.uint8), path)
    save_png(np.full((4, 4, 3), 255, np.uint8), path)      # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["out.png"]
    with Image.open(path) as im:
        assert (np.asarray(im) == 255).all()


def test_png_failure_keeps_old_file_and_leaves_nothing(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keep.png"
    save_png(np.zeros((4, 4, 3), np.uint8), path)
    before = path.read_bytes()

    def broken_save(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        assert not isinstance(fp, str | Path)
        fp.write(b"\x89PNG partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_png(np.full((4, 4, 3), 255, np.uint8), path)
    assert sorted(os.listdir(tmp_path)) == ["keep.png"]
    assert path.read_bytes() == before
    with pytest.raises(OSError, match="disk full"):
        save_png(np.full((4, 4, 3), 255, np.uint8), tmp_path / "new.png")
    assert sorted(os.listdir(tmp_path)) == ["keep.png"]


def test_png_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        save_png(np.zeros((4, 4, 3), np.float32), tmp_path / "a.png")
    with pytest.raises(ValueError, match="uint8"):
        save_png(np.zeros((4, 4), np.uint8), tmp_path / "a.png")
    for scale in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="scale"):
            save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "a.png", scale=scale)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "missing" / "a.png")
    assert os.listdir(tmp_path) == []


def test_patch_heatmap_is_one_colour_per_patch() -> None:
    """``patch=P`` sums each P x P block (a ViT's patch token) and draws it at full size; a
    partial block at the border is summed too; the sum of the map is unchanged."""
    from lrp_onnx.cli.heatmap import patch_sums

    rng = np.random.default_rng(0)
    r = rng.standard_normal((3, 10, 12))
    sums = patch_sums(r.sum(0), 4)
    assert sums.shape == (10, 12)
    assert np.isclose(sums[0, 0], r[:, :4, :4].sum())
    assert np.isclose(sums[9, 11], r[:, 8:, 8:].sum())
    assert len(np.unique(sums[:4, :4])) == 1 and len(np.unique(sums[8:, 8:])) == 1
    per_block = [r.sum(0)[i:i + 4, j:j + 4].sum() for i in range(0, 10, 4) for j in range(0, 12, 4)]
    assert np.isclose(sum(per_block), r.sum())
    rgb = heatmap(r, patch=4)
    assert rgb.shape == (10, 12, 3) and len(np.unique(rgb[4:8, 4:8].reshape(-1, 3), axis=0)) == 1
    with pytest.raises(ValueError, match="patch"):
        heatmap(r, patch=0)
