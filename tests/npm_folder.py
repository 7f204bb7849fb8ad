"""The npm side of the JavaScript tests (test_node.py, test_web.py): a tests/ folder whose
package.json pins exact versions, installed on demand with ``npm ci --ignore-scripts``, and
the rule that a missing tool skips the test with the reason, unless an environment variable
(set in ``.ci/run``) requires the test: then it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from conftest import ROOT

INSTALL_TIMEOUT_S = 600


@dataclass(frozen=True)
class NpmFolder:
    """A folder under tests/ with a package.json and package-lock.json.

    Attributes:
        folder: the folder (``node_modules`` is installed into it).
        packages: the dependencies the test needs at their pinned versions.
        test: how the messages name the test, e.g. ``"Node.js test"``.
        require_env: the variable that, set to ``1``, turns a skip into a failure.
    """

    folder: Path
    packages: tuple[str, ...]
    test: str
    require_env: str

    def unavailable(self, reason: str) -> NoReturn:
        """Skip with ``reason``, or fail where ``require_env=1`` requires the test."""
        if os.environ.get(self.require_env) == "1":
            pytest.fail(f"{self.test}: {reason} ({self.require_env}=1: the {self.test} is "
                        "required)", pytrace=False)
        pytest.skip(f"{self.test}: {reason} (set {self.require_env}=1 to make this a failure)")

    def pinned(self) -> dict[str, str]:
        """The versions package.json pins, by package."""
        deps = json.loads((self.folder / "package.json").read_text())["dependencies"]
        return {name: str(deps[name]) for name in self.packages}

    def installed(self) -> dict[str, str | None]:
        """The versions in the folder's node_modules, by package (``None``: not installed)."""
        out: dict[str, str | None] = {}
        for name in self.packages:
            try:
                meta = self.folder / "node_modules" / name / "package.json"
                out[name] = str(json.loads(meta.read_text())["version"])
            except (OSError, ValueError, KeyError):
                out[name] = None
        return out

    def node_and_npm(self) -> tuple[str, str]:
        """The ``node`` and ``npm`` executables on PATH."""
        node, npm = shutil.which("node"), shutil.which("npm")
        if node is None or npm is None:
            self.unavailable("`node` and `npm` must be on PATH")
        return node, npm

    def install(self, npm: str) -> None:
        """Install the pinned packages into the folder unless they are there already."""
        if self.installed() == self.pinned():
            return
        where = self.folder.relative_to(ROOT).as_posix()
        # `npm ci` installs exactly package-lock.json; --ignore-scripts: the packages' install
        # scripts only download binaries (GPU builds, browsers) and fail offline.
        cmd = [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"]
        said = f"`npm {' '.join(cmd[1:])}` in {where}"
        try:
            proc = subprocess.run(cmd, cwd=self.folder, capture_output=True, text=True,
                                  timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.unavailable(f"{said} took more than {INSTALL_TIMEOUT_S} s")
        if proc.returncode != 0:
            head = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[:4])
            self.unavailable(f"{said} failed (exit {proc.returncode}): {head}")
        if self.installed() != self.pinned():
            self.unavailable(f"{where}/node_modules holds {self.installed()} after `npm ci`, "
                             f"not {self.pinned()}")

    def check_missing_tools(self, ensure: Callable[[], object],
                            monkeypatch: pytest.MonkeyPatch) -> None:
        """Nothing on PATH: ``ensure`` skips with the reason, and fails under ``require_env=1``."""
        monkeypatch.setattr(shutil, "which", lambda _name: None)
        monkeypatch.delenv(self.require_env, raising=False)
        with pytest.raises(pytest.skip.Exception, match="`node` and `npm` must be on PATH"):
            ensure()
        monkeypatch.setenv(self.require_env, "1")
        with pytest.raises(pytest.fail.Exception, match=f"{self.require_env}=1"):
            ensure()
