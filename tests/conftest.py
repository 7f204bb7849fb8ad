"""Shared fixtures: seeded RNGs, ONNX Runtime sessions, the ``slow``/``extended`` markers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
SEEDS = [0xDEADBEEF]
EXTENDED_SEEDS = [0x1, 0xC0FFEE, 0xBADF00D, 0x5EED, 0x1234ABCD]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--extended", action="store_true", help="run with more random seeds")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "seed" in metafunc.fixturenames:
        seeds = SEEDS + (EXTENDED_SEEDS if metafunc.config.getoption("--extended") else [])
        metafunc.parametrize("seed", seeds, ids=[hex(s) for s in seeds])


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    """A numpy Generator seeded from the ``seed`` parameter (one seed, more with --extended)."""
    return np.random.default_rng(seed)


def ort_session(model, threads: int = 1):
    """A CPU ONNX Runtime session for a ModelProto or path (tests compare on the CPU EP)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def seed_model_path() -> Path:
    return MODELS / "seed_vgg.onnx"
