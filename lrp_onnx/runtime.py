"""Running compiled models with ONNX Runtime: provider choice and sessions."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import onnx

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def _gpu_present() -> bool:
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg"))


def ort_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's exception classes (``Fail``, ``InvalidArgument``, ``InvalidGraph`` ...)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(c for c in vars(state).values()
                 if isinstance(c, type) and issubclass(c, Exception))


def default_providers(device: str = "auto") -> list[Any]:
    """Execution providers for ``device``: ``"auto"`` (CUDA when onnxruntime-gpu and a GPU are
    present, else CPU), ``"cuda"`` or ``"cpu"``."""
    import onnxruntime as ort

    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', not {device!r}")
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if device == "cuda" or (CUDA in available and _gpu_present()):
        return [(CUDA, {"use_tf32": 0}), CPU]
    return [CPU]


def make_session(model: onnx.ModelProto | str | os.PathLike[str], *, device: str = "auto",
                 providers: list[Any] | None = None, threads: int | None = None,
                 strict_device: bool = False) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``model``.

    Args:
        model: a ModelProto or a path.
        device: ``"auto"``, ``"cuda"`` or ``"cpu"`` (ignored when ``providers`` is given).
        providers: explicit ORT providers list.
        threads: intra-op threads (ORT's default when ``None``).
        strict_device: refuse any node placed on the CPU when a GPU provider is asked for
            (``session.disable_cpu_ep_fallback``); used by the GPU tests.

    ``session.get_providers()[0]`` says which provider really runs: onnxruntime-gpu silently
    falls back to the CPU where CUDA cannot load.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
    if strict_device:
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    provs = providers if providers is not None else default_providers(device)
    if strict_device:
        # ORT refuses a session that lists the CPU EP while CPU fallback is disabled.
        provs = [p for p in provs if (p[0] if isinstance(p, tuple) else p) != CPU] or provs
    if isinstance(model, onnx.ModelProto):
        from .analyzer import EXTERNAL_DATA_ABOVE, save_model, weight_bytes

        if weight_bytes(model) > EXTERNAL_DATA_ABOVE:
            # Over 2 GiB a model cannot be serialized in one piece: hand ORT a file with
            # external data, kept for as long as the session lives.
            folder = tempfile.TemporaryDirectory(prefix="lrp_onnx_")
            path = Path(folder.name) / "model.onnx"
            save_model(model, path, external_data=True)
            session = ort.InferenceSession(str(path), opts, providers=provs)
            session._lrp_onnx_files = folder  # noqa: SLF001 - lifetime of the external data
            return session
        return ort.InferenceSession(model.SerializeToString(), opts, providers=provs)
    return ort.InferenceSession(str(model), opts, providers=provs)
