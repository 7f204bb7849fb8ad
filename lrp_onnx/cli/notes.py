"""The compiler's notes on stderr: what it did to a model the user should know of (an old
opset upgraded with ``onnx.version_converter``).

The API logs them on the ``lrp_onnx`` logger at INFO, as ``"%s: %s"`` with the model's label
and the note, and prints nothing (Python's last-resort handler shows WARNING and above only);
the command line installs :class:`Notes` for the length of one command.
"""

from __future__ import annotations

import logging
import sys

LOGGER = "lrp_onnx"


class Notes(logging.Handler):
    """Prints each note once per command as ``PROG: note: FILE: NOTE``, naming the file the
    command was given (``source``; the model's own label where none), so that ``check``, which
    compiles the file's model twice, says it once."""

    def __init__(self, prog: str, source: str | None) -> None:
        super().__init__(logging.INFO)
        self.prog, self.source = prog, source
        self.seen: set[str] = set()
        self._level = logging.NOTSET

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        note = str(args[-1]) if len(args) == 2 else record.getMessage()
        text = f"{self.source}: {note}" if self.source and len(args) == 2 \
            else record.getMessage()
        if note not in self.seen:
            self.seen.add(note)
            print(f"{self.prog}: note: {' '.join(text.split())}", file=sys.stderr)

    def install(self) -> Notes:
        log = logging.getLogger(LOGGER)
        self._level = log.level
        log.addHandler(self)
        log.setLevel(logging.INFO)
        return self

    def remove(self) -> None:
        log = logging.getLogger(LOGGER)
        log.removeHandler(self)
        log.setLevel(self._level)
