"""GPU check: compiled models run with every node on the CUDA EP, agree with the CPU EP and Zennit.

    python scripts/gpu_check.py [--out DIR] [--models seed,vgg16,resnet50] [--bench]

For each model (exported from torchvision with random weights) and composite (ZeroRule
everywhere, EpsilonPlusFlat) it creates a CUDA session with ``session.disable_cpu_ep_fallback=1``
(any node ONNX Runtime would place on the CPU fails the session) and ``use_tf32=0``, and compares
the relevance of a batch of 4 with the CPU EP and, for EpsilonPlusFlat, with Zennit on the GPU
(TF32 off). ``--bench`` then runs ``scripts/bench.py`` on CUDA. Results go to stdout and
``DIR/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def strict_cuda_session(path: Path) -> Any:
    """The library's own strict CUDA configuration (``lrp_onnx.runtime.make_session``): CUDA EP
    only, ``use_tf32=0``, ``session.disable_cpu_ep_fallback=1``; the CPU test of it is
    ``tests/test_cuda_ep.py``."""
    from lrp_onnx.runtime import make_session

    return make_session(path, device="cuda", strict_device=True)


def placement_log(path: Path) -> list[str]:
    """Lines of ORT's verbose log that say which nodes went to the CPU (non-strict session)."""
    import os

    import onnxruntime as ort

    log = Path(tempfile.mkstemp(suffix=".log")[1])
    saved = os.dup(2)
    fd = os.open(log, os.O_WRONLY)
    os.dup2(fd, 2)
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 0
        ort.InferenceSession(str(path), opts, providers=["CUDAExecutionProvider",
                                                         "CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        return [f"non-strict session failed too: {exc}"]
    finally:
        os.dup2(saved, 2)
        os.close(fd)
    lines = log.read_text(errors="replace").splitlines()
    start = next((i for i, ln in enumerate(lines) if "VerifyEachNodeIsAssignedToAnEp" in ln), 0)
    keep = [ln for ln in lines[start:] if "graph_transformer" not in ln]
    return keep[:120]


def cpu_session(path: Path) -> Any:
    from lrp_onnx.runtime import make_session

    return make_session(path, device="cpu")


def runtime_checks(dev: str) -> list[dict[str, Any]]:
    """What users touch on the GPU: ``LRP.analyze`` (IO binding) and ``lrp-onnx explain``
    pick the CUDA EP and agree with a strict CUDA session; per-layer outputs stay on the GPU;
    ``check_model`` passes on the CUDA EP."""
    import subprocess

    import lrp_onnx as L
    from lrp_onnx.check import check_model

    rows: list[dict[str, Any]] = []
    models = ROOT / "models"
    cases = [("digits", models / "digits_cnn.onnx", models / "digits_samples.npy",
              L.EpsilonPlus()),
             ("seed", models / "seed_vgg.onnx", models / "seed_vgg_input.npy",
              L.EpsilonPlusFlat())]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, src, inputs, comp in cases:
            row: dict[str, Any] = {"runtime": name}
            try:
                x = np.load(inputs)
                x = x if x.ndim == 4 else x[None]
                analyzer = L.LRP(src, comp, per_layer=True)
                path = folder / f"{name}.lrp.onnx"
                analyzer.save(path)
                expl = analyzer.analyze(x, device="auto")
                row["analyze_provider"] = expl.provider
                sess = strict_cuda_session(path) if dev == "cuda" else cpu_session(path)
                row["per_layer_all_nodes_on_cuda"] = dev == "cuda"
                names = [o.name for o in sess.get_outputs()]
                outs = dict(zip(names, sess.run(None, {"input": x, "target": np.full(
                    len(x), -1, np.int64)})))
                diff = np.abs(outs["relevance"] - expl.relevance).max()
                row["analyze_vs_strict_max_abs_over_max"] = float(
                    diff / np.abs(outs["relevance"]).max())
                out_dir = folder / f"{name}_out"
                done = subprocess.run(
                    [sys.executable, "-m", "lrp_onnx.cli", "explain", str(path), str(inputs),
                     "--out", str(out_dir), "--device", dev], capture_output=True, text=True,
                    timeout=300)
                row["explain_rc"] = done.returncode
                row["explain_provider_line"] = next(
                    (ln for ln in done.stdout.splitlines() if ln.startswith("execution")),
                    done.stderr.strip()[-500:])
                row["explain_pngs"] = len(list(out_dir.glob("*.png")))
                report = check_model(src, comp, device=dev)
                row["check_ok"] = report.ok
                row["check_provider"] = report.provider
                row["check_results"] = [(r.name, r.ok) for r in report.results]
            except Exception as exc:  # noqa: BLE001 - report and go on
                row["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
                row["traceback"] = traceback.format_exc()[-3000:]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--models", default="seed,vgg16,resnet50")
    parser.add_argument("--device", default="cuda", help="cpu: dry run of this script")
    parser.add_argument("--bench", action="store_true")
    parser.add_argument("--bench-models", default="vgg16,resnet50")
    parser.add_argument("--bench-batches", default="1,64")
    args = parser.parse_args()
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - best effort, the session below says what failed
            pass
    import bench
    import zennit.torchvision as ztv
    from zennit.composites import EpsilonPlusFlat as ZEpsilonPlusFlat

    import lrp_onnx as L
    from lrp_onnx.testing.oracle import agreement

    info = bench.machine()
    info["providers"] = ort.get_available_providers()
    print("#", json.dumps(info))
    results: list[dict[str, Any]] = []
    dev = args.device
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models.split(","):
            src = bench.export_model(name, folder)
            shape = bench.MODELS[name][1]
            x = np.random.default_rng(1).standard_normal((4, *shape)).astype(np.float32)
            for comp in ("zero", "epsilon_plus_flat"):
                row: dict[str, Any] = {"model": name, "composite": comp}
                t0 = time.perf_counter()
                analyzer = L.LRP(src, None if comp == "zero" else L.EpsilonPlusFlat())
                row["compile_s"] = time.perf_counter() - t0
                path = folder / f"{name}.{comp}.onnx"
                analyzer.save(path)
                feeds = {"input": x, "target": np.full(4, -1, np.int64)}
                ref_out, ref_rel = cpu_session(path).run(None, feeds)
                try:
                    sess = strict_cuda_session(path) if dev == "cuda" else cpu_session(path)
                    row["providers"] = sess.get_providers()
                    row["all_nodes_on_cuda"] = dev == "cuda"
                    out, rel = sess.run(None, feeds)
                    row["targets_equal"] = bool((out.argmax(1) == ref_out.argmax(1)).all())
                    agree = agreement(rel, ref_rel)
                    row["cuda_vs_cpu_rel_l2_max"] = max(a for a, _ in agree)
                    row["cuda_vs_cpu_corr_min"] = min(c for _, c in agree)
                    if comp == "epsilon_plus_flat":
                        model = bench.torch_model(name).to(dev)
                        canon = bench.MODELS[name][2]
                        zc = ZEpsilonPlusFlat(canonizers=[getattr(ztv, canon)()] if canon else None)
                        target = ref_out.argmax(1)
                        zx = torch.from_numpy(x).to(dev)
                        from zennit.attribution import Gradient

                        onehot = torch.nn.functional.one_hot(torch.from_numpy(target).to(dev),
                                                             out.shape[1]).float()
                        with Gradient(model=model, composite=zc) as attributor:
                            _, zrel = attributor(zx, onehot)
                        zagree = agreement(rel, zrel.detach().cpu().numpy())
                        row["vs_zennit_rel_l2_max"] = max(a for a, _ in zagree)
                        row["vs_zennit_corr_min"] = min(c for _, c in zagree)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
                    row["traceback"] = traceback.format_exc()[-3000:]
                    if dev == "cuda":
                        row["placement_log"] = placement_log(path)
                results.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
    runtime = runtime_checks(dev)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps({"machine": info, "rows": results,
                                                        "runtime": runtime}, indent=2))
    if args.bench:
        bench.main(["--models", args.bench_models, "--batches", args.bench_batches,
                    "--devices", dev, "--repeat", "20", "--json",
                    str(out_dir / "bench_cuda.json")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
