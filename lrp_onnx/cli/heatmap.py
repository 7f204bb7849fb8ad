"""Heatmaps of relevance maps: a blue-white-red colormap, overlays and PNG files (numpy + Pillow).

>>> rgb = heatmap(expl.relevance[0])                  # doctest: +SKIP
>>> save_png(overlay(rgb, x[0]), "explained.png", scale=16)

Colours follow the usual LRP convention: white is zero relevance, red is positive (evidence for
the explained class), blue is negative (evidence against it). The ramp is linear in each colour
channel, as matplotlib's ``"bwr"``: ``v`` in ``[-1, 1]`` maps to ``(1, 1 - v, 1 - v)`` for
``v >= 0`` and ``(1 + v, 1 + v, 1)`` for ``v < 0``; ``v`` is the relevance divided by a
percentile of ``|R|`` and clipped. Nothing here needs matplotlib.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lrp_onnx.cli.outputs import write_atomic

#: Channel reductions :func:`heatmap` accepts for a ``(C, H, W)`` relevance map.
REDUCTIONS = ("sum", "abs", "norm")


def _check_finite(values: np.ndarray, what: str) -> None:
    """Raise ``ValueError`` naming NaN / infinity if ``values`` holds any."""
    if np.isnan(values).any():
        raise ValueError(f"{what} contains NaN ({int(np.isnan(values).sum())} values)")
    if np.isinf(values).any():
        raise ValueError(f"{what} contains infinity ({int(np.isinf(values).sum())} values)")


def reduce_channels(relevance: np.ndarray, reduce: str = "sum") -> np.ndarray:
    """One relevance value per pixel: ``(C, H, W)`` or ``(H, W)`` in, float64 ``(H, W)`` out.

    Args:
        relevance: relevance of one sample, ``(C, H, W)`` (channels first, as the model's
            input) or ``(H, W)``.
        reduce: ``"sum"`` (signed sum over channels, conserves relevance), ``"abs"`` (sum of
            ``|R|``: where the model looked, sign ignored) or ``"norm"`` (L2 norm over channels).

    Raises:
        ValueError: unknown ``reduce``, wrong number of dimensions, NaN or infinite values.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce={reduce!r}: expected one of {', '.join(REDUCTIONS)}")
    r = np.asarray(relevance)
    if r.ndim not in (2, 3):
        hint = " (one sample: pass relevance[i])" if r.ndim == 4 else ""
        raise ValueError(f"relevance of shape {r.shape}: expected (C, H, W) or (H, W){hint}")
    if not (np.issubdtype(r.dtype, np.floating) or np.issubdtype(r.dtype, np.integer)):
        raise ValueError(f"relevance of dtype {r.dtype}: expected a real number type")
    r = r.astype(np.float64)
    _check_finite(r, "relevance")
    if r.ndim == 2:
        return r
    if reduce == "sum":
        out: np.ndarray = r.sum(axis=0)
    elif reduce == "abs":
        out = np.abs(r).sum(axis=0)
    else:
        out = np.sqrt((r * r).sum(axis=0))
    return out


def colorize(values: np.ndarray) -> np.ndarray:
    """The blue-white-red ramp: ``values`` in ``[-1, 1]`` (clipped) to uint8 RGB ``(..., 3)``.

    ``0`` is white, ``+1`` pure red ``(255, 0, 0)``, ``-1`` pure blue ``(0, 0, 255)``; each
    channel is linear in between (matplotlib's ``"bwr"``). The map is exactly symmetric:
    ``colorize(-v)`` is ``colorize(v)`` with the red and blue channels swapped.
    """
    v = np.clip(np.asarray(values, dtype=np.float64), -1.0, 1.0)
    fade = np.rint(255.0 * (1.0 - np.abs(v))).astype(np.uint8)   # the two channels that fade
    full = np.full_like(fade, 255)
    pos = v >= 0
    red = np.where(pos, full, fade)
    blue = np.where(pos, fade, full)
    return np.stack([red, fade, blue], axis=-1)


