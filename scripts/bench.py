"""Benchmark compiled LRP against the ORT forward pass and Zennit/LXT, side by side in one run.

    python scripts/bench.py [--models vgg16,resnet50,vit_b_16,bert_base,gpt2_small]
                            [--batches 1,8]
                            [--devices cpu,cuda] [--composites zero,epsilon_plus_flat]
                            [--threads 2] [--repeat 10] [--rounds 3] [--json out.json] [--smoke]

For every model x device x batch x composite it reports ORT forward ms (the original model),
compiled LRP ms (one call: forward + relevance), their ratio, the reference implementation's ms
(CNNs: Zennit's EpsilonPlusFlat; ViTs: LXT 2.1's CP-LRP map and its AttnLRP attention for the
``cplrp``/``attnlrp`` composites; registration done once, outside the timed loop; one forward
and one backward per call, the target taken from that forward's output), the reference /
compiled speed-up, the compile time and the compiler's peak RSS (measured in a child process)
next to the model's size. CUDA timings bind inputs and outputs on the device (IO binding), so
neither side pays host copies. ``vit_b_16`` is torchvision's ViT-B/16 with every parameter
random (torchvision zero-initialises the head), exported by the legacy exporter at opset 17.
``bert_base`` and ``gpt2_small`` are BERT-base and GPT-2-small sized random-weight HF models
(``lrp_onnx.testing.text_models``) on 128 token ids (mask all ones), the LM explained at its last
position; their reference is LXT 2.1's AttnLRP map (``attnlrp`` row only).

Timing runs in ``--rounds`` rounds of adjacent blocks (forward, each compiled model, Zennit;
each block the median of ``--repeat`` runs after 2 warm-up runs): ratios are taken within a
round, then the median over rounds is reported, because the shared 2-core machine drifts by up to
20-40% between blocks a few seconds apart. ``--smoke`` runs the seed model for a few iterations
(CI uses it; no timing is asserted anywhere).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = {  # name: (torchvision builder or None, input shape, zennit canonizer)
    "seed": (None, (3, 32, 32), None),
    "vgg16": ("vgg16", (3, 224, 224), "VGGCanonizer"),
    "resnet18": ("resnet18", (3, 224, 224), "ResNetCanonizer"),
    "resnet50": ("resnet50", (3, 224, 224), "ResNetCanonizer"),
    "vit_b_16": ("vit_b_16", (3, 224, 224), None),
    "vit_tiny": ("vit_tiny", (3, 224, 224), None),  # 2 layers, width 192 (the tests' ViT)
    # text models: token ids [N, T] (input shape (T,)); LMs explained at the last position
    "bert_base": ("bert", (128,), None),
    "gpt2_small": ("gpt2", (128,), None),
    "bert_tiny": ("bert", (16,), None),  # the tests' sizes (2 layers, width 32)
    "gpt2_tiny": ("gpt2", (16,), None),
}
#: text model name: its ``text_model_sizes`` entry (None: the tests' tiny config)
TEXT_SIZES = {"bert_base": "bert-base", "gpt2_small": "gpt2-small", "bert_tiny": None,
              "gpt2_tiny": None}
COMPOSITES = ("zero", "epsilon_plus_flat")
VIT_COMPOSITES = ("cplrp", "attnlrp")


def is_vit(name: str) -> bool:
    return name.startswith("vit")


def is_text(name: str) -> bool:
    return name in TEXT_SIZES


def is_transformer(name: str) -> bool:
    """Compared with LXT (ViTs, text models), not Zennit."""
    return is_vit(name) or is_text(name)


def torch_model(name: str) -> Any:
    import torch

    torch.manual_seed(0)
    if name == "seed":
        from lrp_onnx.testing.oracle import seed_vgg

        return seed_vgg(0)
    if is_text(name):  # every parameter random (lrp_onnx.testing.text_models)
        from lrp_onnx.testing.text_models import text_model_sizes, tiny_text_model

        sizes = TEXT_SIZES[name]
        return tiny_text_model(MODELS[name][0], 0, **(text_model_sizes[sizes] if sizes else {}))
    if is_vit(name):  # every parameter random
        from lrp_onnx.testing.transformers import tiny_vit

        if name == "vit_tiny":
            return tiny_vit(0)
        return tiny_vit(0, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072,
                        num_classes=1000)  # ViT-B/16's shape
    import torchvision

    return getattr(torchvision.models, MODELS[name][0])(weights=None).eval()


def export_model(name: str, folder: Path) -> Path:
    import torch

    from lrp_onnx.testing.oracle import export

    if name == "seed":
        return ROOT / "models" / "seed_vgg.onnx"
    path = folder / f"{name}.onnx"
    if path.exists():
        return path
    if is_text(name):
        from lrp_onnx.testing.text_models import export_text

        export_text(torch_model(name), path, exporter="legacy", opset=17)
    elif is_vit(name):
        from lrp_onnx.testing.transformers import export_vit

        export_vit(torch_model(name), path, exporter="legacy", opset=17)
    else:
        export(torch_model(name), path, torch.zeros(1, *MODELS[name][1]))
    return path


def _compile_child(src: str, dest: str, composite: str, queue: Any) -> None:
    import lrp_onnx as L

    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    comp = {"zero": None, "epsilon_plus_flat": L.EpsilonPlusFlat(), "cplrp": L.CPLRP(),
            "attnlrp": L.AttnLRP()}[composite]
    analyzer = L.LRP(src, comp)
    seconds = time.perf_counter() - t0
    analyzer.save(dest)
    peak = _status_mb("VmHWM")
    queue.put({"compile_s": seconds, "peak_rss_mb": peak - base, "base_rss_mb": base})


def _status_mb(key: str) -> float:
    """``VmRSS``/``VmHWM`` of this process in MB. (``ru_maxrss`` is not used: Linux carries it
    over from the parent through fork and exec, so a child would report the parent's peak.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def compile_measured(src: Path, dest: Path, composite: str) -> dict[str, float]:
    """Compile in a fresh process: wall time and peak RSS (ru_maxrss) of that process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_compile_child, args=(str(src), str(dest), composite, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def session(path: Path, device: str, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" \
        else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(str(path), opts, providers=providers)
    if sess.get_providers()[0] != providers[0]:
        raise RuntimeError(f"{device} requested but session runs on {sess.get_providers()}")
    return sess


def timed(fn: Any, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def model_inputs(name: str, n: int) -> dict[str, np.ndarray]:
    """The inputs of one batch: images ``input``, or token ids with an all-ones mask."""
    rng = np.random.default_rng(0)
    if not is_text(name):
        return {"input": rng.standard_normal((n, *MODELS[name][1])).astype(np.float32)}
    vocab = torch_vocab(name)
    ids = rng.integers(0, vocab, (n, *MODELS[name][1]), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def torch_vocab(name: str) -> int:
    from lrp_onnx.testing.text_models import text_model_sizes

    sizes = TEXT_SIZES[name]
    return int(text_model_sizes[sizes]["vocab_size"]) if sizes else 100


def ort_runner(sess: Any, inputs: dict[str, np.ndarray], device: str, compiled: bool) -> Any:
    import onnxruntime as ort

    n = len(next(iter(inputs.values())))
    names = [i.name for i in sess.get_inputs()]
    feeds: dict[str, Any] = {k: v for k, v in inputs.items() if k in names}
    if compiled:  # the top class, at the last position of a sequence output
        for seed in ("target", "target_position"):
            if seed in names:
                feeds[seed] = np.full(n, -1, dtype=np.int64)
    if device == "cpu":
        return lambda: sess.run(None, feeds)
    io = sess.io_binding()
    for name, value in feeds.items():
        io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for out in sess.get_outputs():
        io.bind_output(out.name, "cuda")
    return lambda: sess.run_with_iobinding(io)


def zennit_runner(name: str, x: np.ndarray, device: str) -> Any:
    import torch
    import zennit.torchvision as ztv
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat

    model = torch_model(name).to(device)
    canon = MODELS[name][2]
    composite = EpsilonPlusFlat(canonizers=[getattr(ztv, canon)()] if canon else None)
    xt = torch.from_numpy(x).to(device)
    attributor = Gradient(model, composite)
    attributor.__enter__()

    def target(out: Any) -> Any:  # one-hot at the argmax, from the attributor's own forward
        return torch.nn.functional.one_hot(out.argmax(1), out.shape[1]).to(out.dtype)

    def run() -> None:
        attributor(xt, target)
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def lxt_runner(name: str, x: np.ndarray, device: str, mode: str) -> Any:
    """LXT 2.1 on the same ViT: its torchvision map (CP-LRP), or with the AttnLRP attention
    (``lrp_onnx.testing.transformers``). LXT patches classes process-wide: every model is
    exported before the first call, and each run sets the attention forward of its mode."""
    import torch
    import torchvision
    from lxt.efficient import monkey_patch

    from lrp_onnx.testing.transformers import _attnlrp_mha_forward

    mha = torch.nn.MultiheadAttention
    if not hasattr(mha, "_lrp_onnx_cp_forward"):
        monkey_patch(torchvision.models.vision_transformer)
        mha._lrp_onnx_cp_forward = mha.forward  # type: ignore[attr-defined]
    forward = _attnlrp_mha_forward if mode == "attnlrp" else mha._lrp_onnx_cp_forward
    model = torch_model(name).to(device)
    xt = torch.from_numpy(x).to(device)

    def run() -> None:
        mha.forward = forward  # type: ignore[method-assign]
        inp = xt.clone().requires_grad_()
        out = model(inp)
        out[torch.arange(len(out)), out.argmax(1)].sum().backward()
        (inp * inp.grad).detach()
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def lxt_text_runner(name: str, inputs: dict[str, np.ndarray], device: str) -> Any:
    """LXT 2.1's AttnLRP map on the same text model (built after patching: LXT replaces BERT's
    modules), explained at the last position of an LM. Its cp map cannot be applied on top in
    the same process (``lrp_onnx.testing.text_models``), so only AttnLRP is compared."""
    import importlib

    import torch
    from lxt.efficient import monkey_patch

    kind = MODELS[name][0]
    module = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    maps = importlib.import_module(f"lxt.efficient.models.{kind}")
    if not getattr(module, "_lrp_onnx_patched", False):
        with warnings.catch_warnings():  # torch's LayerNorm/Dropout: patched by an earlier map
            warnings.simplefilter("ignore")
            monkey_patch(module, maps.attnLRP)
        module._lrp_onnx_patched = True
    model = torch_model(name).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.from_numpy(inputs["input_ids"]).to(device)
    mask = torch.from_numpy(inputs["attention_mask"]).to(device)
    extra = {} if kind == "bert" else {"use_cache": False}

    def run() -> None:
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=emb, attention_mask=mask, **extra).logits
        out = out if kind == "bert" else out[:, -1]
        out[torch.arange(len(out)), out.argmax(1)].sum().backward()
        (emb * emb.grad).sum(-1).detach()
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def reference_runners(name: str, inputs: dict[str, np.ndarray], device: str,
                      composites: list[str]) -> dict[str, Any]:
    """The reference implementation per composite it is compared with."""
    if is_text(name):
        return {"attnlrp": lxt_text_runner(name, inputs, device)} if "attnlrp" in composites \
            else {}
    x = inputs["input"]
    if is_vit(name):
        return {c: lxt_runner(name, x, device, c) for c in composites if c in VIT_COMPOSITES}
    if "epsilon_plus_flat" in composites:
        return {"epsilon_plus_flat": zennit_runner(name, x, device)}
    return {}


def machine() -> dict[str, Any]:
    import onnxruntime as ort

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpus": os.cpu_count(), "onnxruntime": ort.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("zennit", "lxt", "transformers"):  # no __version__: ask the distribution
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16,resnet50")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--devices", default="cpu")
    parser.add_argument("--composites", default=None,
                        help=f"default: {','.join(COMPOSITES)}; ViTs: {','.join(VIT_COMPOSITES)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per block")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of adjacent forward / compiled / Zennit blocks")
    parser.add_argument("--no-zennit", "--no-reference", action="store_true",
                        help="time no Zennit/LXT reference")
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="seed model, batch 1, 2 repeats")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.batches, args.repeat, args.rounds = "seed", "1", 2, 1
    import torch

    torch.set_num_threads(args.threads)
    info = machine()
    print("# " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"# threads={args.threads} repeat={args.repeat} rounds={args.rounds} (ms: median over "
          "rounds of each block's median after 2 warm-up runs; ratio and speed-up: median over "
          "rounds of the ratio within a round)")
    rows: list[dict[str, Any]] = []
    header = (f"{'model':<9} {'dev':<4} {'N':>3} {'composite':<18} {'fwd ms':>8} {'lrp ms':>8} "
              f"{'ratio':>6} {'ref ms':>9} {'speedup':>7} {'compile s':>9} {'RSS/size':>8}")
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # Export and compile every model first: LXT's patches (ViT references) are process-wide
        # and would change what torch exports.
        prepared = []
        for name in args.models.split(","):
            src = export_model(name, folder)
            comps = (args.composites or ",".join(VIT_COMPOSITES if is_transformer(name)
                                                 else COMPOSITES)).split(",")
            compiled: dict[str, tuple[Path, dict[str, float]]] = {}
            for comp in comps:
                dest = folder / f"{name}.{comp}.lrp.onnx"
                compiled[comp] = (dest, compile_measured(src, dest, comp))
            prepared.append((name, src, compiled))
        for name, src, compiled in prepared:
            size_mb = src.stat().st_size / 2**20
            for device in args.devices.split(","):
                fwd_sess = session(src, device, args.threads)
                lrp_sess = {c: session(p, device, args.threads) for c, (p, _) in compiled.items()}
                for n in (int(b) for b in args.batches.split(",")):
                    inputs = model_inputs(name, n)
                    fwd_run = ort_runner(fwd_sess, inputs, device, False)
                    lrp_run = {c: ort_runner(s, inputs, device, True)
                               for c, s in lrp_sess.items()}
                    ref_run = {} if args.no_zennit else reference_runners(name, inputs, device,
                                                                          list(compiled))
                    # Rounds of adjacent blocks: forward, each compiled model, each reference.
                    # A ratio is taken within a round (the shared machine's speed drifts between
                    # rounds by up to 20%), then the median over rounds is reported.
                    fwds: list[float] = []
                    lrps: dict[str, list[float]] = {c: [] for c in compiled}
                    refs: dict[str, list[float]] = {c: [] for c in ref_run}
                    for _ in range(args.rounds):
                        fwds.append(timed(fwd_run, args.repeat))
                        for comp in compiled:
                            lrps[comp].append(timed(lrp_run[comp], args.repeat))
                        for comp, run in ref_run.items():
                            refs[comp].append(timed(run, max(3, args.repeat // 2)))
                    fwd = statistics.median(fwds)
                    for comp, (_, cinfo) in compiled.items():
                        lrp = statistics.median(lrps[comp])
                        ratio = statistics.median(t / f for t, f in zip(lrps[comp], fwds))
                        # a CNN has one reference (Zennit's EpsilonPlusFlat): every composite
                        # is compared with it; a ViT composite with LXT's own mode
                        zens = refs.get(comp) or (next(iter(refs.values())) if len(refs) == 1
                                                  and not is_transformer(name) else [])
                        zen = statistics.median(zens) if zens else None
                        speedup = statistics.median(z / t for z, t in zip(zens, lrps[comp])) \
                            if zens else None
                        row = {"model": name, "device": device, "batch": n, "composite": comp,
                               "forward_ms": fwd, "lrp_ms": lrp, "ratio": ratio,
                               "reference": ("lxt" if is_transformer(name) else
                                             "zennit_epsilon_plus_flat") if zens else None,
                               "reference_ms": zen, "reference_speedup": speedup,
                               "rounds": {"forward_ms": fwds, "lrp_ms": lrps[comp],
                                          "reference_ms": zens},
                               "compile_s": cinfo["compile_s"],
                               "peak_rss_mb": cinfo["peak_rss_mb"], "model_mb": size_mb}
                        rows.append(row)
                        zs = f"{zen:9.1f}" if zen else f"{'-':>9}"
                        sp = f"{speedup:7.1f}" if speedup and comp in refs else f"{'-':>7}"
                        print(f"{name:<9} {device:<4} {n:>3} {comp:<18} {fwd:8.2f} {lrp:8.2f} "
                              f"{ratio:6.2f} {zs} {sp} {cinfo['compile_s']:9.2f} "
                              f"{cinfo['peak_rss_mb'] / size_mb:8.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args),
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
