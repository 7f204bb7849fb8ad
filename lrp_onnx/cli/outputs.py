"""What ``lrp-onnx explain`` writes: the progress bar, the output folder check, atomic files."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TextIO

import numpy as np

from lrp_onnx.errors import LRPError
from lrp_onnx.io import temp_beside

#: The progress bar is shown on a terminal from this many samples on.
PROGRESS_MIN_SAMPLES = 5


class OutputError(LRPError):
    """An output folder or file cannot be written."""


class Progress:
    """``[######------]  40/100 samples`` on stderr.

    On a terminal the bar is redrawn in place (and cleared while a result line is printed on
    stdout); elsewhere, when forced with ``--progress``, each update is one line.
    """

    WIDTH = 30

    def __init__(self, total: int, enabled: bool | None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.on = enabled if enabled is not None else (self.tty and
                                                        total >= PROGRESS_MIN_SAMPLES)
        self.total, self.done, self.drawn = total, 0, False

    def print(self, line: str) -> None:
        """Print a result line on stdout without mixing it into the bar."""
        if self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.drawn = False
        print(line, flush=self.on)

    def advance(self, n: int) -> None:
        self.done += n
        if not self.on:
            return
        filled = self.WIDTH * self.done // max(self.total, 1)
        text = f"[{'#' * filled}{'-' * (self.WIDTH - filled)}] {self.done}/{self.total} samples"
        if self.tty:
            self.stream.write("\r" + text)
            self.drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def check_out_dir(out: Path) -> None:
    """Refuse an output folder that cannot be written before anything runs (it is created at
    the first write)."""
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"{out}: exists and is not a folder")
        try:
            with tempfile.TemporaryFile(dir=out):
                pass
        except OSError as exc:
            raise OutputError(f"{out}: output folder is not writable ({exc.strerror})") from None
        return
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{out}: cannot create the output folder: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: cannot create the output folder: {parent} is not writable")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return b.exists() and (os.path.samefile(a, b) if a.exists() else a.resolve() == b.resolve())
    except OSError:
        return False


def check_model_destination(src: Path, dest: Path) -> None:
    """Refuse a model destination that is the input itself, a folder, or in a missing or
    read-only folder, before anything is compiled."""
    if _same_file(src, dest):
        raise OutputError(f"{dest}: refusing to overwrite the input model; choose another OUT")
    if dest.is_dir():
        raise OutputError(f"{dest}: is a folder; give the file name to write")
    if not dest.parent.exists():
        raise OutputError(f"{dest}: folder {dest.parent} does not exist")
    if not os.access(dest.parent, os.W_OK | os.X_OK):
        raise OutputError(f"{dest}: folder {dest.parent} is not writable")


def save_npy(arr: np.ndarray, path: Path) -> None:
    """``np.save`` atomically: a temporary file in the same folder, then a rename."""
    write_atomic(path, lambda fh: np.save(fh, arr))


def save_bytes(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` atomically."""
    write_atomic(path, lambda fh: fh.write(data))


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(file)`` into a temporary file beside ``path`` (:func:`lrp_onnx.io.temp_beside`:
    the umask applies), then a rename."""
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
