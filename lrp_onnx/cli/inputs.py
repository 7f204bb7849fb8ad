"""Inputs of ``lrp-onnx explain``: ``.npy`` arrays and images, checked, preprocessed, streamed.

The pipeline is ``expand_inputs`` (files and folders to a sorted file list) -> ``plan_inputs``
(reads only headers: every sample's shape is checked against the model before anything
runs) -> ``batches`` (reads and preprocesses ``batch_size`` samples at a time, so memory is
bounded by one batch whatever the number of inputs).

* ``.npy``: one sample (the model's input shape without the batch dimension) or a batch; fed
  as stored, cast to the model's input dtype (never resized nor normalised).
* ``.png``, ``.jpg``, ``.jpeg`` (read with Pillow): converted to ``L`` or ``RGB`` (the model's
  channel count, 1 or 3), resized with bilinear filtering to ``Preprocess.size`` (default: the
  model's static height and width), then ``x = (pixel * scale - mean[c]) / std[c]`` in
  channels-first (NCHW) layout.

Every refusal is an :class:`InputFileError` whose one-line message starts with the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lrp_onnx.errors import InvalidInput

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NPY_SUFFIX = ".npy"
SUFFIXES = (NPY_SUFFIX, *IMAGE_SUFFIXES)
#: Image modes by the model's channel count.
MODES = {1: "L", 3: "RGB"}
#: Keys of a preprocessing spec (``--preprocess FILE.json``), as the command-line options.
PREPROCESS_KEYS = ("size", "resize", "mode", "scale", "mean", "std")


class InputFileError(InvalidInput):
    """An input file or preprocessing spec cannot be read or does not fit the model.

    Attributes:
        path: the file (or option) the one-line message starts with.
    """

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: {message}")


# -- the model's input -------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInput:
    """A model's data input: ``shape`` starts with the batch dimension (``None``: dynamic)."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype[Any]

    @classmethod
    def of(cls, model: onnx.ModelProto, name: str) -> ModelInput:
        """The graph input ``name`` of ``model``."""
        vi = next(i for i in model.graph.input if i.name == name)
        tt = vi.type.tensor_type
        shape = tuple(int(d.dim_value) if d.HasField("dim_value") else None
                      for d in tt.shape.dim)
        return cls(name, shape, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)))

    def describe(self) -> str:
        """``[N, 3, 32, 32]``-style text."""
        return "[" + ", ".join("N" if d is None else str(d) for d in self.shape) + "]"

    @property
    def channels(self) -> int | None:
        """Channel count of an NCHW input (``None`` when not 4-D or dynamic)."""
        return self.shape[1] if len(self.shape) == 4 else None

    @property
    def spatial(self) -> tuple[int | None, int | None]:
        """Static ``(H, W)`` of an NCHW input (``None`` where dynamic)."""
        return (self.shape[2], self.shape[3]) if len(self.shape) == 4 else (None, None)

    def fits(self, sample: Sequence[int]) -> bool:
        """Whether one sample of shape ``sample`` (no batch dimension) fits the input."""
        return len(sample) == len(self.shape) - 1 and all(
            d is None or d == s for d, s in zip(self.shape[1:], sample))


