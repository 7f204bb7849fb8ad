"""Where a compiled model's time goes: ONNX Runtime's profiler, per op type and per emitted tag.

    python scripts/profile_lrp.py MODEL.onnx [--composite zero|epsilon_plus_flat] [--batch 1]
                                  [--threads 2] [--runs 8] [--json out.json]

Compiles ``MODEL.onnx``, runs it ``--runs`` times under the profiler (the first 3 runs are
dropped: they include the memory arena's growth, which the profiler books to whichever kernel
first touches new memory) and prints, per op type and per ``(op, tag)`` (``(fwd)`` for the
model's own nodes, the last part of the emitted node's name otherwise), the median kernel time.

The last line is the *convolution floor*: the kernel time of every Conv/ConvTranspose/Gemm/
MatMul of the compiled model (forward, modified forward, transposes) over the original model's
forward time in the same process. No graph that computes the same convolutions on the same
kernels can have a lower LRP / forward ratio; everything above it is elementwise ops, pooling
routes and layout reorders.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import timed  # noqa: E402 (scripts/ is on sys.path when run as a script)

_CONV_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm",
             "FusedMatMul", "NchwcConv")


def _profiled_session(path: str, threads: int, profile_prefix: str) -> Any:
    """A CPU session like ``lrp_onnx.runtime.make_session``'s, with ORT's profiler on."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.enable_profiling = True
    opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--composite", default="zero", choices=("zero", "epsilon_plus_flat"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import lrp_onnx as L
    from lrp_onnx.runtime import make_session

    analyzer = L.LRP(args.model, None if args.composite == "zero" else L.EpsilonPlusFlat())
    with tempfile.TemporaryDirectory() as tmp:
        dest = str(Path(tmp) / "compiled.onnx")
        analyzer.save(dest)
        fwd = make_session(args.model, device="cpu", threads=args.threads)
        shape = [d if isinstance(d, int) else args.batch for d in fwd.get_inputs()[0].shape]
        shape[0] = args.batch
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        feeds = {fwd.get_inputs()[0].name: x}
        fwd_ms = timed(lambda: fwd.run(None, feeds), args.runs)
        prof = _profiled_session(dest, args.threads, str(Path(tmp) / "profile"))
        lrp_feeds = dict(feeds, target=np.full(args.batch, -1, np.int64))
        for _ in range(3 + args.runs):
            prof.run(None, lrp_feeds)
        events = json.loads(Path(prof.end_profiling()).read_text())
    per_node: dict[str, list[float]] = collections.defaultdict(list)
    op_of: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            per_node[name].append(e["dur"] / 1e3)
            op_of[name] = e["args"].get("op_name", "?")
    by_op: collections.Counter[str] = collections.Counter()
    by_tag: collections.Counter[tuple[str, str]] = collections.Counter()
    for name, durations in per_node.items():
        ms = statistics.median(durations[3:] if len(durations) > 3 else durations)
        op = op_of[name]
        tag = name.rsplit("/", 1)[-1].rstrip("_0123456789") if name.startswith("lrp/") \
            else "(fwd)"
        by_op[op] += ms
        by_tag[(op, tag)] += ms
    total = sum(by_op.values())
    conv = sum(v for k, v in by_op.items() if k in _CONV_OPS)
    print(f"# {Path(args.model).name} {args.composite} batch {args.batch}, {args.threads} threads: "
          f"forward {fwd_ms:.2f} ms, compiled kernels {total:.2f} ms")
    for op, ms in by_op.most_common():
        print(f"{op:<24} {ms:8.2f} ms {100 * ms / total:5.1f}%")
    print("# by (op, tag)")
    for (op, tag), ms in by_tag.most_common(25):
        print(f"{op + ' ' + tag:<40} {ms:8.2f} ms {100 * ms / total:5.1f}%")
    print(f"# convolution floor: {conv:.2f} ms = {conv / fwd_ms:.2f}x forward "
          f"(all kernels: {total / fwd_ms:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "composite": args.composite, "batch": args.batch,
            "forward_ms": fwd_ms, "kernels_ms": total, "convolution_ms": conv,
            "by_op": dict(by_op), "by_tag": {f"{o} {t}": v for (o, t), v in by_tag.items()}},
            indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
