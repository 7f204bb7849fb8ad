"""``lrp-onnx explain ... --ray [ADDRESS]``: explain on a Ray cluster and write Parquet.

Inputs are either Parquet (files, or folders of ``.parquet`` files; the sample column is
``--column``, every column is kept in the output) or ``.npy`` arrays and images (checked from
their headers here, then read and preprocessed on the workers; the output has ``path`` and
``index`` (-1: the file is one sample) instead of the sample). The explanation runs in
:func:`lrp_onnx.ray.explain_dataset`; the result is written as a folder of Parquet files,
first under a temporary name beside ``--out`` and renamed once complete, so a failed job
leaves no partial output.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lrp_onnx.cli.argtypes import positive_int
from lrp_onnx.cli.inputs import (
    IMAGE_SUFFIXES,
    InputFileError,
    ModelInput,
    Preprocess,
    expand_inputs,
    open_npy,
    plan_inputs,
    read_image,
)
from lrp_onnx.cli.outputs import OutputError, check_out_dir
from lrp_onnx.errors import InvalidInput

PARQUET = ".parquet"


def add_ray_options(p: argparse.ArgumentParser) -> None:
    """The ``--ray`` options of ``explain``."""
    g = p.add_argument_group("Ray (docs/scale.md): explain on a cluster, write Parquet to --out")
    g.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run on the Ray cluster at ADDRESS (ray://head:10001, auto); without "
                   "ADDRESS: $RAY_ADDRESS's, one running here, or a new local one (put --ray "
                   "after the inputs)")
    g.add_argument("--column", help="Parquet inputs: the column holding the samples (default: "
                   "input)")
    g.add_argument("--target-column", metavar="NAME",
                   help="Parquet inputs: an int column with each row's class")
    g.add_argument("--on-error", choices=("fail", "column"),
                   help="a row that cannot be explained fails the job (default), or gets an "
                   "'error' column")
    g.add_argument("--concurrency", type=positive_int, default=None, metavar="N",
                   help="Ray actors, one ONNX Runtime session each (default: 1)")


def refuse_ray_options(args: argparse.Namespace) -> None:
    """Without ``--ray``, refuse the options that only apply with it."""
    given = [option for option, value in (("--column", args.column),
                                          ("--target-column", args.target_column),
                                          ("--on-error", args.on_error),
                                          ("--concurrency", args.concurrency))
             if value is not None]
    if given:
        raise InvalidInput(f"{given[0]} applies with --ray only")


def explain_on_ray(args: argparse.Namespace, preprocess: Preprocess, prog: str) -> int:
    """Run ``explain --ray``: returns the exit code (errors raise one-line ``LRPError``s)."""
    from lrp_onnx.cli.compiled import CompiledIO, check_seed_options
    from lrp_onnx.frontend.load import load_model

    if not args.out:
        raise InvalidInput("--ray writes Parquet: give --out DIR")
    if args.overlay or args.output_relevance:
        raise InvalidInput("--ray writes relevance to Parquet: --overlay and "
                           "--output-relevance apply without --ray")
    out = Path(args.out)
    check_out_dir(out)
    if out.exists() and any(out.iterdir()):
        raise OutputError(f"{out}: exists and is not empty (--ray writes a Parquet folder)")
    model, label = load_model(args.model)
    io = CompiledIO.of(model, label, prog)
    check_seed_options(io, label, args.target, None)
    parquet, files = _split_inputs(args.inputs, args.recursive)
    if files and (args.column or args.target_column):
        raise InvalidInput("--column and --target-column apply to Parquet inputs")
    if args.target_column and args.target is not None:
        raise InvalidInput("give --target-column or --target, not both")
    spec = ModelInput.of(model, io.input)
    plan = plan_inputs(expand_inputs(files, recursive=args.recursive), spec, preprocess) \
        if files else None

    import ray  # type: ignore[import-untyped,unused-ignore]

    started = not ray.is_initialized()
    if started:
        ray.init(address=args.ray or None, include_dashboard=False,
                 logging_level=logging.ERROR, log_to_driver=False)
    try:
        return _run(args, out, label, spec, parquet, plan)
    finally:
        if started:
            ray.shutdown()


def _run(args: argparse.Namespace, out: Path, label: str, spec: ModelInput,
         parquet: list[str], plan: Any) -> int:
    import ray.data  # type: ignore[import-untyped,unused-ignore]

    from lrp_onnx.ray import explain_dataset, row_error

    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray", "ray.data"):  # our one line replaces Ray's log and traceback
        logging.getLogger(name).setLevel(logging.CRITICAL)
    target_column = args.target_column
    column = args.column or "input"
    if plan is not None:
        items = [{"path": str(s.path.resolve()), "index": -1 if s.index is None else s.index}
                 for s in plan.samples]
        listed: Any = ray.data.from_items(items)  # paths only: workers read the samples
        ds = listed.map_batches(
            _read_samples, fn_kwargs=dict(spec=spec, pre=plan.preprocess),
            batch_size=args.batch_size, batch_format="numpy")
    else:
        ds = ray.data.read_parquet(parquet)
        names = ds.columns()  # from the Parquet footers
        for name, option in ((column, "--column"), (target_column, "--target-column")):
            if name and name not in names:
                raise InputFileError(parquet[0], f"no column '{name}' ({option}); its columns: "
                                     f"{', '.join(names)}")
    if args.target is not None:
        target_column = "target"
        ds = ds.map_batches(_constant, fn_kwargs=dict(name=target_column, value=args.target),
                            batch_format="numpy")
    result = explain_dataset(ds, args.model, column=column,
                             target_column=target_column, batch_size=args.batch_size,
                             concurrency=args.concurrency,
                             device="cuda" if args.device == "cuda" else "cpu",
                             on_error=args.on_error or "fail")
    if plan is not None:
        result = result.drop_columns(["input"])
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        try:
            result.write_parquet(str(partial))
        except Exception as exc:  # noqa: BLE001 - Ray wraps a row's error in its own
            message = row_error(exc)
            if message is None:
                raise
            raise InvalidInput(f"{label}: {message}") from None
        rows, errors = _count(partial)
        partial.chmod(0o755)  # mkdtemp makes it 0700
        if out.exists():
            out.rmdir()
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    what = f"; {errors} row(s) with an error" if args.on_error == "column" else ""
    print(f"explained {rows} row(s) on Ray{what}; wrote Parquet to {out}")
    return 0


def _split_inputs(inputs: list[str], recursive: bool) -> tuple[list[str], list[str]]:
    """Parquet inputs (files, folders of them, URIs such as ``s3://...``) and the others
    (``.npy``/images, folders); one kind per run."""
    parquet: list[str] = []
    other: list[str] = []
    for raw in inputs:
        p = Path(raw)
        found = p.is_dir() and any((p.rglob if recursive else p.glob)(f"*{PARQUET}"))
        uri = "://" in raw  # s3://, gs://, hdfs://: read by Ray on the workers
        (parquet if uri or p.suffix.lower() == PARQUET or found else other).append(raw)
    for raw in parquet:
        if "://" not in raw and not Path(raw).exists():
            raise InputFileError(raw, "no such file or folder")
    if parquet and other:
        raise InputFileError(other[0], "give either Parquet inputs or .npy/image inputs to "
                             "--ray, not both")
    return parquet, other


def _read_samples(batch: dict[str, np.ndarray], spec: ModelInput, pre: Preprocess | None
                  ) -> dict[str, np.ndarray]:
    """On a worker: the ``input`` column from the batch's ``path``/``index`` columns."""
    from lrp_onnx.ray import stack_rows

    xs = []
    for path, index in zip(batch["path"], batch["index"]):
        p = Path(str(path))
        if p.suffix.lower() in IMAGE_SUFFIXES:
            assert pre is not None
            xs.append(read_image(p, pre, spec.dtype)[0])
        else:
            arr = open_npy(p)
            xs.append(np.array(arr if index < 0 else arr[index], dtype=spec.dtype))
    return {**batch, "input": stack_rows(xs)}


def _constant(batch: dict[str, np.ndarray], name: str, value: int) -> dict[str, np.ndarray]:
    n = len(next(iter(batch.values())))
    return {**batch, name: np.full(n, value, dtype=np.int64)}


def _count(folder: Path) -> tuple[int, int]:
    """Rows written, and rows with an error (read from the Parquet footers and the
    ``error`` column only)."""
    import pyarrow.parquet as pq

    rows = errors = 0
    for f in sorted(folder.rglob(f"*{PARQUET}")):
        meta = pq.read_metadata(f)
        rows += meta.num_rows
        if "error" in meta.schema.names:
            errors += sum(bool(e) for e in pq.read_table(f, columns=["error"]).column(0)
                          .to_pylist())
    return rows, errors
