"""Running compiled models with ONNX Runtime: provider choice, sessions, and one explained batch
(:func:`run_compiled`, IO binding)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lrp_onnx.dtypes import ORT_DTYPES
from lrp_onnx.emit.contract import (
    OUTPUT_RELEVANCE,
    RELEVANCE,
    RELEVANCE_EMBEDDING,
    TARGET,
    TARGET_POSITION,
)
from lrp_onnx.errors import InvalidInput, RuntimeFailure, UnsupportedModel
from lrp_onnx.frontend.load import one_line
from lrp_onnx.io import EXTERNAL_DATA_ABOVE, save_model, weight_bytes

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


@dataclass
class Explanation:
    """Result of :meth:`LRP.analyze`.

    Attributes:
        relevance: input relevance, same shape and dtype as the input (token ids: one float
            per token).
        output: the explained model output (e.g. logits or probabilities).
        target: the class explained for each sample (argmax where ``-1`` was asked); ``-1``
            for every sample of a model seeded with an explicit ``output_relevance``.
        provider: the ONNX Runtime execution provider that ran the model.
        position: for a sequence output ``[N, T, V]``, the explained position of each sample
            (counted from the start); ``None`` otherwise.
        embedding: ``relevance_embedding`` ``[N, T, D]`` where the model outputs it.
    """

    relevance: np.ndarray
    output: np.ndarray
    target: np.ndarray
    provider: str
    position: np.ndarray | None = None
    embedding: np.ndarray | None = None


def run_compiled(session: Any, x: np.ndarray, target: Any, input_name: str, output_name: str,
                 num_classes: int, *, output_relevance: Any = None,
                 inputs: dict[str, np.ndarray] | None = None,
                 position: Any = None) -> Explanation:
    """Run a compiled model's session on ``x`` and its seed: ``target`` (models with a
    ``target`` input) or ``output_relevance`` (models compiled with ``output_relevance=True``);
    ``inputs``: the model's other inputs by name; ``position``: the explained position of a
    sequence output (models with a ``target_position`` input; ``None``: the last). Validates
    all of them (one-line :class:`InvalidInput` / :class:`UnsupportedModel` errors)."""
    x = np.asarray(x)
    n = x.shape[0] if x.ndim else 0
    names = [i.name for i in session.get_inputs()]
    if OUTPUT_RELEVANCE in names and TARGET not in names:
        if target is not None:
            raise InvalidInput("this model was compiled with output_relevance=True: pass "
                               "output_relevance=<array shaped like the output>, not target")
        if output_relevance is None:
            raise InvalidInput("this model was compiled with output_relevance=True: "
                               "output_relevance=<array shaped like the output> is required")
        seed = np.asarray(output_relevance)
        _check_input(session, OUTPUT_RELEVANCE, seed, what="output_relevance")
        if seed.shape[:1] != (n,):
            raise InvalidInput(f"output_relevance has {seed.shape[0] if seed.ndim else 0} "
                               f"samples; the input has {n}")
        seed_name, t = OUTPUT_RELEVANCE, np.full((n,), -1, dtype=np.int64)
    else:
        if output_relevance is not None:
            raise InvalidInput("this model takes a target, not output_relevance (compile it "
                               "with output_relevance=True / convert --output-relevance)")
        if target is None:
            t = np.full((n,), -1, dtype=np.int64)
        else:
            t = np.asarray(target, dtype=np.int64)
            if t.ndim == 0:
                t = np.full((n,), int(t), dtype=np.int64)
        if t.shape != (n,):
            raise UnsupportedModel(f"target has shape {t.shape}; expected ({n},) for a batch "
                                   f"of {n}")
        bad = (t < -1) | (t >= num_classes)
        if bad.any():
            raise UnsupportedModel(f"target {int(t[bad][0])} is outside [-1, "
                                   f"{num_classes - 1}]")
        seed_name, seed = TARGET, t
    contract = {input_name, seed_name}
    if TARGET_POSITION in names:
        contract.add(TARGET_POSITION)
        pos = _positions(position, n, x)
    elif position is not None:
        raise InvalidInput("position applies to a model whose explained output is a sequence "
                           "[N, T, classes]; this model has no target_position input")
    others = dict(inputs or {})
    unknown = [k for k in others if k not in names or k in contract]
    if unknown:
        raise InvalidInput(f"inputs: '{unknown[0]}' is not another input of the model (its "
                           f"inputs: {', '.join(names)})")
    missing = [k for k in names if k not in others and k not in contract]
    if missing:
        raise InvalidInput(f"the model also takes {', '.join(repr(k) for k in missing)}: pass "
                           "inputs={name: array}")
    others = {k: np.asarray(v) for k, v in others.items()}
    for k, v in others.items():
        _check_input(session, k, v)
    _check_input(session, input_name, x)
    # IO binding: the input is read from this numpy buffer where it is (CPU EP) or copied to
    # the GPU once (CUDA EP); outputs are written into CPU buffers ORT allocates, once.
    binding = session.io_binding()
    binding.bind_cpu_input(input_name, np.ascontiguousarray(x))
    binding.bind_cpu_input(seed_name, np.ascontiguousarray(seed))
    for k, v in others.items():
        binding.bind_cpu_input(k, np.ascontiguousarray(v))
    if TARGET_POSITION in contract:
        binding.bind_cpu_input(TARGET_POSITION, pos)
    binding.bind_output(output_name)
    binding.bind_output(RELEVANCE)
    embedded = RELEVANCE_EMBEDDING in {o.name for o in session.get_outputs()}
    if embedded:
        binding.bind_output(RELEVANCE_EMBEDDING)
    failures: tuple[type[BaseException], ...] = (RuntimeError, *ort_errors())
    import onnxruntime as ort

    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failed run is raised as one line, not also logged
    try:
        session.run_with_iobinding(binding, quiet)
    except failures as exc:  # IO binding raises a plain RuntimeError
        raise RuntimeFailure(f"ONNX Runtime failed to run the model: {one_line(str(exc))}") \
            from None
    out, rel, *emb = binding.copy_outputs_to_cpu()
    scores = np.asarray(out)
    at = None
    if TARGET_POSITION in contract:
        at = np.where(pos < 0, pos + scores.shape[1], pos)
        scores = scores[np.arange(n), at]
    chosen = t if seed_name == OUTPUT_RELEVANCE else \
        np.where(t < 0, scores.reshape(n, -1).argmax(axis=1), t)
    return Explanation(relevance=rel, output=out, target=chosen.astype(np.int64),
                       provider=session.get_providers()[0], position=at,
                       embedding=emb[0] if embedded else None)


def _positions(position: Any, n: int, x: np.ndarray) -> np.ndarray:
    """``position`` as int64 ``[n]`` (``None``: -1, the last), within the sequence length
    ``x.shape[1]`` where ``x`` has one."""
    if position is None:
        return np.full((n,), -1, dtype=np.int64)
    p = np.asarray(position, dtype=np.int64)
    if p.ndim == 0:
        p = np.full((n,), int(p), dtype=np.int64)
    if p.shape != (n,):
        raise InvalidInput(f"position has shape {p.shape}; expected ({n},) for a batch of {n}")
    length = x.shape[1] if x.ndim > 1 else None
    if length is not None and ((p < -length) | (p >= length)).any():
        bad = int(p[(p < -length) | (p >= length)][0])
        raise InvalidInput(f"position {bad} is outside [-{length}, {length - 1}] (the "
                           f"sequence has {length} positions)")
    return p


def _check_input(session: Any, input_name: str, x: np.ndarray, what: str = "") -> None:
    """A one-line :class:`InvalidInput` where ONNX Runtime would fail deep in its run."""
    spec = next((i for i in session.get_inputs() if i.name == input_name), None)
    if spec is None:
        return
    what = what or f"input '{input_name}'"
    want = ORT_DTYPES.get(spec.type)
    if want is not None and x.dtype != want:
        raise InvalidInput(f"{what} must be {np.dtype(want).name}, got "
                           f"{x.dtype.name} (convert with x.astype(np.{np.dtype(want).name}))")
    shape = list(spec.shape)
    if x.ndim != len(shape) or any(isinstance(d, int) and d != a for d, a in zip(shape, x.shape)):
        dims = ["N" if not isinstance(d, int) else d for d in shape]
        raise InvalidInput(f"{what} has shape {list(x.shape)}; the model takes {dims}")
