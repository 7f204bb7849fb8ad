"""Compiled models are byte-identical to the committed hashes (refactors change no output).

``tests/data/compiled_hashes.json`` holds, per model, the SHA-256 of the input file and of the
model compiled with three presets, written by ``scripts/compiled_hashes.py`` from the compiler
at commit c49ca03 (before the package was reorganised into frontend/rules/emit). A change that
means to change compiled models regenerates the file with
``python scripts/compiled_hashes.py --json tests/data/compiled_hashes.json`` and says why in its
commit. The torchvision models are exported here with torch 2.14.1 (the pinned test
dependency); their input hash is checked first, so an exporter change fails as such.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = json.loads((ROOT / "tests" / "data" / "compiled_hashes.json").read_text())


def _script():  # scripts/ is not a package: load the one script both sides use
    spec = importlib.util.spec_from_file_location("compiled_hashes",
                                                  ROOT / "scripts" / "compiled_hashes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(name: str) -> None:
    got = _script().hashes([name])[name]
    assert got["input"] == EXPECTED[name]["input"], f"{name}: the input model changed"
    diff = [k for k in EXPECTED[name] if got[k] != EXPECTED[name][k]]
    assert not diff, f"{name}: compiled bytes differ for {diff}"


@pytest.mark.parametrize("name", ["seed", "digits"])
def test_shipped_models_compile_to_the_same_bytes(name: str) -> None:
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_torchvision_models_compile_to_the_same_bytes(name: str) -> None:
    pytest.importorskip("torchvision")
    _check(name)
