"""The ``lrp-onnx`` command line.

Exit codes: 0 success, 1 the model or input was refused (a one-line ``error:`` message, no
traceback, no output file), 2 wrong usage (argparse's message).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LRPError

PROG = "lrp-onnx"


class CLIError(Exception):
    """A refused request, reported as one line with exit code 1."""


def _composite(args: argparse.Namespace) -> Any:
    from .composites import parse_composite
    from .rulefile import load_rules

    if getattr(args, "composite", None) and getattr(args, "rules", None):
        raise CLIError("give either --composite or --rules, not both")
    if getattr(args, "composite", None):
        return parse_composite(args.composite)
    if getattr(args, "rules", None):
        return load_rules(args.rules)
    return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return b.exists() and a.resolve() == b.resolve()
    except OSError:
        return False


def cmd_convert(args: argparse.Namespace) -> int:
    from .analyzer import LRP

    src, dest = Path(args.input), Path(args.output)
    if _same_file(src, dest):
        raise CLIError(f"{dest}: refusing to overwrite the input model; choose another OUT")
    if not dest.parent.exists():
        raise CLIError(f"{dest}: folder {dest.parent} does not exist")
    analyzer = LRP(src, _composite(args), normalize_output_relevance=not args.logit_seed,
                   output=args.output_name)
    analyzer.save(dest)
    how = args.composite or (f"rules from {args.rules}" if args.rules else "ZeroRule everywhere")
    print(f"wrote {dest} ({len(analyzer.layers)} layers, {how})")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .analyzer import assign_rules, prepare
    from .registry import resolve_entries

    prep = prepare(args.model, args.output_name)
    rules = assign_rules(prep, _composite(args))
    resolve_entries(prep.layers, rules, prep.label, prep.graph.opset, prep.graph.shape)
    width = max(len(str(prep.indices[la.index])) for la in prep.layers)

    def line(layer: Any) -> str:
        idx = str(prep.indices[layer.index])
        return f"{idx:<{width}}  {layer.summary} => {rules[layer.index]!r}"

    print(f"{prep.label}: {len(prep.layers)} layers")
    if args.flat:
        for layer in prep.layers:
            print("  " + line(layer))
    else:
        print("\n".join(prep.tree.map(lambda la: la).lines(line)))
    return 0


def _compiled_io(model: Any, label: str) -> tuple[str, str, int]:
    from .compiler import RELEVANCE, TARGET

    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if TARGET not in inputs or RELEVANCE not in outputs:
        raise CLIError(f"{label}: not a compiled model (no '{TARGET}' input / '{RELEVANCE}' "
                       f"output); run '{PROG} convert' first")
    record = {p.key: p.value for p in model.metadata_props}.get("lrp_onnx")
    info = json.loads(record) if record else {}
    data = [n for n in inputs if n != TARGET and n not in {t.name for t in model.graph.initializer}]
    out_name = info.get("explained_output", outputs[0])
    dims = {o.name: o for o in model.graph.output}[out_name].type.tensor_type.shape.dim
    classes = int(dims[-1].dim_value) if dims and dims[-1].HasField("dim_value") else 0
    return data[0], out_name, classes


def cmd_explain(args: argparse.Namespace) -> int:
    from .analyzer import run_compiled
    from .load import load_model
    from .runtime import make_session

    model, label = load_model(args.model)
    input_name, output_name, classes = _compiled_io(model, label)
    shape = [d.dim_value if d.HasField("dim_value") else None for d in
             {i.name: i for i in model.graph.input}[input_name].type.tensor_type.shape.dim]
    batches = []
    for path in args.inputs:
        p = Path(path)
        if p.suffix.lower() != ".npy":
            raise CLIError(f"{p}: only .npy inputs are supported")
        try:
            arr = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CLIError(f"{p}: cannot read ({exc})") from None
        if arr.ndim == len(shape) - 1:
            arr = arr[None]
        if arr.ndim != len(shape) or any(d is not None and d != a
                                         for d, a in zip(shape[1:], arr.shape[1:])):
            raise CLIError(f"{p}: array of shape {arr.shape} does not fit input "
                           f"'{input_name}' of shape {shape}")
        batches.append((p, arr.astype(np.float32, copy=False)))
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    session = make_session(model, device=args.device)
    print(f"execution provider: {session.get_providers()[0]}")
    for p, arr in batches:
        expl = run_compiled(session, arr, args.target, input_name, output_name, classes)
        for i in range(arr.shape[0]):
            score = float(np.asarray(expl.output).reshape(arr.shape[0], -1)[i, expl.target[i]])
            print(f"{p.name}[{i}]: target {int(expl.target[i])} (output {score:.4g}), "
                  f"relevance sum {float(expl.relevance[i].sum()):.4g}")
        if out_dir is not None:
            dest = out_dir / f"{p.stem}.relevance.npy"
            tmp = dest.with_name(f".{dest.name}.tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, expl.relevance)
            os.replace(tmp, dest)
            print(f"wrote {dest}")
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
    p.add_argument("--composite", metavar="SPEC",
                   help="preset, e.g. EpsilonPlusFlat or 'EpsilonGammaBox(low=-3.0, high=3.0)'; "
                   "default: ZeroRule on every layer")
    p.add_argument("--rules", metavar="FILE",
                   help="a .toml or .json rule file spelling a Composite (see docs/cli.md)")
    p.add_argument("--output-name", metavar="NAME", help="graph output to explain (default: first)")
    p.add_argument("--logit-seed", action="store_true",
                   help="seed relevance with the target logit instead of 1")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("show", help="print the layer tree and the rule each layer gets",
                       description="Print the nested layer structure (ChainTuple, ParallelTuple, "
                       "SkipConnectionTuple) with each layer's index, summary and rule.")
    p.add_argument("model", metavar="MODEL", help="input .onnx model")
    p.add_argument("--composite", metavar="SPEC", help="preset name (see convert)")
    p.add_argument("--rules", metavar="FILE", help="a .toml or .json rule file")
    p.add_argument("--flat", action="store_true", help="one line per layer, no nesting")
    p.add_argument("--output-name", metavar="NAME", help="graph output to explain")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("explain", help="run a compiled model on .npy inputs",
                       description="Run COMPILED on each .npy input (one sample or a batch) and "
                       "print the explained class and relevance sum per sample.")
    p.add_argument("model", metavar="COMPILED", help="model written by 'convert'")
    p.add_argument("inputs", metavar="INPUT", nargs="+", help=".npy arrays")
    p.add_argument("--target", type=int, default=None,
                   help="class to explain (default: the top-scoring class)")
    p.add_argument("--out", metavar="DIR", help="write <input>.relevance.npy files here")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.set_defaults(func=cmd_explain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (LRPError, CLIError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
