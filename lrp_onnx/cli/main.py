"""The ``lrp-onnx`` command line: ``convert``, ``show``, ``explain``, ``check``, ``evaluate``,
``export-web``, ``export-repo``.

Exit codes: 0 success, 1 the model, rules or input were refused or a check failed (a one-line
``error:`` message, no traceback, no partial file), 2 wrong usage (argparse's message), 3 an
internal error (a bug: one line, no traceback, no partial file).
Reading and preprocessing ``explain``'s inputs lives in :mod:`lrp_onnx.cli.inputs`, writing its
outputs in :mod:`lrp_onnx.cli.outputs`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lrp_onnx.cli.argtypes import in_range, number, positive_int
from lrp_onnx.cli.notes import Notes
from lrp_onnx.cli.outputs import (
    PROGRESS_MIN_SAMPLES,
    Progress,
    check_model_destination,
    check_out_dir,
    save_npy,
)
from lrp_onnx.errors import LRPError
from lrp_onnx.runtime import ort_errors

PROG = "lrp-onnx"
#: Heatmaps smaller than this (longer side, pixels) are upscaled by an integer factor.
AUTO_PNG_SIDE = 128


class CLIError(Exception):
    """A refused request, reported as one line with exit code 1."""


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, LRPError):
        return f"{exc.filename or ''}: {exc.strerror or exc}"
    return str(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _composite(args: argparse.Namespace) -> Any:
    from lrp_onnx.rules.presets import parse_composite
    from lrp_onnx.rules.rulefile import load_rules

    if getattr(args, "composite", None) and getattr(args, "rules", None):
        raise CLIError("give either --composite or --rules, not both")
    if getattr(args, "composite", None):
        return parse_composite(args.composite)
    if getattr(args, "rules", None):
        return load_rules(args.rules)
    return None


def _how(args: argparse.Namespace) -> str:
    return args.composite or (f"rules from {args.rules}" if args.rules else "ZeroRule everywhere")


def _require_cuda(device: str, provider: str) -> None:
    """``--device cuda`` forces the CUDA EP: refuse where ONNX Runtime fell back to the CPU."""
    import onnxruntime as ort

    from lrp_onnx.runtime import CUDA

    if device != "cuda" or provider == CUDA:
        return
    why = ("this onnxruntime has no CUDA execution provider (install onnxruntime-gpu)"
           if CUDA not in ort.get_available_providers()
           else "it could not start (no GPU, or CUDA 13 / cuDNN 9 not found)")
    raise CLIError(f"--device cuda: the CUDA execution provider is not available: {why}; "
                   "use --device auto or cpu")


def _quiet_ort(device: str) -> None:
    if device == "cuda":  # our one-line refusal replaces ORT's multi-line CUDA load errors
        import onnxruntime as ort

        ort.set_default_logger_severity(4)


# -- convert, show -----------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    from lrp_onnx.api import LRP
    from lrp_onnx.frontend.load import default_opset

    src, dest = Path(args.input), Path(args.output)
    check_model_destination(src, dest)
    if args.logit_seed and args.output_relevance:
        raise CLIError("--logit-seed is about the one-hot target seed; --output-relevance "
                       "seeds the given values as they are: give one of them")
    analyzer = LRP(src, _composite(args), normalize_output_relevance=not args.logit_seed,
                   output=args.output_name, per_layer=args.per_layer, opset=args.opset,
                   output_relevance=args.output_relevance, input=args.input_name,
                   embedding_relevance=args.relevance_embedding)
    try:
        analyzer.save(dest)
    except OSError as exc:
        raise CLIError(f"{dest}: cannot write ({exc.strerror or exc})") from None
    print(f"wrote {dest} ({len(analyzer.layers)} layers, {_how(args)}, "
          f"opset {default_opset(analyzer.model)})")
    if args.per_layer:
        print(f"per-layer relevance outputs ({len(analyzer.per_layer_outputs)}):")
        width = max((len(name) for name, _, _ in analyzer.per_layer_outputs), default=0)
        for name, index, summary in analyzer.per_layer_outputs:
            print(f"  {name:<{width}}  layer {index}: {summary}")
    return 0


# -- explain -----------------------------------------------------------------------------------
def _preprocess(args: argparse.Namespace) -> tuple[Any, str]:
    """The image preprocessing from ``--preprocess FILE`` and the options (which win), and the
    file to name in errors about it (none once an option overrides it)."""
    from lrp_onnx.cli.inputs import Preprocess, load_preprocess

    pre = Preprocess()
    if args.preprocess:
        pre = pre.updated(**load_preprocess(args.preprocess))
    options = dict(size=tuple(args.size) if args.size else None,
                   resize=False if args.no_resize else None, mode=args.mode, scale=args.scale,
                   mean=tuple(args.mean) if args.mean else None,
                   std=tuple(args.std) if args.std else None)
    given = any(v is not None for v in options.values())
    return pre.updated(**options), (args.preprocess or "") if not given else ""


def _open_session(model: Any, label: str, device: str) -> Any:
    """The ONNX Runtime session ``explain`` runs (``--device cuda`` refused where CUDA did not
    start); prints the provider."""
    from lrp_onnx.runtime import make_session

    _quiet_ort(device)
    try:
        session = make_session(model, device=device)
    except ort_errors() as exc:
        raise CLIError(f"{label}: onnxruntime cannot load the model: {_first_line(exc)}"
                       ) from None
    provider = session.get_providers()[0]
    _require_cuda(device, provider)
    print(f"execution provider: {provider}", flush=True)
    return session


def _write_sample(out: Path, sample: Any, rel: np.ndarray, x: np.ndarray,
                  image: np.ndarray | None, args: argparse.Namespace) -> int:
    """Write one sample's relevance (and heatmaps); returns the number of files written."""
    from lrp_onnx.cli.heatmap import heatmap, overlay, save_png

    pngs: list[tuple[Path, np.ndarray]] = []
    if rel.ndim in (2, 3):  # image-shaped: (C, H, W) or (H, W)
        try:
            heat = heatmap(rel, reduce=args.reduce, percentile=args.percentile, patch=args.patch)
            pngs.append((out / f"{sample.stem}.png", heat))
            if args.overlay:
                blended = overlay(heat, image if image is not None else x, alpha=args.alpha)
                pngs.append((out / f"{sample.stem}.overlay.png", blended))
        except ValueError as exc:
            raise CLIError(f"{sample.path}: {sample.label}: no heatmap: {exc}") from None
    files = [out / f"{sample.stem}.relevance.npy"] + [p for p, _ in pngs]
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_npy(rel[None], files[0])
        for path, rgb in pngs:
            scale = args.png_scale or max(1, -(-AUTO_PNG_SIDE // max(rgb.shape[:2])))
            save_png(rgb, path, scale=scale)
    except OSError as exc:
        where = exc.filename if exc.filename else out
        raise CLIError(f"{where}: cannot write ({exc.strerror or exc})") from None
    return len(files)


def cmd_explain(args: argparse.Namespace) -> int:
    from lrp_onnx.cli.compiled import CompiledIO, Seed, check_seed_options
    from lrp_onnx.cli.inputs import (
        ModelInput,
        batches,
        duplicate_stems,
        expand_inputs,
        plan_inputs,
    )
    from lrp_onnx.cli.ray_explain import explain_on_ray, refuse_ray_options
    from lrp_onnx.frontend.load import load_model
    from lrp_onnx.runtime import run_compiled

    if args.ray is not None:
        return explain_on_ray(args, _preprocess(args)[0], PROG)
    refuse_ray_options(args)
    model, label = load_model(args.model)
    io = CompiledIO.of(model, label, PROG)
    check_seed_options(io, label, args.target, args.output_relevance)
    if io.tokens:
        from lrp_onnx.cli.text import explain_tokens, read_tokens

        tokens = read_tokens(args, io, label)
        return explain_tokens(tokens, _open_session(model, label, args.device), io, args)
    if args.position is not None or args.vocab is not None:
        raise CLIError(f"--position and --vocab apply to a model compiled on token ids; "
                       f"{label} explains '{io.input}'")
    spec = ModelInput.of(model, io.input)
    pre, source = _preprocess(args)
    plan = plan_inputs(expand_inputs(args.inputs, recursive=args.recursive), spec, pre,
                       source=source)
    seeds = Seed(args.output_relevance, io.seed, len(plan.samples)) if io.seed else None
    out = Path(args.out) if args.out else None
    if out is not None:
        clash = duplicate_stems(plan.samples)
        if clash and clash[0] == clash[1]:
            raise CLIError(f"{clash[1].path}: given twice")
        if clash:
            raise CLIError(f"{clash[1].path}: would write the same files as {clash[0].path} "
                           f"({out / clash[1].stem}.*); rename one or explain them separately")
        check_out_dir(out)
    session = _open_session(model, label, args.device)
    runtime_errors = ort_errors()

    progress = Progress(len(plan.samples), args.progress)
    written = done = 0
    try:
        for batch in batches(plan, spec, args.batch_size, keep_images=args.overlay):
            n = len(batch.samples)
            seed = seeds.batch(done, n) if seeds is not None else None
            try:
                expl = run_compiled(session, batch.x, args.target, io.input, io.output,
                                    io.classes, output_relevance=seed)
            except runtime_errors as exc:
                raise CLIError(f"{label}: onnxruntime failed on {batch.samples[0].label}..."
                               f"{batch.samples[-1].label}: {_first_line(exc)}") from None
            scores = np.asarray(expl.output).reshape(n, -1)
            for i, sample in enumerate(batch.samples):
                rel = np.asarray(expl.relevance[i])
                t = int(expl.target[i])
                what = (f"output_relevance sum {float(seed[i].sum()):.4g}" if seed is not None
                        else f"target {t} (output {float(scores[i, t]):.4g})")
                progress.print(f"{sample.label}: {what}, relevance sum {float(rel.sum()):.4g}")
                if not np.isfinite(rel).all():
                    raise CLIError(f"{sample.path}: the relevance of {sample.label} is not "
                                   f"finite (NaN/Inf); nothing written for it; run '{PROG} "
                                   f"check' on the model")
                if out is not None:
                    written += _write_sample(out, sample, rel, batch.x[i], batch.images[i],
                                             args)
            progress.advance(n)
            done += n
    finally:
        progress.close()
    summary = f"explained {len(plan.samples)} sample(s)"
    print(summary + (f"; wrote {written} files to {out}" if out is not None else ""))
    return 0


# -- check -------------------------------------------------------------------------------------
_TAGS = {True: "PASS", False: "FAIL", None: "SKIP"}


def cmd_check(args: argparse.Namespace) -> int:
    from lrp_onnx.check import check_model

    try:
        _quiet_ort(args.device)
        try:
            report = check_model(args.model, _composite(args), samples=args.samples,
                                 seed=args.seed, device=args.device, output=args.output_name,
                                 output_relevance=args.output_relevance,
                                 input=args.input_name)
        except ort_errors() as exc:
            raise CLIError(f"{args.model}: onnxruntime cannot run the model: "
                           f"{_first_line(exc)}") from None
        _require_cuda(args.device, report.provider)
    except (LRPError, CLIError, OSError) as exc:
        if args.json:
            print(json.dumps({"label": str(args.model), "ok": False, "error": _message(exc),
                              "results": []}, indent=2, sort_keys=True))
        raise
    counts = {tag: sum(_TAGS[r.ok] == tag for r in report.results) for tag in _TAGS.values()}
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        what = ("compiled model, rules read from the file" if report.compiled_input
                else f"compiled with {_how(args)}")
        print(f"{report.label}: {what}; {report.samples} random samples (seed {report.seed}); "
              f"execution provider: {report.provider}")
        for r in report.results:
            print(f"{_TAGS[r.ok]} {r.name}: {r.detail}")
        print(f"{'OK' if report.ok else 'FAILED'}: {counts['PASS']} passed, {counts['FAIL']} "
              f"failed, {counts['SKIP']} skipped")
    if not report.ok:
        failed = [r.name for r in report.results if r.ok is False]
        raise CLIError(f"{report.label}: {len(failed)} check(s) failed: {', '.join(failed)}")
    return 0


# -- the parser --------------------------------------------------------------------------------
def _rules_options(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--composite", metavar="SPEC",
                       help="preset, e.g. EpsilonPlusFlat or 'EpsilonGammaBox(low=-3.0, "
                       "high=3.0)'; default: ZeroRule on every layer")
    group.add_argument("--rules", metavar="FILE",
                       help="a .toml or .json rule file spelling a Composite (see docs/cli.md)")
    p.add_argument("--output-name", metavar="NAME", help="graph output to explain (default: first)")
    p.add_argument("--input", dest="input_name", metavar="NAME",
                   help="graph input to explain: a float input, or token ids read by an "
                   "embedding (default: the token ids, else the only float input)")


def _seed_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-relevance", action="store_true",
                   help="seed with an 'output_relevance' input shaped like the explained output "
                   "instead of the one-hot 'target'")


def _device_option(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default=default,
                   help=f"execution provider (default: {default}); auto: CUDA when "
                   "onnxruntime-gpu finds a GPU, else CPU; cuda: CUDA or refuse")


def _explain_parser(sub: Any) -> None:
    from lrp_onnx.cli.heatmap import REDUCTIONS
    from lrp_onnx.cli.ray_explain import add_ray_options
    from lrp_onnx.cli.text import add_token_options

    p = sub.add_parser(
        "explain", help="run a compiled model on .npy arrays and images; write heatmaps",
        description="Run COMPILED on each input (.npy arrays, .png/.jpg/.jpeg images, or folders "
        "of them), in batches, and print the explained class and relevance sum per sample; "
        "with --out, write <stem>.relevance.npy and a <stem>.png heatmap per sample.")
    p.add_argument("model", metavar="COMPILED", help="model written by 'convert'")
    p.add_argument("inputs", metavar="INPUT", nargs="+",
                   help=".npy (one sample or a batch), .png/.jpg/.jpeg, or a folder of them")
    p.add_argument("--target", type=int, default=None, metavar="K",
                   help="class (a language model: token id) to explain (default: the "
                   "top-scoring one)")
    p.add_argument("--output-relevance", metavar="FILE.npy",
                   help="the seed of a model converted with --output-relevance: one sample's "
                   "(used for every sample) or one per sample")
    p.add_argument("--recursive", "-r", action="store_true",
                   help="also read the sub-folders of folder inputs")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N",
                   help="samples read and run at a time (default: 16); bounds memory")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help=f"progress bar on stderr (default: on a terminal, from "
                   f"{PROGRESS_MIN_SAMPLES} samples)")
    _device_option(p, "auto")
    g = p.add_argument_group("image preprocessing (.npy arrays are fed as they are)")
    sizing = g.add_mutually_exclusive_group()
    sizing.add_argument("--size", nargs=2, type=positive_int, metavar=("H", "W"),
                        help="resize images to H x W (default: the model's input size)")
    sizing.add_argument("--no-resize", action="store_true",
                        help="refuse images whose size differs from the model's")
    g.add_argument("--mode", choices=("L", "RGB"),
                   help="image mode (default: L for 1 input channel, RGB for 3)")
    g.add_argument("--scale", type=number, metavar="S",
                   help="multiply pixel values (0-255) by S first (default: 1/255)")
    g.add_argument("--mean", type=number, nargs="+", metavar="M",
                   help="subtract, per channel or one for all (default: 0)")
    g.add_argument("--std", type=number, nargs="+", metavar="S",
                   help="then divide by, per channel or one for all (default: 1)")
    g.add_argument("--preprocess", metavar="FILE.json",
                   help="a JSON object with keys size, resize, mode, scale, mean, std "
                   "(options given here win)")
    add_token_options(p)
    add_ray_options(p)
    g = p.add_argument_group("outputs")
    g.add_argument("--out", metavar="DIR",
                   help="write <stem>.relevance.npy and <stem>.png (token ids: <stem>.html) "
                   "per sample here")
    g.add_argument("--overlay", action="store_true",
                   help="also write <stem>.overlay.png: the heatmap blended over the input")
    g.add_argument("--alpha", type=in_range(0.0, 1.0), default=0.5,
                   help="heatmap weight in the overlay (default: 0.5)")
    g.add_argument("--reduce", choices=REDUCTIONS, default="sum",
                   help="how channels become one heatmap value (default: sum)")
    g.add_argument("--percentile", type=in_range(0.0, 100.0, open_low=True), default=99.5,
                   help="|relevance| percentile that maps to full colour (default: 99.5)")
    g.add_argument("--patch", type=positive_int, default=None, metavar="P",
                   help="sum the heatmap over P x P patches (a ViT's patch size, e.g. 16)")
    g.add_argument("--png-scale", type=positive_int, default=None, metavar="K",
                   help=f"draw each pixel as a K x K block (default: the smallest K that makes "
                   f"the longer side at least {AUTO_PNG_SIDE} pixels)")
    p.set_defaults(func=cmd_explain)


