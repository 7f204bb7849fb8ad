"""The fuzzers of :mod:`lrp_onnx.testing.fuzzing` in CI: 300 random valid CNNs against the float64
numpy reference (one in four with symbolic H/W, most of those also run at a second size) and
300 mutated models (``scripts/fuzz.py`` runs any number)."""

from __future__ import annotations

import numpy as np
import pytest

from lrp_onnx.testing import fuzzing, mutations

CASES = 300


def test_random_cnns_match_the_numpy_reference() -> None:
    tally = fuzzing.Tally()
    for seed in range(CASES):
        tally.add(fuzzing.graph_case(seed))
    assert not tally.failures, "\n".join(f"seed {f.seed}: {f.kind} {f.error} {f.detail}"
                                         for f in tally.failures[:5])
    # Valid graphs compile: a clean error here is a compiler gap, not a pass.
    assert tally.counts.get("clean-error", 0) == 0, tally.errors
    assert tally.counts.get("ok", 0) >= 0.95 * CASES, tally.counts
    # One seed in four has symbolic H/W; most of those also run at a second size. Refused
    # (ceil_mode pools on unknown sizes, the compiler's documented limit) stay a few.
    assert tally.tags.get("dynamic", 0) == CASES // 4, tally.tags
    assert tally.tags.get("second-size", 0) >= CASES // 8, tally.tags
    assert tally.counts.get("refused", 0) <= CASES // 40, tally.counts


def test_mutated_models_give_results_or_clean_errors() -> None:
    tally = fuzzing.Tally()
    bases = mutations.base_models()
    for seed in range(CASES):
        tally.add(mutations.mutation_case(seed, bases, run_cli=seed % 10 == 0))
    assert not tally.failures, "\n".join(f"seed {f.seed}: {f.error} {f.detail}"
                                         for f in tally.failures[:5])
    assert tally.counts.get("clean-error", 0) > CASES // 2  # the mutations do break models


def test_the_reference_is_not_vacuous(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a wrong rule in the reference (ZPlus where the model has ZeroRule and back), the
    comparison fails: the graph fuzzer can find mismatches."""
    real = fuzzing._ref_rule
    swap = {"zero": "zplus", "zplus": "zero", "flat": "zero", "epsilon": "zero",
            "alpha2beta1": "zero", "gamma": "zero"}
    monkeypatch.setattr(fuzzing, "_ref_rule", lambda name, *a: real(swap[name], *a))
    kinds = [fuzzing.graph_case(seed).kind for seed in range(20)]
    assert kinds.count("mismatch") >= 15, kinds


def test_numpy_conv_matches_direct_sums() -> None:
    """The reference convolution against a literal 7-loop sum (strides, pads, dilation, groups)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 7, 6))
    w = rng.standard_normal((6, 2, 3, 2))
    stride, pads, dil, group = 2, [1, 0, 2, 1], 2, 2
    got = fuzzing.np_conv(x, w, stride, pads, dil, group)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 2), (0, 1)))
    want = np.zeros_like(got)
    for n in range(2):
        for o in range(6):
            g = o // 3
            for i in range(got.shape[2]):
                for j in range(got.shape[3]):
                    for c in range(2):
                        for a in range(3):
                            for b in range(2):
                                src = xp[n, g * 2 + c, i * stride + a * dil, j * stride + b * dil]
                                want[n, o, i, j] += w[o, c, a, b] * src
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", [2755, 4427, 8307])
def test_dynamic_strided_window_in_the_begin_pad(case: int) -> None:
    """Found by the 10k run: on a symbolic H/W, a stride-2 kernel-1 Conv with begin pad 1 on a
    map that becomes 1x1 (its one window reads only the pad) transposed to 0 rows and ONNX
    Runtime refused the compiled model; the transpose now drops the begin pad too and
    ``fit_like`` crops it."""
    outcome = fuzzing.graph_case(case)
    assert "dynamic" in outcome.tags
    assert outcome.kind == "ok", (outcome.error, outcome.detail)
