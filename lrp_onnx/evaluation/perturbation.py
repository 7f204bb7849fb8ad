"""Perturbation curves: features, their order, the replacement values, and the perturbed inputs.

The definitions (``docs/evaluation.md`` states them as formulas):

* features: the non-overlapping ``patch x patch`` squares of the ``H x W`` grid, numbered row
  by row; a feature's score is the sum of its attributions over channels and pixels (of
  ``|a|`` for ``Gradient``);
* order: MoRF sorts the scores in descending order, ties broken by a seeded uniform jitter
  (ascending); LeRF is the MoRF order reversed;
* step ``k`` has replaced the first ``n_k`` features of the order: ``n_k = k`` (``k = 0..K``)
  for pixel flipping, region perturbation and SRG, ``n_k = round(k F / (K + 1))`` (``10%,
  20%, ... 90%`` for the default ``K = 9``) for ROAD;
* random numbers, all from ``np.random.default_rng(seed)`` in this order and shared by every
  method: the jitter ``rng.random((N, F))``, then the noise of the replacement:
  ``rng.uniform(lo, hi, x.shape)`` (``noise``) or ``rng.normal(0, 0.01 (hi - lo), x.shape)``
  (ROAD), with ``lo, hi`` the minimum and maximum of the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lrp_onnx.errors import InvalidInput

METRICS = ("pixel-flipping", "region-perturbation", "road", "srg")
REPLACEMENTS = ("noise", "mean", "zero", "blur")
#: Default number of steps: ROAD's 10%..90%, else this many features (at most all of them).
DEFAULT_STEPS = {"road": 9}
MAX_DEFAULT_STEPS = 64
#: Region perturbation's default square side (pixels).
DEFAULT_REGION = 2
#: Standard deviation of ROAD's imputation noise, as a fraction of the data's range.
ROAD_NOISE = 0.01
#: Pixels per block of ROAD's imputation solve (a block of float64 arrays fits the L2 cache).
IMPUTE_BLOCK = 1 << 15
#: Gaussian blur's standard deviation (pixels) for ``replacement="blur"``.
BLUR_SIGMA = 1.0


@dataclass(frozen=True)
class Protocol:
    """What is perturbed and how: the resolved settings of one evaluation."""

    metric: str
    replacement: str
    steps: int
    patch: int
    seed: int
    features: int

    def counts(self) -> np.ndarray:
        """``n_k``, the number of features replaced at step ``k = 0..K``."""
        k = np.arange(self.steps + 1)
        if self.metric == "road":
            return np.rint(k * self.features / (self.steps + 1)).astype(np.int64)
        return k.astype(np.int64)


def resolve(metric: str, replacement: str | None, steps: int | None, patch: int | None,
            seed: int, shape: tuple[int, ...]) -> Protocol:
    """Check the settings against the data's shape ``[N, C, H, W]`` and fill in defaults."""
    if metric not in METRICS:
        raise InvalidInput(f"unknown metric {metric!r}; metrics: {', '.join(METRICS)}")
    if metric == "road":
        if replacement not in (None, "road"):
            raise InvalidInput("ROAD replaces features by noisy linear imputation; "
                               "--replacement does not apply")
        replacement = "road"
    elif replacement is None:
        replacement = "noise"
    elif replacement not in REPLACEMENTS:
        raise InvalidInput(f"unknown replacement {replacement!r}; replacements: "
                           f"{', '.join(REPLACEMENTS)}")
    if len(shape) != 4:
        raise InvalidInput(f"the data must be images [N, C, H, W]; got shape {list(shape)}")
    if patch is None:
        patch = DEFAULT_REGION if metric == "region-perturbation" else 1
    if patch < 1 or (metric == "pixel-flipping" and patch != 1):
        raise InvalidInput("pixel flipping perturbs single pixels; use region-perturbation "
                           "for patches" if patch >= 1 else "patch must be positive")
    h, w = shape[2], shape[3]
    features = -(-h // patch) * -(-w // patch)
    if steps is None:
        steps = DEFAULT_STEPS.get(metric, min(features, MAX_DEFAULT_STEPS))
    limit = features if metric != "road" else features - 1
    if not 1 <= steps <= limit:
        raise InvalidInput(f"steps must be in [1, {limit}] for {features} features of "
                           f"{patch}x{patch} pixels")
    return Protocol(metric, replacement, steps, patch, seed, features)


def feature_map(h: int, w: int, patch: int) -> np.ndarray:
    """The feature index of each pixel, ``[H, W]``."""
    cols = -(-w // patch)
    return (np.arange(h)[:, None] // patch) * cols + np.arange(w)[None, :] // patch


def feature_scores(a: np.ndarray, fmap: np.ndarray, features: int, absolute: bool
                   ) -> np.ndarray:
    """``[N, F]``: each feature's summed attribution (float64)."""
    a64 = np.abs(a.astype(np.float64)) if absolute else a.astype(np.float64)
    pixels = a64.sum(axis=1).reshape(len(a), -1)
    scores = np.zeros((len(a), features))
    np.add.at(scores.T, fmap.reshape(-1), pixels.T)
    return scores


def morf_ranks(scores: np.ndarray, jitter: np.ndarray) -> np.ndarray:
    """``[N, F]``: each feature's position in the MoRF order (0: replaced first)."""
    order = np.lexsort((jitter, -scores), axis=-1)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(order.shape[1])[None, :], axis=-1)
    return ranks


def replacement_values(x: np.ndarray, kind: str, rng: np.random.Generator,
                       lo: float, hi: float) -> np.ndarray | None:
    """The value each pixel takes once replaced, ``[N, C, H, W]`` (``None`` for ROAD, whose
    imputation depends on which pixels are replaced; its noise is drawn separately)."""
    if kind == "noise":
        return rng.uniform(lo, hi, size=x.shape).astype(x.dtype)
    if kind == "mean":
        return np.broadcast_to(x.mean(axis=0, dtype=np.float64).astype(x.dtype), x.shape)
    if kind == "zero":
        return np.zeros_like(x)
    if kind == "blur":
        return blur(x, BLUR_SIGMA)
    return None


def blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """A separable Gaussian blur of each channel (radius ``ceil(3 sigma)``, edge padding)."""
    r = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = x.astype(np.float64)
    for axis in (2, 3):
        pad = [(0, 0)] * 4
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        out = sum(t * np.take(padded, np.arange(i, i + n), axis=axis)
                  for i, t in enumerate(taps))
    return out.astype(x.dtype)


def _neighbours(v: np.ndarray) -> np.ndarray:
    """``sum_n w_n v_n`` over each pixel's in-image neighbours (1/6 direct, 1/12 diagonal).

    The stencil is ``[1 2 1]ᵀ [1 2 1] / 12`` less its centre (``4/12``): two 3-tap passes over
    the zero-padded image instead of eight shifted adds."""
    padded = np.pad(v, ((0, 0), (0, 0), (1, 1), (1, 1)))
    rows = padded[:, :, :-2] + 2 * padded[:, :, 1:-1] + padded[:, :, 2:]
    both: np.ndarray = rows[..., :-2] + 2 * rows[..., 1:-1] + rows[..., 2:]
    return both / 12 - v / 3


def impute(x: np.ndarray, removed: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """ROAD's noisy linear imputation: each removed pixel becomes the weighted mean of its
    neighbours (weight 1/6 for the 4 direct, 1/12 for the 4 diagonal ones; removed neighbours
    count with their imputed values), plus ``noise``. ``removed``: ``[B, 1, H, W]`` bool.

    The linear system (symmetric positive definite: diagonally dominant) is solved by conjugate
    gradients, batched over samples and channels, to a residual of 1e-6 of the data's scale; in
    blocks of samples small enough to stay in the CPU cache."""
    mask = np.broadcast_to(removed, x.shape)
    scale = max(float(np.abs(x).max()), 1.0) if x.size else 1.0
    per = max(1, IMPUTE_BLOCK // max(x[0].size, 1))
    solved = [_solve(x[i:i + per], mask[i:i + per], scale) for i in range(0, len(x), per)]
    u = np.concatenate(solved) if solved else np.zeros(x.shape)
    return np.where(mask, u + noise, x).astype(x.dtype)


def _solve(x: np.ndarray, mask: np.ndarray, scale: float) -> np.ndarray:
    """The imputed values (0 where not ``mask``) of one block, by conjugate gradients."""
    kept = np.where(mask, 0.0, x.astype(np.float64))
    norm = _neighbours(np.ones((1, 1, *x.shape[2:])))

    def apply(u: np.ndarray) -> np.ndarray:
        return np.where(mask, norm * u - _neighbours(u), 0.0)

    r = np.where(mask, _neighbours(kept), 0.0)
    u = np.zeros_like(r)
    d = r.copy()
    rr = (r * r).sum(axis=(2, 3), keepdims=True)
    tol = (1e-6 * scale) ** 2
    for _ in range(int(mask[0, 0].size)):
        if rr.max() <= tol:
            break
        ad = apply(d)
        alpha = rr / np.maximum((d * ad).sum(axis=(2, 3), keepdims=True), 1e-300)
        u += alpha * d
        r -= alpha * ad
        rr_new = (r * r).sum(axis=(2, 3), keepdims=True)
        d = r + rr_new / np.maximum(rr, 1e-300) * d
        rr = rr_new
    return u


def perturbed(x: np.ndarray, values: np.ndarray | None, noise: np.ndarray | None,
              pixel_ranks: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``[len(counts) * N, C, H, W]``: ``x`` with the features of rank ``< n`` replaced, for
    each ``n`` in ``counts`` (step-major)."""
    removed = pixel_ranks[None, :, None] < counts[:, None, None, None, None]
    k = len(counts)
    if values is not None:
        out = np.where(removed, values[None], x[None])
        return out.reshape(k * len(x), *x.shape[1:])
    assert noise is not None
    tiled = np.broadcast_to(x[None], (k, *x.shape)).reshape(k * len(x), *x.shape[1:])
    noise_t = np.broadcast_to(noise[None], (k, *x.shape)).reshape(tiled.shape)
    return impute(tiled, removed.reshape(k * len(x), 1, *x.shape[2:]), noise_t)
