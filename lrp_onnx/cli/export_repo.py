"""``lrp-onnx export-repo COMPILED REPO --name N``: a Triton Inference Server model repository.

Writes ``REPO/N/1/model.onnx`` (the compiled model, weights as they are stored) and
``REPO/N/config.pbtxt`` for Triton's ONNX Runtime backend: every graph input and output with
its Triton data type and dims (``-1`` where dynamic), and, where every input and output has
a dynamic first dimension, ``max_batch_size`` with dynamic batching. A per-sample scalar (the
``target`` input, int64 ``[N]``) is declared ``dims: [ 1 ]`` with ``reshape: { shape: [ ] }``,
Triton's spelling of a batch of scalars. ``REPO/N`` is written under a temporary name and
renamed once complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx

from lrp_onnx.cli.argtypes import positive_int
from lrp_onnx.cli.outputs import OutputError
from lrp_onnx.emit.contract import RELEVANCE
from lrp_onnx.errors import InvalidInput

#: ONNX tensor element types as Triton's ``DataType`` names.
TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT16: "TYPE_INT16", onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.UINT64: "TYPE_UINT64", onnx.TensorProto.UINT32: "TYPE_UINT32",
    onnx.TensorProto.UINT16: "TYPE_UINT16", onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.STRING: "TYPE_STRING",
}
KINDS = {"auto": None, "cpu": "KIND_CPU", "gpu": "KIND_GPU"}


def add_export_repo_parser(sub: Any) -> None:
    """The ``export-repo`` sub-command."""
    p = sub.add_parser(
        "export-repo", help="write a Triton Inference Server model repository entry",
        description="Write REPO/NAME/1/model.onnx and REPO/NAME/config.pbtxt (ONNX Runtime "
        "backend, inputs and outputs with dims, dynamic batching) for COMPILED.")
    p.add_argument("model", metavar="COMPILED", help="model written by 'convert'")
    p.add_argument("repo", metavar="REPO", help="the model repository folder")
    p.add_argument("--name", required=True, help="the model's name in the repository")
    p.add_argument("--max-batch-size", type=positive_int, default=64, metavar="N",
                   help="largest batch Triton forms (default: 64)")
    p.add_argument("--kind", choices=tuple(KINDS), default="auto",
                   help="instance kind: one instance on the GPU or the CPU (default: Triton's)")
    p.set_defaults(func=cmd_export_repo)


def cmd_export_repo(args: argparse.Namespace) -> int:
    """Write the repository entry; errors are one-line ``LRPError``s."""
    if not args.name or args.name in (".", "..") or "/" in args.name or os.sep in args.name:
        raise InvalidInput(f"--name {args.name!r}: give a plain folder name")
    src = Path(args.model)
    try:
        model = onnx.load(src)
    except FileNotFoundError:
        raise InvalidInput(f"{src}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and others
        raise InvalidInput(f"{src}: not a readable ONNX model ({type(exc).__name__})") from None
    if RELEVANCE not in {o.name for o in model.graph.output}:
        raise InvalidInput(f"{src}: not a compiled model (no '{RELEVANCE}' output); run "
                           "'lrp-onnx convert' first")
    config = triton_config(model, args.name, args.max_batch_size, KINDS[args.kind], str(src))
    repo = Path(args.repo)
    dest = repo / args.name
    if dest.exists():
        raise OutputError(f"{dest}: exists; remove it or choose another --name")
    try:
        repo.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{args.name}.partial-", dir=repo))
    except OSError as exc:
        raise OutputError(f"{repo}: cannot write ({exc.strerror or exc})") from None
    try:
        partial.chmod(0o755)  # mkdtemp's 0700 would hide the model from a server's user
        (partial / "1").mkdir()
        from lrp_onnx.io import save_model

        save_model(model, partial / "1" / "model.onnx")
        (partial / "config.pbtxt").write_text(config, encoding="utf-8")
        os.replace(partial, dest)
    except OSError as exc:
        raise OutputError(f"{dest}: cannot write ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"wrote {dest / '1' / 'model.onnx'} and {dest / 'config.pbtxt'}")
    return 0


def triton_config(model: onnx.ModelProto, name: str, max_batch_size: int,
                  kind: str | None = None, label: str = "the model") -> str:
    """``config.pbtxt`` text for ``model`` under ``name`` (see the module docstring)."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits]
    tensors = [(vi, _dims(vi, label)) for vi in [*inputs, *model.graph.output]]
    batched = all(dims and dims[0] == -1 for _, dims in tensors)
    lines = [f'name: "{name}"', 'backend: "onnxruntime"',
             f"max_batch_size: {max_batch_size if batched else 0}"]
    for field, values in (("input", inputs), ("output", list(model.graph.output))):
        entries = []
        for vi in values:
            dims = _dims(vi, label)[1:] if batched else _dims(vi, label)
            elem = vi.type.tensor_type.elem_type
            if elem not in TRITON_TYPES:
                raise InvalidInput(f"{label}: {field} '{vi.name}' has element type "
                                   f"{onnx.TensorProto.DataType.Name(elem)}, which Triton lacks")
            entry = [f'    name: "{vi.name}"', f"    data_type: {TRITON_TYPES[elem]}"]
            if batched and not dims:
                entry += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
            else:
                entry.append(f"    dims: [ {', '.join(map(str, dims))} ]")
            entries.append("  {\n" + "\n".join(entry) + "\n  }")
        lines.append(f"{field} [\n" + ",\n".join(entries) + "\n]")
    if kind is not None:
        lines.append(f"instance_group [ {{ count: 1, kind: {kind} }} ]")
    if batched:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def _dims(vi: onnx.ValueInfoProto, label: str) -> list[int]:
    """The tensor's dims, ``-1`` where dynamic."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        raise InvalidInput(f"{label}: '{vi.name}' has no shape; Triton needs each tensor's rank")
    return [int(d.dim_value) if d.HasField("dim_value") else -1 for d in tt.shape.dim]
