"""What ``explain`` reads from a compiled model: its explained input and output, its seed mode,
and the ``--output-relevance`` seed file that a model compiled with ``output_relevance=True``
takes instead of ``--target``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from lrp_onnx.cli.inputs import InputFileError, ModelInput, open_npy
from lrp_onnx.emit.contract import (
    OUTPUT_RELEVANCE,
    RELEVANCE,
    SEED_OUTPUT_RELEVANCE,
    TARGET,
    TARGET_POSITION,
    class_axis,
    read_record,
    seed_mode,
)
from lrp_onnx.errors import InvalidInput


class CompiledModelError(InvalidInput):
    """A compiled model ``explain`` cannot use, or a seed option that does not fit it (the CLI
    reports it as one line, exit 1)."""


@dataclass(frozen=True)
class CompiledIO:
    """The compiled model's explained input and output, class count and seed input; for a
    model compiled on token ids, its other inputs (an attention mask) and whether it takes a
    ``target_position``."""

    input: str
    output: str
    classes: int
    seed: ModelInput | None  # the ``output_relevance`` input; None: the ``target`` input
    tokens: int = 0  # the vocabulary size of a model compiled on token ids, else 0
    others: tuple[str, ...] = ()
    positions: bool = False

    @classmethod
    def of(cls, model: onnx.ModelProto, label: str, prog: str) -> CompiledIO:
        inputs = [i.name for i in model.graph.input]
        outputs = [o.name for o in model.graph.output]
        record = read_record(model)
        explicit = seed_mode(record) == SEED_OUTPUT_RELEVANCE
        seed_name = OUTPUT_RELEVANCE if explicit else TARGET
        if seed_name not in inputs or RELEVANCE not in outputs:
            raise CompiledModelError(
                f"{label}: not a compiled model (no '{TARGET}' or '{OUTPUT_RELEVANCE}' input / "
                f"'{RELEVANCE}' output); run '{prog} convert' first")
        inits = {t.name for t in model.graph.initializer}
        data = [n for n in inputs if n not in (seed_name, TARGET_POSITION) and n not in inits]
        chosen = record.get("explained_input", data[0] if data else "")
        others = [n for n in data if n != chosen]
        tokens = int(record.get("tokens") or 0)
        if others and not tokens:
            raise CompiledModelError(
                f"{label}: the model also takes {', '.join(repr(n) for n in others)} besides "
                f"the explained input '{chosen}'; '{prog} explain' feeds one input: use the "
                "Python API (analyze(x, inputs={name: array}))")
        out_name = record.get("explained_output", outputs[0])
        dims = {o.name: o for o in model.graph.output}[out_name].type.tensor_type.shape.dim
        sizes = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        classes = int(sizes[class_axis(sizes)] or 0) if sizes else 0
        seed = ModelInput.of(model, OUTPUT_RELEVANCE) if explicit else None
        return cls(chosen, out_name, classes, seed, tokens, tuple(others),
                   TARGET_POSITION in inputs)


def check_seed_options(io: CompiledIO, label: str, target: int | None,
                       seed_file: str | None) -> None:
    """Refuse ``--target`` for a model seeded by ``output_relevance`` and ``--output-relevance``
    for one seeded by ``target`` (and a target outside the classes)."""
    if io.seed is not None:
        if target is not None:
            raise CompiledModelError(f"--target: {label} was compiled with --output-relevance; "
                                     "give the seed with --output-relevance FILE.npy")
        if seed_file is None:
            raise CompiledModelError(f"{label} was compiled with --output-relevance: give the "
                                     f"seed with --output-relevance FILE.npy (shape "
                                     f"{io.seed.describe()})")
        return
    if seed_file is not None:
        raise CompiledModelError(f"--output-relevance: {label} was compiled without it (it "
                                 "takes --target); convert with --output-relevance first")
    if target is not None and io.classes and not 0 <= target < io.classes:
        raise CompiledModelError(f"--target {target}: {label} has {io.classes} classes "
                                 f"(0 to {io.classes - 1})")


class Seed:
    """The ``--output-relevance`` array: one sample's seed (used for every sample, also as a
    batch of one) or one seed per sample, in the order the samples are explained."""

    def __init__(self, path: str | os.PathLike[str], spec: ModelInput, samples: int) -> None:
        self.path = path
        arr = open_npy(path)
        if spec.fits(arr.shape):
            arr = arr[None]
        elif not (arr.ndim == len(spec.shape) and spec.fits(arr.shape[1:])
                  and arr.shape[0] in (1, samples)):
            raise InputFileError(path, f"--output-relevance array of shape {list(arr.shape)} "
                                 f"does not fit '{spec.name}' {spec.describe()}: give one "
                                 f"sample's seed, a batch of 1, or one per sample ({samples})")
        self.values: np.ndarray[Any, Any] = np.ascontiguousarray(arr, dtype=spec.dtype)
        if not np.isfinite(self.values).all():
            raise InputFileError(path, "--output-relevance holds NaN/Inf")

    def batch(self, start: int, n: int) -> np.ndarray[Any, Any]:
        """The seeds of samples ``start`` to ``start + n``."""
        if len(self.values) == 1:
            return np.repeat(self.values, n, axis=0)
        return self.values[start:start + n]
