"""Streamed reading and writing of ONNX files: protobuf one initializer at a time, external data.

One home for the wire format: :func:`read_model` parses a file without holding its bytes and the
parsed model at once, :func:`write_model` serializes without a copy of the whole model, and
:func:`save_model` writes atomically (ONNX external data beside the model when asked or needed).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx

from lrp_onnx.dtypes import FLOAT_ITEMSIZE


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(fh: BinaryIO) -> int | None:
    """A protobuf varint from ``fh``; ``None`` at a clean end of file."""
    value, shift = 0, 0
    while True:
        b = fh.read(1)
        if not b:
            if shift:
                raise EOFError("truncated varint")
            return None
        value |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _read_exact(fh: BinaryIO, n: int) -> bytes:
    here = fh.tell()
    end = fh.seek(0, os.SEEK_END)
    fh.seek(here)
    if n > end - here:  # a corrupt length: refuse before allocating it
        raise EOFError("truncated field")
    data = fh.read(n)
    if len(data) != n:
        raise EOFError("truncated field")
    return data


def _field(fh: BinaryIO, end: int | None) -> tuple[int, int | None] | None:
    """The next field's ``(key, length)`` (length ``None`` unless length-delimited), or
    ``None`` at ``end`` (a clean end of file when ``end`` is ``None``)."""
    if end is not None and fh.tell() >= end:
        return None
    key = _read_varint(fh)
    if key is None:
        if end is not None:
            raise EOFError("truncated message")
        return None
    if key & 7 != 2:
        return key, None
    length = _read_varint(fh)
    if length is None:
        raise EOFError("truncated length")
    return key, length


def _payload(fh: BinaryIO, key: int, length: int | None) -> bytes:
    """The field's payload (without its length prefix for length-delimited fields)."""
    if length is not None:
        return _read_exact(fh, length)
    wire = key & 7
    if wire == 0:
        raw = bytearray()
        while True:
            b = _read_exact(fh, 1)
            raw += b
            if not b[0] & 0x80:
                return bytes(raw)
    if wire in (1, 5):
        return _read_exact(fh, 8 if wire == 1 else 4)
    raise ValueError(f"unsupported wire type {wire}")


def _encode(key: int, payload: bytes, length_delimited: bool) -> bytes:
    return _varint(key) + (_varint(len(payload)) if length_delimited else b"") + payload


def read_model(fh: BinaryIO) -> onnx.ModelProto:
    """Parse a serialized ``ModelProto`` from ``fh`` one initializer at a time.

    ``ParseFromString`` on the whole file holds the file's bytes and the parsed model at once
    (2x the model); here the graph's initializers are parsed from their own slices of the file,
    so the peak is the model plus its largest tensor. Every other field is collected and parsed
    with ``MergeFromString``: the result equals ``ParseFromString`` of the file.
    """
    graph_no = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
    init_no = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
    model = onnx.ModelProto()
    rest = bytearray()
    while (head := _field(fh, None)) is not None:
        key, length = head
        if key >> 3 != graph_no or length is None:
            rest += _encode(key, _payload(fh, key, length), length is not None)
            continue
        end = fh.tell() + length
        graph_rest = bytearray()
        while (g_head := _field(fh, end)) is not None:
            g_key, g_length = g_head
            g_payload = _payload(fh, g_key, g_length)
            if g_key >> 3 == init_no and g_length is not None:
                model.graph.initializer.add().ParseFromString(g_payload)
            else:
                graph_rest += _encode(g_key, g_payload, g_length is not None)
            del g_payload
        if fh.tell() != end:
            raise ValueError("graph field overruns its length")
        model.graph.MergeFromString(bytes(graph_rest))
    model.MergeFromString(bytes(rest))
    return model