# -- preprocessing options ---------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocess:
    """How images become model inputs (see the module docstring).

    Attributes:
        size: ``(H, W)`` to resize to; ``None``: the model's static height and width (images
            are used at their own size where those are dynamic).
        resize: ``False`` refuses images whose size differs from ``size`` instead.
        mode: ``"L"`` or ``"RGB"``; ``None``: from the model's channel count (1 or 3).
        scale: pixel values (0..255) are multiplied by it first.
        mean, std: one value, or one per channel.
    """

    size: tuple[int, int] | None = None
    resize: bool = True
    mode: str | None = None
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def updated(self, **changes: Any) -> Preprocess:
        """A copy with the changes that are not ``None`` applied."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def resolve(self, spec: ModelInput) -> Preprocess:
        """Check these options against the model and fill in ``mode`` and ``size``.

        Raises:
            InvalidInput: the model does not take images, or the options do not fit it.
        """
        channels = spec.channels
        if channels is None or channels not in MODES:
            raise InvalidInput(f"images need a model input of shape [N, 1 or 3, H, W]; input "
                               f"'{spec.name}' is {spec.describe()} (give .npy arrays instead)")
        mode = self.mode or MODES[channels]
        if MODES[channels] != mode:
            raise InvalidInput(f"mode {mode} gives {3 if mode == 'RGB' else 1} "
                               f"channel(s); input '{spec.name}' {spec.describe()} takes "
                               f"{channels}")
        for key, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise InvalidInput(f"{key} has {len(values)} values; give 1 or "
                                   f"{channels} (one per channel)")
        if any(s == 0 for s in self.std):
            raise InvalidInput("std must not be 0")
        h, w = spec.spatial
        size = self.size
        if size is not None and not self.resize:
            raise InvalidInput("a size and no resize contradict each other")
        if size is not None and ((h is not None and h != size[0])
                                 or (w is not None and w != size[1])):
            raise InvalidInput(f"size {size[0]} {size[1]} does not fit input "
                               f"'{spec.name}' {spec.describe()}")
        if size is None and h is not None and w is not None:
            size = (h, w)
        return dataclasses.replace(self, mode=mode, size=size)


def _number(value: Any, key: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputFileError(path, f"'{key}' must be a finite number, not {value!r}")
    return float(value)


def load_preprocess(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a preprocessing spec: a JSON object with any of :data:`PREPROCESS_KEYS`.

    Returns the given keys as :class:`Preprocess` field values (for :meth:`Preprocess.updated`).

    Raises:
        InputFileError: unreadable file, not JSON, unknown key or a value of the wrong type.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputFileError(p, "no such file") from None
    except OSError as exc:
        raise InputFileError(p, f"cannot read ({exc.strerror})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputFileError(p, f"not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputFileError(p, "expected a JSON object {\"size\": [H, W], \"mean\": [...], ...}")
    unknown = sorted(set(data) - set(PREPROCESS_KEYS))
    if unknown:
        raise InputFileError(p, f"unknown key(s) {', '.join(map(repr, unknown))}; known: "
                             f"{', '.join(PREPROCESS_KEYS)}")
    out: dict[str, Any] = {}
    if "size" in data:
        size = data["size"]
        if (not isinstance(size, list) or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                           for v in size)):
            raise InputFileError(p, f"'size' must be [H, W] (positive integers), not {size!r}")
        out["size"] = (size[0], size[1])
    if "resize" in data:
        if not isinstance(data["resize"], bool):
            raise InputFileError(p, f"'resize' must be true or false, not {data['resize']!r}")
        out["resize"] = data["resize"]
    if "mode" in data:
        if data["mode"] not in MODES.values():
            raise InputFileError(p, f"'mode' must be \"L\" or \"RGB\", not {data['mode']!r}")
        out["mode"] = data["mode"]
    if "scale" in data:
        out["scale"] = _number(data["scale"], "scale", p)
    for key in ("mean", "std"):
        if key in data:
            values = data[key] if isinstance(data[key], list) else [data[key]]
            if not values:
                raise InputFileError(p, f"'{key}' must not be empty")
            out[key] = tuple(_number(v, key, p) for v in values)
    return out


# -- files and samples -------------------------------------------------------------------------
def expand_inputs(paths: Sequence[str | os.PathLike[str]], *, recursive: bool = False
                  ) -> list[Path]:
    """Files to read: each file as given, each folder's ``.npy``/image files sorted by name
    (with ``recursive``, those of its sub-folders too; other files in a folder are skipped).

    Raises:
        InputFileError: a missing path, a file of another type, a folder without inputs.
    """
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in (p.rglob("*") if recursive else p.iterdir())
                           if f.is_file() and f.suffix.lower() in SUFFIXES)
            if not found:
                raise InputFileError(p, f"folder holds no {', '.join(SUFFIXES)} files"
                                     + ("" if recursive else " (sub-folders need --recursive)"))
            files.extend(found)
        elif p.is_file():
            if p.suffix.lower() not in SUFFIXES:
                raise InputFileError(p, f"not a {', '.join(SUFFIXES)} file")
            files.append(p)
        else:
            raise InputFileError(p, "no such file or folder")
    return files


@dataclass(frozen=True)
class Sample:
    """One sample to explain: ``index`` is its position in a batched ``.npy`` (``None``: the
    file is one sample)."""

    path: Path
    index: int | None = None

    @property
    def stem(self) -> str:
        """Output file stem: ``<stem>`` or ``<stem>_<index>``."""
        return self.path.stem if self.index is None else f"{self.path.stem}_{self.index}"

    @property
    def label(self) -> str:
        """How the sample is named in the output: ``file.npy`` or ``file.npy[3]``."""
        return self.path.name if self.index is None else f"{self.path.name}[{self.index}]"

    @property
    def is_image(self) -> bool:
        return self.path.suffix.lower() in IMAGE_SUFFIXES


@dataclass(frozen=True)
class Plan:
    """The checked samples, and the resolved preprocessing (``None`` when there is no image)."""

    samples: list[Sample]
    preprocess: Preprocess | None


def open_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """A read-only memory map of the ``.npy`` file ``path`` (only the header is read now): an
    array of real numbers, or a one-line :class:`InputFileError`."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except OSError as exc:
        raise InputFileError(path, f"cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise InputFileError(path, f"not a readable .npy array ({str(exc).splitlines()[0]})"
                             ) from None
    if not isinstance(arr, np.ndarray):
        raise InputFileError(path, "not a .npy array")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputFileError(path, f"array of dtype {arr.dtype}; expected real numbers")
    return arr