def patch_sums(values: np.ndarray, patch: int) -> np.ndarray:
    """Each ``patch x patch`` block of ``(H, W)`` replaced by its sum (a ViT's relevance per
    patch token, drawn at full resolution); a partial block at the border is summed as well."""
    h, w = values.shape
    ph, pw = -(-h // patch), -(-w // patch)
    padded = np.zeros((ph * patch, pw * patch))
    padded[:h, :w] = values
    sums = padded.reshape(ph, patch, pw, patch).sum(axis=(1, 3))
    return np.asarray(np.kron(sums, np.ones((patch, patch)))[:h, :w])


def heatmap(relevance: np.ndarray, *, reduce: str = "sum", percentile: float = 99.5,
            patch: int | None = None) -> np.ndarray:
    """Colour one sample's relevance map: uint8 RGB ``(H, W, 3)``, white at zero.

    Channels are reduced first (:func:`reduce_channels`). The map is scaled by the
    ``percentile``-th percentile of ``|R|`` (so that a few extreme pixels do not wash out the
    rest; values beyond it are clipped to full colour) and coloured with :func:`colorize`:
    positive relevance red, negative blue, zero white. If that percentile is zero (sparse
    relevance), the largest ``|R|`` is the scale instead; an all-zero map is all white.

    Args:
        relevance: ``(C, H, W)`` or ``(H, W)``, e.g. ``explanation.relevance[i]``.
        reduce: ``"sum"`` (default), ``"abs"`` or ``"norm"``; see :func:`reduce_channels`.
        percentile: in ``(0, 100]``; ``100`` scales by the largest ``|R|`` (no clipping).
        patch: sum the reduced map over ``patch x patch`` blocks first (a ViT's patch size:
            one colour per patch token, :func:`patch_sums`).

    Raises:
        ValueError: NaN or infinite relevance, a bad shape, ``reduce`` or ``percentile``.
    """
    if not 0.0 < float(percentile) <= 100.0:
        raise ValueError(f"percentile={percentile}: expected a value in (0, 100]")
    r = reduce_channels(relevance, reduce)
    if patch is not None:
        if int(patch) < 1:
            raise ValueError(f"patch={patch}: expected a positive patch size")
        r = patch_sums(r, int(patch))
    mag = np.abs(r)
    scale = float(np.percentile(mag, percentile)) if mag.size else 0.0
    if scale <= 0.0:
        scale = float(mag.max()) if mag.size else 0.0
    if scale <= 0.0:
        return np.full((*r.shape, 3), 255, dtype=np.uint8)
    return colorize(r / scale)


def _as_grey_or_rgb(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``image`` as float RGB in ``[0, 1]``, ``(H, W, 3)`` (see :func:`overlay`)."""
    img = np.asarray(image)
    if img.ndim == 2:
        chw = img[None]
    elif img.ndim == 3 and img.shape[1:] == hw:
        chw = img
    elif img.ndim == 3 and img.shape[:2] == hw:
        chw = np.moveaxis(img, -1, 0)
    else:
        raise ValueError(f"image of shape {img.shape} does not match the heatmap's {hw} "
                         "(expected (C, H, W), (H, W) or (H, W, C))")
    if chw.shape[1:] != hw:
        raise ValueError(f"image of shape {img.shape} does not match the heatmap's {hw}")
    if img.dtype == np.uint8 and chw.shape[0] == 3:
        rgb: np.ndarray = np.moveaxis(chw, 0, -1).astype(np.float64) / 255.0
        return rgb
    if not (np.issubdtype(img.dtype, np.floating) or np.issubdtype(img.dtype, np.integer)):
        raise ValueError(f"image of dtype {img.dtype}: expected a real number type")
    grey = chw.astype(np.float64).mean(axis=0)
    _check_finite(grey, "image")
    lo, hi = float(grey.min()), float(grey.max())
    grey = (grey - lo) / (hi - lo) if hi > lo else np.full_like(grey, 0.5)
    return np.repeat(grey[..., None], 3, axis=-1)


def overlay(rgb: np.ndarray, image: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a heatmap over the input image: ``alpha * heatmap + (1 - alpha) * image``.

    Args:
        rgb: a heatmap from :func:`heatmap`, uint8 ``(H, W, 3)``.
        image: the explained input, ``(C, H, W)``, ``(H, W)`` or ``(H, W, C)`` (when both
            layouts fit, channels first is assumed). A uint8 image with 3 channels is used as
            RGB; anything else is averaged over channels and min-max scaled to grey (a
            constant image becomes mid-grey).
        alpha: heatmap weight in ``[0, 1]`` (``1``: heatmap only, ``0``: image only).

    Returns:
        uint8 RGB ``(H, W, 3)``.

    Raises:
        ValueError: shapes that do not match, ``alpha`` outside ``[0, 1]``, NaN in the image.
    """
    heat = np.asarray(rgb)
    if heat.ndim != 3 or heat.shape[-1] != 3 or heat.dtype != np.uint8:
        raise ValueError(f"rgb of shape {heat.shape} and dtype {heat.dtype}: expected uint8 "
                         "(H, W, 3) from heatmap()")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha={alpha}: expected a value in [0, 1]")
    base = _as_grey_or_rgb(image, (heat.shape[0], heat.shape[1]))
    mixed = float(alpha) * (heat.astype(np.float64) / 255.0) + (1.0 - float(alpha)) * base
    out: np.ndarray = np.rint(np.clip(mixed, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def save_png(rgb: np.ndarray, path: str | os.PathLike[str], *, scale: int = 1) -> None:
    """Write a uint8 RGB ``(H, W, 3)`` image as PNG, each pixel a ``scale`` x ``scale`` block.

    Nearest-neighbour upscaling keeps pixels sharp (an 8x8 digit needs e.g. ``scale=16`` to be
    seen). The file is written atomically: into a temporary file in the same folder, then moved
    over ``path`` with ``os.replace``; on failure no partial file is left behind.

    Raises:
        ValueError: not uint8 ``(H, W, 3)``, or ``scale`` not a positive integer.
    """
    from PIL import Image

    img = np.asarray(rgb)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ValueError(f"rgb of shape {img.shape} and dtype {img.dtype}: expected uint8 "
                         "(H, W, 3)")
    if isinstance(scale, bool) or not isinstance(scale, int | np.integer) or scale < 1:
        raise ValueError(f"scale={scale!r}: expected a positive integer")
    if scale > 1:
        img = np.repeat(np.repeat(img, int(scale), axis=0), int(scale), axis=1)
    write_atomic(Path(path), lambda fh: Image.fromarray(np.ascontiguousarray(img)).save(
        fh, format="PNG"))
