"""``lrp-onnx evaluate``: rank attribution methods on a model's own data (the parser and the
command; the metrics live in :mod:`lrp_onnx.evaluation`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from lrp_onnx.cli.argtypes import positive_int
from lrp_onnx.cli.outputs import Progress, check_model_destination, save_bytes
from lrp_onnx.errors import InvalidInput
from lrp_onnx.evaluation.perturbation import METRICS, REPLACEMENTS


def _read(path: str, what: str) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise InvalidInput(f"{path}: not a readable .npy array ({str(exc).splitlines()[0]})"
                           ) from None
    if not isinstance(arr, np.ndarray) or not (np.issubdtype(arr.dtype, np.floating)
                                               or np.issubdtype(arr.dtype, np.integer)):
        raise InvalidInput(f"{path}: {what} must be a .npy array of real numbers")
    return arr


RANKED_BY = {"aopc": "AOPC MoRF (higher is better)", "srg": "SRG (higher is better)",
             "accuracy_morf_mean": "ROAD's MoRF accuracy (lower is better)"}


def _settings_line(settings: dict[str, Any]) -> str:
    p = settings["patch"]
    what = "pixel" if p == 1 else f"{p}x{p} region"
    return (f"{settings['model']}: {settings['metric']}, {settings['replacement']} replacement, "
            f"{settings['steps']} steps over {settings['features']} {what}s, seed "
            f"{settings['seed']}, {settings['samples']} samples; {settings['score']}; "
            f"ranked by {RANKED_BY[settings['ranked_by']]}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lrp_onnx.evaluation import evaluate

    outputs = [Path(p) for p in (args.json, args.plot) if p]
    for dest in outputs:
        check_model_destination(Path(args.model), dest)
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise InvalidInput(f"{args.plot}: --plot writes a .png file")
    x = _read(args.data, "data")
    labels = _read(args.labels, "labels")
    if labels.ndim != 1 or len(labels) != len(x) or not np.issubdtype(labels.dtype,
                                                                       np.integer):
        raise InvalidInput(f"{args.labels}: expected {len(x)} integer labels (one per sample "
                           f"of {args.data}), got {labels.dtype} {list(labels.shape)}")
    progress = Progress(len(x) * len(args.method), args.progress)
    try:
        result = evaluate(args.model, x, labels, args.method, metric=args.metric,
                          replacement=args.replacement, steps=args.steps, patch=args.patch,
                          seed=args.seed, batch_size=args.batch_size, device=args.device,
                          progress=lambda done, total: _advance(progress, done, total))
    finally:
        progress.close()
    print(_settings_line(result.settings))
    print(result.table())
    files: list[tuple[Path, bytes]] = []
    if args.json:
        text = json.dumps(result.as_dict(), indent=2) + "\n"
        files.append((Path(args.json), text.encode()))
    if args.plot:
        from lrp_onnx.cli.plot import plot_curves

        title = f"{result.settings['metric']}, {result.settings['replacement']} replacement"
        files.append((Path(args.plot), plot_curves(result.results, title)))
    written: list[Path] = []
    try:
        for path, data in files:
            save_bytes(data, path)
            written.append(path)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        raise InvalidInput(f"{exc.filename or path}: cannot write ({exc.strerror or exc})"
                           ) from None
    for path, _ in files:
        print(f"wrote {path}")
    return 0


def _advance(progress: Progress, done: int, total: int) -> None:
    progress.total = total
    progress.advance(done - progress.done)


def add_evaluate_parser(sub: Any) -> None:
    """Register ``evaluate`` on the ``lrp-onnx`` sub-command parsers."""
    p = sub.add_parser(
        "evaluate", help="rank attribution methods by perturbation on your data",
        description="Compile each METHOD into ONNX, explain every sample of DATA for its label, "
        "perturb the samples in the order of relevance (most relevant first: MoRF; least: "
        "LeRF) and print each method's AOPC and SRG, best first. See docs/evaluation.md.")
    p.add_argument("model", metavar="MODEL", help="the original .onnx model")
    p.add_argument("data", metavar="DATA", help=".npy array of samples [N, C, H, W]")
    p.add_argument("--labels", required=True, metavar="LABELS.npy",
                   help=".npy array of N integer labels: the class explained and scored")
    p.add_argument("--method", action="append", required=True, metavar="SPEC",
                   help="a preset as --composite takes it, a rule file, or Gradient, "
                   "GradientXInput, 'IntegratedGradients(steps=32)', Random (repeatable)")
    p.add_argument("--metric", choices=METRICS, default="pixel-flipping",
                   help="default: pixel-flipping")
    p.add_argument("--replacement", choices=REPLACEMENTS, default=None,
                   help="value of a replaced pixel (default: noise, uniform in the data's "
                   "range; ROAD imputes)")
    p.add_argument("--steps", type=positive_int, default=None, metavar="K",
                   help="perturbation steps (default: min(features, 64); road: 9)")
    p.add_argument("--patch", type=positive_int, default=None, metavar="P",
                   help="side of a region-perturbation square (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--batch-size", type=positive_int, default=256, metavar="N",
                   help="samples per ONNX Runtime run (default: 256)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="cpu",
                   help="execution provider (default: cpu)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: on a terminal)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the perturbation curves")
    p.set_defaults(func=cmd_evaluate)
