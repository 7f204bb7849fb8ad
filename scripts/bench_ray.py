"""Throughput of the digits model explained in-process and on a local Ray cluster.

    python scripts/bench_ray.py [--rows 100000] [--batch-size 256] [--repeat 3] [--json FILE]

The digits model (``models/digits_cnn.onnx``) compiled with EpsilonPlus explains ``--rows``
rows (the ten shipped samples, tiled): in-process with ``run_compiled`` on one ONNX Runtime
session of 1 and of 2 intra-op threads, and with ``lrp_onnx.ray.explain_dataset`` on a local
Ray cluster of 2 CPUs with 1 actor (1 CPU) and 2 actors (1 CPU each), reading a
``ray.data.from_numpy`` dataset of 16 blocks and materialising the result in the object
store. Reported: images/s, best of ``--repeat`` runs; the Ray figure excludes the cluster's
start-up but includes each run's actor start-up and scheduling, so it depends on ``--rows``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def in_process(path: Path, x: np.ndarray, batch_size: int, threads: int, repeat: int) -> float:
    from lrp_onnx.runtime import make_session, run_compiled

    session = make_session(path, device="cpu", threads=threads)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for i in range(0, len(x), batch_size):
            run_compiled(session, x[i:i + batch_size], None, "input", "logits", 10)
        best = min(best, time.perf_counter() - start)
    return len(x) / best


def on_ray(path: Path, x: np.ndarray, batch_size: int, actors: int, repeat: int) -> float:
    import ray

    from lrp_onnx.ray import explain_dataset

    best = float("inf")
    for _ in range(repeat):
        ds = ray.data.from_numpy(np.array_split(x, 16))  # 16 blocks, one column "data"
        start = time.perf_counter()
        explain_dataset(ds, path, column="data", batch_size=batch_size,
                        concurrency=actors).materialize()
        best = min(best, time.perf_counter() - start)
    return len(x) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    import ray

    from lrp_onnx import LRP, EpsilonPlus

    folder = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    path = folder / "digits.lrp.onnx"
    LRP(ROOT / "models" / "digits_cnn.onnx", EpsilonPlus()).save(path)
    samples = np.load(ROOT / "models" / "digits_samples.npy")
    x = np.ascontiguousarray(np.resize(samples, (args.rows, *samples.shape[1:])))
    rows = {f"in-process, {t} thread(s)": in_process(path, x, args.batch_size, t, args.repeat)
            for t in (1, 2)}
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             logging_level=logging.ERROR, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    for actors in (1, 2):
        rows[f"Ray, {actors} actor(s) x 1 CPU"] = on_ray(path, x, args.batch_size, actors,
                                                        args.repeat)
    ray.shutdown()
    print(f"{args.rows} rows, batch {args.batch_size}, {os.cpu_count()} CPUs, best of "
          f"{args.repeat}")
    for name, rate in rows.items():
        print(f"{name:<28} {rate:>9.0f} images/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "images_per_s": rows},
                                              indent=2))


if __name__ == "__main__":
    main()
