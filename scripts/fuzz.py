"""Fuzz the compiler: random valid CNNs against a float64 numpy reference, and mutated models.

    python scripts/fuzz.py --cases 10000 [--kind graphs|mutations|both] [--seed S]
                           [--time-limit SECONDS]

Prints the counts per outcome (ok, ill-conditioned, clean-error by error class, refused,
mismatch, crash), how many graph cases had symbolic H/W and a second size, and, for every
crash or mismatch, the seed that reproduces it (``lrp_onnx.testing.fuzzing.graph_case(seed)``
/ ``mutation_case(seed, base_models())``). Exit status 1 when there was any crash or
mismatch. See docs/fuzzing.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lrp_onnx.testing import fuzzing, mutations  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000, help="cases per kind")
    parser.add_argument("--kind", choices=("graphs", "mutations", "both"), default="both")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="stop each kind after this long")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # onnx-graphsurgeon's warnings on mutated models
    import onnxruntime as ort
    from onnx_graphsurgeon.logger import G_LOGGER

    ort.set_default_logger_severity(4)
    G_LOGGER.severity = G_LOGGER.CRITICAL
    bad = 0
    kinds = ("graphs", "mutations") if args.kind == "both" else (args.kind,)
    bases = mutations.base_models() if "mutations" in kinds else []
    for kind in kinds:
        tally = fuzzing.Tally()
        start = time.perf_counter()
        done = 0
        for seed in range(args.seed, args.seed + args.cases):
            if args.time_limit and time.perf_counter() - start > args.time_limit:
                break
            outcome = (fuzzing.graph_case(seed) if kind == "graphs"
                       else mutations.mutation_case(seed, bases))
            tally.add(outcome)
            done += 1
        took = time.perf_counter() - start
        counts = ", ".join(f"{k} {v}" for k, v in sorted(tally.counts.items()))
        print(f"{kind}: {done} cases in {took:.0f} s: {counts}")
        if tally.tags:
            print("  cases exercising: " + ", ".join(f"{k} {v}" for k, v in
                                                     sorted(tally.tags.items())))
        if tally.errors:
            print("  errors by class: " + ", ".join(f"{k} {v}" for k, v in
                                                    sorted(tally.errors.items())))
        for f in tally.failures:
            first = f.detail.strip().splitlines()[-1] if f.detail.strip() else ""
            print(f"  {f.kind.upper()} seed {f.seed} ({f.error}): {first[:300]}")
        bad += len(tally.failures)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
