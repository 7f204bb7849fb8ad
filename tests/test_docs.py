"""Every ```python block in docs/*.md runs; a ```text block right after it is its exact output.

Blocks of one page share a namespace and run in order, in a scratch folder where ``models/``
points at the repository's models (so examples that write files leave the checkout clean).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest

from conftest import MODELS, ROOT

DOCS = sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"```(python|text)\n(.*?)```\n", re.S)


def _blocks(text: str) -> list[tuple[str, str, bool]]:
    """``(kind, body, directly_after_previous_block)`` for each fenced python/text block."""
    out = []
    end = 0
    for m in BLOCK.finditer(text):
        out.append((m.group(1), m.group(2), text[end:m.start()].strip() == "" and bool(out)))
        end = m.end()
    return out


@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_doc_page(page: Path, tmp_path: Path) -> None:
    (tmp_path / "models").symlink_to(MODELS)
    ns: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    last: str | None = None
    ran = 0
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        for kind, body, adjacent in _blocks(page.read_text()):
            if kind == "python":
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    exec(compile(body, f"{page.name}", "exec"), ns)  # noqa: S102 (our docs)
                last, ran = buf.getvalue(), ran + 1
            elif adjacent and last is not None:
                assert last == body, f"{page.name}: output differs:\n{last}\n---\n{body}"
                last = None
    finally:
        os.chdir(old)
    if page.name in ("composites.md", "getting-started.md", "rules.md"):
        assert ran > 0
