"""Explaining a Ray Dataset with a compiled model: :func:`explain_dataset`.

``ds.map_batches`` runs a callable class, so each Ray actor opens one ONNX Runtime session (on
the CPU or a GPU) and explains the batches that stream through it; the rows never pass
through the driver. Ray (``pip install "lrp-onnx[ray]"``) is imported only when this module is
imported, never by ``import lrp_onnx``.

A row that cannot be explained (a sample of the wrong shape or dtype, NaN/Inf in the sample or
in its relevance, a target outside the classes) either fails the job with one message naming
the row (``on_error="fail"``: the Ray exception's text holds ``RowError: row ...``, see
:func:`row_error`) or gets that message in an ``error`` column, zeros as relevance and output
and target -1, while every other row is explained as usual (``on_error="column"``).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np
import ray  # type: ignore[import-untyped,unused-ignore]

from lrp_onnx.cli.compiled import CompiledIO
from lrp_onnx.cli.inputs import ModelInput
from lrp_onnx.emit.contract import RELEVANCE
from lrp_onnx.errors import InvalidInput, LRPError
from lrp_onnx.frontend.load import load_model
from lrp_onnx.io import EXTERNAL_DATA_ABOVE, weight_bytes

#: The column that says why a row failed (``on_error="column"``; ``""`` where it succeeded:
#: always a string column, so that every block and Parquet file has the same schema).
ERROR = "error"
#: The column of the explained class (argmax where the target was -1).
TARGET = "target"
ON_ERROR = ("fail", "column")


class RowError(InvalidInput):
    """A row that cannot be explained (``on_error="fail"``); the message names the row."""


def row_error(exc: BaseException) -> str | None:
    """The one-line ``row ...: why`` message inside the exception a Ray job raised where a row
    failed under ``on_error="fail"`` (Ray wraps it with its own traceback); ``None`` if the job
    failed for another reason."""
    found = re.findall(r"RowError: (.+)", str(exc))
    return found[-1].strip() if found else None


def explain_dataset(ds: Any, model_path: str | os.PathLike[str], *, column: str = "input",
                    target_column: str | None = None, batch_size: int = 64,
                    concurrency: int | tuple[int, int] | None = None, device: str = "cpu",
                    num_cpus: float = 1, num_gpus: float | None = None,
                    on_error: str = "fail") -> Any:
    """Explain every row of the Ray Dataset ``ds`` with a compiled model (lazily, streamed).

    Args:
        ds: a ``ray.data.Dataset`` whose ``column`` holds one sample per row (the model's input
            shape without the batch dimension; a flat list of the right length is reshaped).
        model_path: a compiled model (written by ``lrp-onnx convert`` or ``LRP.save``). Models
            under 2 GiB travel to the actors through Ray's object store; a larger one (external
            data) is opened from this path on every node.
        column: the input column.
        target_column: an int column with each row's class to explain (-1: the top-scoring);
            ``None``: the top-scoring class of every row.
        batch_size: rows per ONNX Runtime call.
        concurrency: actors (a number, or ``(min, max)`` to autoscale); ``None``: 1.
        device: ``"cpu"`` or ``"cuda"`` (an actor whose session does not start on CUDA fails).
        num_cpus: CPUs per actor (also ONNX Runtime's intra-op threads on the CPU).
        num_gpus: GPUs per actor; ``None``: 1 with ``device="cuda"``, else 0.
        on_error: ``"fail"`` or ``"column"`` (see the module docstring).

    Returns:
        The dataset with ``relevance`` (shaped like the input), ``target`` and the explained
        output (e.g. ``logits``) added, plus ``error`` with ``on_error="column"``; every other
        column is kept as it is (the target column too, unless it is named ``target``).

    Raises:
        InvalidInput / UnsupportedModel: the model or the options are refused (before any row
            is read).
    """
    if on_error not in ON_ERROR:
        raise InvalidInput(f"on_error must be 'fail' or 'column', not {on_error!r}")
    if device not in ("cpu", "cuda"):
        raise InvalidInput(f"device must be 'cpu' or 'cuda', not {device!r}")
    if batch_size < 1:
        raise InvalidInput(f"batch_size must be >= 1, not {batch_size}")
    model, label = load_model(model_path)
    io = CompiledIO.of(model, label, "lrp-onnx")
    if io.others or io.seed is not None:
        raise InvalidInput(f"{label}: explain_dataset feeds one input and a target; this model "
                           "also takes " + ", ".join(io.others or ("output_relevance",)))
    if column in (RELEVANCE, io.output, TARGET, ERROR):
        raise InvalidInput(f"column '{column}' would be overwritten by an output column")
    source: bytes | str = (model.SerializeToString() if weight_bytes(model) <= EXTERNAL_DATA_ABOVE
                           else os.fspath(model_path))
    gpus = (1 if device == "cuda" else 0) if num_gpus is None else num_gpus
    size = concurrency if concurrency is not None else 1
    pool = (ray.data.ActorPoolStrategy(min_size=size[0], max_size=size[1])
            if isinstance(size, tuple) else ray.data.ActorPoolStrategy(size=size))
    return ds.map_batches(
        _Explainer, batch_size=batch_size, batch_format="numpy", compute=pool,
        num_cpus=num_cpus, num_gpus=gpus,
        fn_constructor_kwargs=dict(source=source, spec=ModelInput.of(model, io.input), io=io,
                                   column=column, target_column=target_column, device=device,
                                   threads=max(1, int(num_cpus)), on_error=on_error))


class _Explainer:
    """One Ray actor: one ONNX Runtime session, one batch of rows per call."""

    def __init__(self, source: bytes | str, spec: ModelInput, io: CompiledIO, column: str,
                 target_column: str | None, device: str, threads: int, on_error: str) -> None:
        import onnx

        from lrp_onnx.runtime import CUDA, make_session

        model = onnx.load_from_string(source) if isinstance(source, bytes) else source
        self.session = make_session(model, device=device, threads=threads)
        if device == "cuda" and self.session.get_providers()[0] != CUDA:
            raise RuntimeError("device='cuda': the CUDA execution provider did not start on "
                               "this actor (no GPU, or onnxruntime-gpu without CUDA 13/cuDNN 9)")
        self.spec, self.io, self.column = spec, io, column
        self.target_column, self.on_error = target_column, on_error

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name in (self.column, self.target_column or self.column):
            if name not in batch:
                raise InvalidInput(f"the dataset has no column '{name}' (its columns: "
                                   f"{', '.join(batch)})")
        taken = {RELEVANCE, self.io.output, TARGET} - {self.target_column}
        if self.on_error == "column":
            taken.add(ERROR)
        clash = sorted(taken & set(batch))
        if clash:
            raise InvalidInput(f"the dataset already has column(s) {', '.join(clash)}, which "
                               "the explanation writes: rename them first")
        n = len(batch[self.column])
        targets = (np.full(n, -1, dtype=np.int64) if self.target_column is None
                   else batch[self.target_column])
        rows: dict[int, np.ndarray] = {}
        errors: dict[int, str] = {}
        for i in range(n):
            try:
                rows[i] = self._sample(batch[self.column][i], targets[i])
            except InvalidInput as exc:
                errors[i] = str(exc)
        results = self._run_groups(rows, targets, errors)
        if errors and self.on_error == "fail":
            i = min(errors)
            raise RowError(f"row {_describe(batch, i, self.column)}: {errors[i]}")
        return self._columns(batch, n, results, errors)

    def _sample(self, value: Any, target: Any) -> np.ndarray:
        """One row's sample as the model's dtype and shape, or an :class:`InvalidInput`."""
        try:
            x = np.asarray(value, dtype=self.spec.dtype)
        except (TypeError, ValueError):
            raise InvalidInput(f"the sample is not an array of numbers ({type(value).__name__})"
                               ) from None
        static = tuple(d for d in self.spec.shape[1:] if d is not None)
        if x.ndim == 1 and len(static) == len(self.spec.shape) - 1 > 1 \
                and x.size == math.prod(static):
            x = x.reshape(static)
        if not self.spec.fits(x.shape):
            raise InvalidInput(f"the sample has shape {list(x.shape)}; the model takes "
                               f"{self.spec.describe()}")
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise InvalidInput("the sample holds NaN/Inf")
        t = int(target) if target is not None else -1
        if not -1 <= t < self.io.classes:
            raise InvalidInput(f"target {t} is outside [-1, {self.io.classes - 1}]")
        return x

    def _run_groups(self, rows: dict[int, np.ndarray], targets: np.ndarray,
                    errors: dict[int, str]) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
        """Run the good rows, a call per sample shape; a failed call is retried row by row so
        that only the failing rows get an error."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in rows.items():
            groups.setdefault(x.shape, []).append(i)
        results: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
        for members in groups.values():
            try:
                results.update(self._run(members, rows, targets))
            except LRPError:
                for i in members:
                    try:
                        results.update(self._run([i], rows, targets))
                    except LRPError as exc:
                        errors[i] = str(exc)
        for i, (rel, _, _) in list(results.items()):
            if not np.isfinite(rel).all():
                errors[i] = ("the relevance is not finite (NaN/Inf); run 'lrp-onnx check' on "
                             "the model")
                del results[i]
        return results

    def _run(self, members: list[int], rows: dict[int, np.ndarray], targets: np.ndarray
             ) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
        from lrp_onnx.runtime import run_compiled

        x = np.stack([rows[i] for i in members])
        t = np.asarray([-1 if targets[i] is None else int(targets[i]) for i in members],
                       dtype=np.int64)
        expl = run_compiled(self.session, x, t, self.io.input, self.io.output, self.io.classes)
        return {i: (expl.relevance[k], np.asarray(expl.output)[k], int(expl.target[k]))
                for k, i in enumerate(members)}

    def _columns(self, batch: dict[str, np.ndarray], n: int,
                 results: dict[int, tuple[np.ndarray, np.ndarray, int]],
                 errors: dict[int, str]) -> dict[str, np.ndarray]:
        """The batch with the output columns added (zeros and target -1 for failed rows)."""
        like = next(iter(results.values()), None)
        rel_shape = like[0].shape if like is not None else _static(self.spec.shape[1:])
        out_shape = like[1].shape if like is not None else (max(self.io.classes, 1),)
        rel_dtype = like[0].dtype if like is not None else np.dtype(np.float32)
        out_dtype = like[1].dtype if like is not None else np.dtype(np.float32)
        rels, outs = [], []
        for i in range(n):
            rel, out, _ = results.get(i, (None, None, -1))
            rels.append(rel if rel is not None else np.zeros(rel_shape, rel_dtype))
            outs.append(out if out is not None else np.zeros(out_shape, out_dtype))
        columns = dict(batch)
        columns[RELEVANCE] = stack_rows(rels)
        columns[self.io.output] = stack_rows(outs)
        columns[TARGET] = np.asarray([results[i][2] if i in results else -1 for i in range(n)],
                                     dtype=np.int64)
        if self.on_error == "column":
            columns[ERROR] = np.asarray([errors.get(i, "") for i in range(n)], dtype=str)
        return columns


def _static(shape: tuple[int | None, ...]) -> tuple[int, ...]:
    return tuple(1 if d is None else d for d in shape)


def stack_rows(arrays: list[np.ndarray]) -> np.ndarray:
    """One array where the rows share a shape, else an object array of rows (Ray stores it as
    a variable-shaped tensor column)."""
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def _describe(batch: dict[str, np.ndarray], i: int, column: str) -> str:
    """A row named by its scalar columns (``{'path': 'a.npy', 'index': 3}``), else by its
    position in the batch."""
    keys = {k: v[i].item() if isinstance(v[i], np.generic) else v[i]
            for k, v in batch.items() if k != column and v.ndim == 1
            and isinstance(v[i], str | int | np.integer | np.str_)}
    return repr(keys) if keys else f"{i} of a batch of {len(batch[column])}"
