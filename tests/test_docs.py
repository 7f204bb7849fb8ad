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


def test_api_reference_names_every_public_name() -> None:
    import lrp_onnx

    text = (ROOT / "docs" / "api.md").read_text()
    missing = [n for n in lrp_onnx.__all__ if f"`{n}" not in text]
    assert not missing, f"docs/api.md does not mention {missing}"


def test_readme_main_command_runs(tmp_path: Path) -> None:
    """The README's first set-up command, after its ``pip install .``, from a scratch folder
    where ``models/`` is the repository's: exit 0, and a heatmap and relevance per digit."""
    import shutil
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    command = re.findall(r"```bash\n(.*?)\n```", readme, re.S)[0]
    assert command.startswith("pip install . && ")
    (tmp_path / "models").symlink_to(MODELS)
    exe = shutil.which("lrp-onnx") or f"{sys.executable} -m lrp_onnx.cli"
    steps = command.removeprefix("pip install . && ").replace("lrp-onnx ", f"{exe} ")
    done = subprocess.run(steps, shell=True, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    for i in range(10):
        assert (tmp_path / "out" / f"digits_samples_{i}.png").is_file()
        assert (tmp_path / "out" / f"digits_samples_{i}.relevance.npy").is_file()


CONSOLE = re.compile(r"```\n(\$ .*?)```\n", re.S)


def _matches(expected: list[str], actual: list[str]) -> bool:
    """``expected`` lines appear in ``actual`` in order; ``...`` skips any number of lines."""
    i = 0
    skip = False
    for line in expected:
        if line.strip() == "...":
            skip = True
            continue
        while i < len(actual) and actual[i] != line:
            if not skip:
                return False
            i += 1
        if i == len(actual):
            return False
        i += 1
        skip = False
    return skip or i == len(actual)


@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_doc_console_examples(page: Path, tmp_path: Path) -> None:
    """Every ``$ lrp-onnx ...`` line in an unlabelled code block runs (in order, per page, in a
    scratch folder) and prints the lines shown under it (``...`` elides lines)."""
    import shlex
    import subprocess
    import sys

    blocks = CONSOLE.findall(page.read_text())
    if not blocks:
        return
    (tmp_path / "models").symlink_to(MODELS)
    for block in blocks:
        runs: list[tuple[str, list[str]]] = []
        for line in block.rstrip("\n").split("\n"):
            if line.startswith("$ "):
                runs.append((line[2:], []))
            else:
                runs[-1][1].append(line)
        for command, expected in runs:
            args = shlex.split(command)
            if args[0] == "node":  # deployment.md's Node.js run: tests/test_node.py runs it
                continue
            assert args[0] == "lrp-onnx", f"{page.name}: cannot run {command}"
            done = subprocess.run([sys.executable, "-m", "lrp_onnx.cli", *args[1:]],
                                  cwd=tmp_path, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{page.name}: {command}: {done.stderr}"
            actual = done.stdout.rstrip("\n").split("\n")
            assert _matches(expected, actual), (
                f"{page.name}: {command} printed:\n{done.stdout}\nthe page shows:\n"
                + "\n".join(expected))