def _shell(msg: Any, skip: str) -> Any:
    """A copy of ``msg`` without its field ``skip`` (the other fields are small)."""
    shell = type(msg)()
    for fd, value in msg.ListFields():
        if fd.name == skip:
            continue
        if fd.is_repeated:
            getattr(shell, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(shell, fd.name).CopyFrom(value)
        else:
            setattr(shell, fd.name, value)
    return shell


#: Above this many bytes of weights a compiled model is saved with external data
#: (protobuf cannot parse a file over 2 GiB).
EXTERNAL_DATA_ABOVE = 2**31 - 2**26
#: Initializers at least this large go to the external data file.
EXTERNAL_MIN_BYTES = 1024


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the float initializers stored raw (from their shapes: no data is copied)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_type in FLOAT_ITEMSIZE:
            total += int(np.prod(t.dims, dtype=np.int64)) * FLOAT_ITEMSIZE[t.data_type]
    return total


def write_model(model: onnx.ModelProto, fh: Any, external: tuple[Any, str] | None = None) -> None:
    """Serialize ``model`` to the binary file ``fh`` one initializer at a time.

    The bytes are exactly those of a protobuf serialization with the graph's initializers last
    (field order is free in the wire format), but no serialized copy of the whole model is
    ever held in memory: saving VGG16 peaks at the model plus its largest tensor.

    ``external=(data_fh, location)`` writes every raw float initializer of at least
    ``EXTERNAL_MIN_BYTES`` to ``data_fh`` instead (ONNX external data, ``location`` relative to
    the model's folder); ``model`` itself is not modified.
    """
    graph_no, init_no = (onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number,
                         onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number)
    graph = model.graph
    graph_shell = _shell(graph, "initializer")
    raw_key = _varint(onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number << 3 | 2)
    # (shell, raw length) of each initializer whose weight bytes are written as they are; the
    # raw length comes from the shape (checked against the data when the model was loaded):
    # ``ByteSize()`` and ``raw_data`` each copy the tensor.
    parts: list[tuple[Any, int]] = []
    sizes = []
    offset = 0
    for t in graph.initializer:
        if t.HasField("raw_data") and t.data_type in FLOAT_ITEMSIZE:
            shell = _shell(t, "raw_data")
            n_raw = int(np.prod(t.dims, dtype=np.int64)) * FLOAT_ITEMSIZE[t.data_type]
            if external is not None and n_raw >= EXTERNAL_MIN_BYTES:
                shell.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", external[1]), ("offset", str(offset)),
                                   ("length", str(n_raw))):
                    entry = shell.external_data.add()
                    entry.key, entry.value = key, value
                offset += n_raw
                parts.append((shell, -n_raw))  # negative: the bytes go to the data file
                sizes.append(shell.ByteSize())
                continue
            parts.append((shell, n_raw))
            sizes.append(shell.ByteSize() + len(raw_key) + len(_varint(n_raw)) + n_raw)
        else:
            parts.append((None, 0))
            sizes.append(t.ByteSize())
    init_key = _varint(init_no << 3 | 2)
    total = graph_shell.ByteSize() + sum(len(init_key) + len(_varint(n)) + n for n in sizes)
    fh.write(_shell(model, "graph").SerializeToString())
    fh.write(_varint(graph_no << 3 | 2) + _varint(total))
    fh.write(graph_shell.SerializeToString())
    for t, n, (shell, n_raw) in zip(graph.initializer, sizes, parts):
        fh.write(init_key + _varint(n))
        if shell is None:
            fh.write(t.SerializeToString())
            continue
        raw = t.raw_data
        if len(raw) != abs(n_raw):
            raise ValueError(f"initializer '{t.name}' holds {len(raw)} bytes, its shape needs "
                             f"{abs(n_raw)}")
        fh.write(shell.SerializeToString())
        if n_raw < 0 and external is not None:
            external[0].write(raw)
        else:
            fh.write(raw_key + _varint(n_raw))
            fh.write(raw)
        del raw


def temp_beside(dest: Path) -> tuple[int, str]:
    """A new temporary file in ``dest``'s folder (``os.replace`` is atomic only within one file
    system), opened for writing: ``(fd, name)``. Created with mode 0o666, so that the umask
    applies as for a normal file (``tempfile.mkstemp`` would make it 0o600)."""
    folder = dest.parent if str(dest.parent) else Path(".")
    while True:
        tmp = str(folder / f".{dest.name}.{secrets.token_hex(4)}.partial")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str],
               external_data: bool | None = None) -> None:
    """Write ``model`` atomically: temporary files in the same folder, then renames.

    ``external_data``: ``True`` writes the weights to ``<name>.data`` beside the model (ONNX
    external data), ``False`` into the one file, ``None`` (default) external when the weights
    exceed ``EXTERNAL_DATA_ABOVE`` (a protobuf file cannot exceed 2 GiB).
    """
    dest = Path(path)
    if external_data is None:
        external_data = weight_bytes(model) > EXTERNAL_DATA_ABOVE
    temps: list[str] = []
    try:
        fd, tmp = temp_beside(dest)
        temps.append(tmp)
        data_dest = dest.with_name(dest.name + ".data")
        with os.fdopen(fd, "wb") as fh:
            if external_data:
                dfd, dtmp = temp_beside(data_dest)
                temps.append(dtmp)
                with os.fdopen(dfd, "wb") as dfh:
                    write_model(model, fh, (dfh, data_dest.name))
            else:
                write_model(model, fh)
        if external_data:
            os.replace(temps[1], data_dest)
        os.replace(tmp, dest)
    except BaseException:
        for t in temps:
            Path(t).unlink(missing_ok=True)
        raise