def cmd_show(args: argparse.Namespace) -> int:
    from lrp_onnx.cli.show import show

    print("\n".join(show(args.model, _composite(args), output=args.output_name,
                          input=args.input_name, flat=args.flat, blocks=args.blocks)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Compile LRP into ONNX models and run the compiled models.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {__import__('lrp_onnx').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="compile an ONNX model into one that also outputs relevance",
                       description="Write OUT: the model of IN plus a 'target' input and a "
                       "'relevance' output. IN is never modified; OUT is written atomically.")
    p.add_argument("input", metavar="IN", help="input .onnx model")
    p.add_argument("output", metavar="OUT", help="compiled .onnx model to write")
    _rules_options(p)
    p.add_argument("--logit-seed", action="store_true",
                   help="seed relevance with the target logit instead of 1")
    p.add_argument("--per-layer", action="store_true",
                   help="also output each layer's input relevance (relevance_in_<i>)")
    p.add_argument("--opset", type=int, metavar="N",
                   help="convert the model to this opset (16 or newer) before compiling")
    p.add_argument("--relevance-embedding", action="store_true",
                   help="token ids: also output relevance_embedding [N, T, D] (relevance is "
                   "its sum over the hidden axis)")
    _seed_option(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("show", help="print the layer tree and the rule each layer gets",
                       description="Print the nested layer structure (ChainTuple, ParallelTuple, "
                       "SkipConnectionTuple) with each layer's index, summary and rule.")
    p.add_argument("model", metavar="MODEL", help="input .onnx model")
    _rules_options(p)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--flat", action="store_true", help="one line per layer, no nesting")
    how.add_argument("--blocks", action="store_true",
                     help="one line per module path (a transformer block's attention, MLP, "
                     "norms): its layer kinds and their rules")
    p.set_defaults(func=cmd_show)

    _explain_parser(sub)
    from lrp_onnx.cli.evaluate import add_evaluate_parser

    add_evaluate_parser(sub)
    from lrp_onnx.cli.export_repo import add_export_repo_parser
    from lrp_onnx.cli.web import add_export_web_parser

    add_export_web_parser(sub)
    add_export_repo_parser(sub)

    p = sub.add_parser(
        "check", help="compile and verify a model on random inputs (for CI)",
        description="Compile MODEL (or read back the rules COMPILED was written with), run it "
        "on seeded random inputs and check: onnx.checker, original outputs unchanged, finite "
        "relevance, conservation where the rules conserve. Exit 1 on any failed check.")
    p.add_argument("model", metavar="MODEL|COMPILED", help="original or compiled .onnx model")
    _rules_options(p)
    p.add_argument("--json", action="store_true",
                   help="print a machine-readable JSON report on stdout")
    p.add_argument("--samples", type=positive_int, default=4, metavar="N",
                   help="random samples (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    _device_option(p, "cpu")
    _seed_option(p)
    p.set_defaults(func=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    source = args.input if args.func is cmd_convert else getattr(args, "model", None)
    notes = Notes(PROG, source if isinstance(source, str) else None).install()
    try:
        return int(args.func(args))
    except (LRPError, CLIError, OSError) as exc:
        message = " ".join(line.strip() for line in _message(exc).splitlines())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug of ours: one line, not a traceback
        text = " ".join(str(exc).split())[:300]
        print(f"{PROG}: internal error: {type(exc).__name__}: {text} (please report this with "
              f"the model)", file=sys.stderr)
        return 3
    finally:
        notes.remove()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
