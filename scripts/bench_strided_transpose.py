"""Micro-benchmark: ORT's ConvTranspose vs a polyphase Conv + DepthToSpace for the strided
convolutions of ResNet-50 (docs/performance.md, "Tried and measured not to help").

    python scripts/bench_strided_transpose.py [--threads 2]

The polyphase form writes the transpose of a stride-s convolution as one stride-1 ``Conv`` over
the relevance map whose output channels stack the kernel's s x s phases, followed by
``DepthToSpace`` (and a crop). It prints both times, their ratio and the largest difference.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import onnxruntime as ort
from bench import timed
from onnx import TensorProto, helper, numpy_helper


def _session(nodes: list[Any], inits: dict[str, np.ndarray], inp: list[int],
             out: list[int], threads: int) -> Any:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("r", TensorProto.FLOAT, inp)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def polyphase_kernel(w: np.ndarray, s: int, p: int) -> tuple[np.ndarray, int, int]:
    """``(kernel, span, left pad)`` of the stride-1 Conv whose output channels, ordered
    ``(cin, phase_h, phase_w)`` for ``DepthToSpace(mode="CRD")``, are the transpose's phases.

    Output pixel ``o = q*s + ph`` gathers kernel taps ``kk = kk0 + j*s`` (``kk0 = (ph+p) % s``)
    from relevance pixels ``i = q + d_ph - j`` with ``d_ph = (ph + p - kk0) // s``.
    """
    cout, cin, k, _ = w.shape
    taps = max(len(range((ph + p) % s, k, s)) for ph in range(s))
    ds = [(ph + p - (ph + p) % s) // s for ph in range(s)]
    left = max(taps - 1 - d for d in ds)
    span = taps + max(ds) - min(ds)
    wc = np.zeros((s, s, cin, cout, span, span), np.float32)
    for ph in range(s):
        for pw in range(s):
            for j in range(taps):
                kh = (ph + p) % s + j * s
                for jw in range(taps):
                    kw = (pw + p) % s + jw * s
                    if kh < k and kw < k:
                        wc[ph, pw, :, :, left + ds[ph] - j, left + ds[pw] - jw] = w[:, :, kh, kw].T
    return wc.transpose(2, 0, 1, 3, 4, 5).reshape(cin * s * s, cout, span, span), span, left


def case(cin: int, cout: int, k: int, s: int, p: int, hin: int, batch: int,
         threads: int) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
    hout = (hin + 2 * p - k) // s + 1
    pad_out = hin - ((hout - 1) * s - 2 * p + k)
    r = rng.standard_normal((batch, cout, hout, hout)).astype(np.float32)
    shape_in, shape_out = [batch, cout, hout, hout], [batch, cin, hin, hin]
    conv_t = _session([helper.make_node("ConvTranspose", ["r", "W"], ["y"], kernel_shape=[k, k],
                                        strides=[s, s], pads=[p] * 4,
                                        output_padding=[pad_out, pad_out])],
                      {"W": w}, shape_in, shape_out, threads)
    kernel, span, left = polyphase_kernel(w, s, p)
    hq = -(-hin // s)
    right = max((hq - 1) + span - left - hout, 0)
    nodes = [helper.make_node("Conv", ["r", "Wp"], ["c"], kernel_shape=[span, span],
                              pads=[left, left, right, right]),
             helper.make_node("DepthToSpace", ["c"], ["d"], blocksize=s, mode="CRD")]
    inits: dict[str, np.ndarray] = {"Wp": kernel}
    if hq * s != hin:
        nodes.append(helper.make_node("Slice", ["d", "st", "en", "ax"], ["y"]))
        inits.update(st=np.array([0, 0], np.int64), en=np.array([hin, hin], np.int64),
                     ax=np.array([2, 3], np.int64))
    else:
        nodes[-1].output[0] = "y"
    poly = _session(nodes, inits, shape_in, shape_out, threads)
    ya, yb = conv_t.run(None, {"r": r})[0], poly.run(None, {"r": r})[0]
    err = float(np.abs(ya - yb).max() / np.abs(ya).max())
    ta = timed(lambda: conv_t.run(None, {"r": r}), 30, warmup=3)
    tb = timed(lambda: poly.run(None, {"r": r}), 30, warmup=3)
    print(f"{cin}<-{cout} k{k} s{s} p{p} {hin}x{hin} batch {batch}: ConvTranspose {ta:.2f} ms, "
          f"polyphase {tb:.2f} ms, ratio {ta / tb:.2f}, max rel diff {err:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for batch in (1, 8):
        for spec in ((3, 64, 7, 2, 3, 224), (128, 128, 3, 2, 1, 56), (256, 256, 3, 2, 1, 28),
                     (512, 512, 3, 2, 1, 14), (256, 512, 1, 2, 0, 56), (512, 1024, 1, 2, 0, 28),
                     (1024, 2048, 1, 2, 0, 14)):
            case(*spec, batch, args.threads)


if __name__ == "__main__":
    main()