def _npy_samples(path: Path, spec: ModelInput) -> list[Sample]:
    arr = open_npy(path)
    if spec.fits(arr.shape):
        return [Sample(path)]
    if arr.ndim == len(spec.shape) and spec.fits(arr.shape[1:]):
        if arr.shape[0] == 0:
            raise InputFileError(path, "array holds no samples")
        return [Sample(path, i) for i in range(arr.shape[0])]
    raise InputFileError(path, f"array of shape {list(arr.shape)} does not fit input "
                         f"'{spec.name}' {spec.describe()} (one sample or a batch)")


def _open_image(path: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise InputFileError(path, "not a readable image") from None
    except Image.DecompressionBombError as exc:
        raise InputFileError(path, f"image too large ({exc})") from None
    except OSError as exc:
        raise InputFileError(path, f"cannot read ({exc.strerror or exc})") from None


def _check_image(path: Path, pre: Preprocess) -> None:
    with _open_image(path) as im:
        w, h = im.size
    if pre.size is not None and (h, w) != pre.size and not pre.resize:
        raise InputFileError(path, f"image is {h}x{w} (HxW); the model takes {pre.size[0]}x"
                             f"{pre.size[1]} and resizing is off (drop --no-resize)")


def plan_inputs(files: Sequence[Path], spec: ModelInput, pre: Preprocess | None = None, *,
                source: str = "") -> Plan:
    """Check every file against the model from its header (nothing is decoded yet).

    Args:
        files: from :func:`expand_inputs`.
        spec: the model's data input.
        pre: image preprocessing (resolved here, where there is an image).
        source: where ``pre`` came from (a spec file), named in errors about it; by default
            they name the first image.

    Raises:
        InputFileError / InvalidInput: a file that does not fit, options that do not fit.
    """
    samples: list[Sample] = []
    resolved: Preprocess | None = None
    for path in files:
        if path.suffix.lower() == NPY_SUFFIX:
            samples.extend(_npy_samples(path, spec))
            continue
        if resolved is None:
            try:
                resolved = (pre or Preprocess()).resolve(spec)
            except InvalidInput as exc:
                raise InputFileError(source or path, str(exc)) from None
        _check_image(path, resolved)
        samples.append(Sample(path))
    return Plan(samples, resolved)


def duplicate_stems(samples: Sequence[Sample]) -> tuple[Sample, Sample] | None:
    """Two samples that would write the same output files (same stem), if any."""
    seen: dict[str, Sample] = {}
    for s in samples:
        key = os.path.normcase(s.stem)
        if key in seen:
            return seen[key], s
        seen[key] = s
    return None


# -- reading -----------------------------------------------------------------------------------
def read_image(path: Path, pre: Preprocess, dtype: Any = np.float32
               ) -> tuple[np.ndarray, np.ndarray]:
    """Read and preprocess one image (``pre`` resolved).

    Returns:
        ``(x, image)``: ``x`` channels first ``(C, H, W)`` in ``dtype``; ``image`` the uint8
        picture that was normalised (``(H, W)`` for ``L``, ``(H, W, 3)`` for ``RGB``).
    """
    from PIL import Image

    with _open_image(path) as im:
        try:
            im.load()
            converted = im.convert(pre.mode)
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputFileError(path, f"cannot decode image ({exc})") from None
    if pre.size is not None and converted.size != (pre.size[1], pre.size[0]):
        if not pre.resize:
            raise InputFileError(path, f"image is {converted.size[1]}x{converted.size[0]} "
                                 f"(HxW); the model takes {pre.size[0]}x{pre.size[1]}")
        converted = converted.resize((pre.size[1], pre.size[0]), Image.Resampling.BILINEAR)
    image = np.asarray(converted, dtype=np.uint8)
    chw = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
    mean = np.asarray(pre.mean, dtype=np.float64).reshape(-1, 1, 1)
    std = np.asarray(pre.std, dtype=np.float64).reshape(-1, 1, 1)
    x = (chw.astype(np.float64) * pre.scale - mean) / std
    return x.astype(dtype), image


@dataclass
class Batch:
    """Samples read together: ``x`` is ``(n, *sample)`` in the model's dtype; ``images[i]`` is
    sample i's uint8 picture (images only, with ``keep_images``), else ``None``."""

    samples: list[Sample]
    x: np.ndarray
    images: list[np.ndarray | None]


def batches(plan: Plan, spec: ModelInput, batch_size: int, *, keep_images: bool = False
            ) -> Iterator[Batch]:
    """Read ``plan``'s samples ``batch_size`` at a time (a batch also ends where the sample
    shape changes, e.g. images of different sizes for a model with dynamic height/width).

    Only one ``.npy`` file is open (memory-mapped) at a time; memory is bounded by a batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    open_path: Path | None = None
    open_arr: np.ndarray | None = None
    xs: list[np.ndarray] = []
    images: list[np.ndarray | None] = []
    members: list[Sample] = []

    def flush() -> Batch:
        batch = Batch(list(members), np.stack(xs), list(images))
        xs.clear()
        images.clear()
        members.clear()
        return batch

    for s in plan.samples:
        if s.is_image:
            assert plan.preprocess is not None
            x, image = read_image(s.path, plan.preprocess, spec.dtype)
            kept: np.ndarray | None = image if keep_images else None
        else:
            if s.path != open_path:
                open_path, open_arr = s.path, open_npy(s.path)
            assert open_arr is not None
            try:
                x = np.array(open_arr if s.index is None else open_arr[s.index],
                             dtype=spec.dtype)
            except (OSError, ValueError) as exc:
                raise InputFileError(s.path, f"cannot read ({exc})") from None
            kept = None
        if xs and xs[0].shape != x.shape:
            yield flush()
        xs.append(x)
        images.append(kept)
        members.append(s)
        if len(xs) == batch_size:
            yield flush()
    if xs:
        yield flush()


__all__ = ["IMAGE_SUFFIXES", "PREPROCESS_KEYS", "SUFFIXES", "Batch", "InputFileError",
           "ModelInput", "Plan", "Preprocess", "Sample", "batches", "duplicate_stems",
           "expand_inputs", "load_preprocess", "plan_inputs", "read_image"]
