"""Load and validate an ONNX model: a path or ``ModelProto`` in, a private checked copy out."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from .errors import ModelLoadError

#: Lowest default-domain opset accepted; 13 moved ``axes``/``split`` to inputs for the ops we emit.
MIN_OPSET = 13

def default_opset(model: onnx.ModelProto) -> int:
    """The model's ``ai.onnx`` opset version (0 if it imports none)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def _check_external_locations(model: onnx.ModelProto, base: Path, label: str) -> None:
    """Refuse external-data locations that are absolute or leave the model's folder."""
    root = base.resolve()
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location or os.path.isabs(location) or Path(location).drive:
            raise ModelLoadError(
                f"{label}: tensor '{tensor.name}' has external data at an absolute or empty "
                f"location {location!r}; only paths inside the model's folder are read"
            )
        target = (root / location).resolve()
        if root not in target.parents and target != root:
            raise ModelLoadError(
                f"{label}: tensor '{tensor.name}' has external data at {location!r}, "
                "which resolves outside the model's folder"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"{label}: tensor '{tensor.name}' needs external data file {location!r}, "
                "which does not exist"
            )


def load_model(model: str | os.PathLike[str] | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """Read ``model`` into a private ``ModelProto`` and validate it.

    Args:
        model: a path to an ``.onnx`` file (external data is read from beside it) or a
            ``ModelProto`` (copied: the caller's object is never modified).

    Returns:
        ``(proto, label)`` where ``label`` names the source in error messages.

    Raises:
        ModelLoadError: unreadable file, not protobuf, fails ``onnx.checker``, or opset below 13.
    """
    if isinstance(model, onnx.ModelProto):
        label = model.graph.name or "<ModelProto>"
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        label = str(path)
        if not path.is_file():
            raise ModelLoadError(f"{label}: no such file")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"{label}: cannot read file ({exc.strerror})") from None
        if not data:
            raise ModelLoadError(f"{label}: file is empty, not an ONNX model")
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(data)
        except (DecodeError, RuntimeError, ValueError):
            raise ModelLoadError(f"{label}: not an ONNX model (protobuf parse failed)") from None
        del data
        if not proto.HasField("graph"):
            raise ModelLoadError(f"{label}: not an ONNX model (no graph)")
        _check_external_locations(proto, path.parent, label)
        try:
            external_data_helper.load_external_data_for_model(proto, str(path.parent))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{label}: cannot read external data ({exc})") from None
    else:
        raise TypeError(f"model must be a path or onnx.ModelProto, not {type(model).__name__}")

    validate(proto, label)
    return proto, label


def validate(proto: onnx.ModelProto, label: str) -> None:
    """Structural checks with one-line errors (``onnx.checker`` plus what the compiler needs)."""
    if len(proto.graph.node) == 0:
        raise ModelLoadError(f"{label}: the graph has no nodes")
    opset = default_opset(proto)
    if opset < MIN_OPSET:
        raise ModelLoadError(
            f"{label}: default-domain opset {opset} is below {MIN_OPSET}; "
            "re-export with opset_version>=13 (17 recommended)"
        )
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{label}: invalid ONNX model: {first}") from None
