"""``check``: verify a model compiles and that its compiled form behaves (the CI export step).

:func:`check_model` takes an original model (compiled here with the given rules) or a model
``convert`` wrote (the rules it was compiled with are read back from its ``lrp_onnx`` metadata).
It runs the original and the compiled model on seeded random inputs and reports, each as a
:class:`CheckResult`:

* ``onnx_checker``: the compiled model passes ``onnx.checker`` and strict shape inference
  (``onnx.checker``'s full check, without copying the weights);
* ``outputs_unchanged``: the compiled model's original outputs equal the original model's;
* ``relevance_finite``: no NaN/Inf in the input relevance nor in any layer's relevance;
* ``recorded_rules`` (compiled input only): recompiling the original part with the rules
  recorded in the file gives the file's relevance (a stale or edited file fails);
* ``conservation_layers``: every layer whose rule conserves relevance on it (see
  :func:`conserving`) passes on what it receives, to ``CONSERVATION_TOL``;
* ``conservation_total``: the input relevance sums to the seed (1 per sample, the logit, or the
  sum of the ``output_relevance`` seed), checked when every layer conserves; otherwise reported
  and skipped.

A model compiled with ``output_relevance=True`` is run with a seeded random seed tensor
(uniform in [0, 1), shaped like the explained output); a model with several float inputs gets
random values for every one (the record names the explained one, or pass ``input``). A model
compiled on token ids gets random ids within its embedding's rows, all-ones masks and
``TOKENS`` positions where the sequence length is dynamic, explained at the last position.

Tolerances are float32's: outputs within ``OUTPUT_RTOL`` of the original's largest magnitude
(ONNX Runtime may fuse the forward nodes differently once they have more consumers).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from lrp_onnx.api import LRP
from lrp_onnx.emit.contract import (
    AUDIT_PREFIX,
    OUTPUT_RELEVANCE,
    PER_LAYER_PREFIX,
    RELEVANCE,
    SEED_OUTPUT_RELEVANCE,
    TARGET,
    TARGET_POSITION,
    read_record,
    seed_mode,
    strip_compiled,
)
from lrp_onnx.emit.registry import conserves_default, spec_of
from lrp_onnx.errors import LRPError, UnsupportedModel
from lrp_onnx.frontend.layers import Layer
from lrp_onnx.frontend.load import load_model, run_onnx_checker, skeleton
from lrp_onnx.rules.core import (
    PassRule,
    Rule,
)
from lrp_onnx.rules.rulefile import parse_rule
from lrp_onnx.runtime import make_session
from lrp_onnx.sampling import random_input, rel_l2

#: Largest relative difference between the compiled and the original model's outputs.
OUTPUT_RTOL = 1e-5
#: Largest relative difference between the relevance a conserving layer receives and passes on.
CONSERVATION_TOL = 1e-3
#: Largest relative L2 difference between a compiled file's relevance and its recompilation.
REPRODUCE_TOL = 1e-5


@dataclass
class CheckResult:
    """One check: ``ok`` is True (passed), False (failed) or None (not applicable, skipped)."""

    name: str
    ok: bool | None
    detail: str


@dataclass
class CheckReport:
    """All checks of one model; ``ok`` when none failed."""

    label: str
    compiled_input: bool
    samples: int
    seed: int
    provider: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok is not False for r in self.results)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (``lrp-onnx check --json``)."""
        out = asdict(self)
        out["ok"] = self.ok
        return out

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=True)


def conserving(layer: Layer, rule: Rule) -> bool:
    """Whether ``rule`` on ``layer`` passes on all the relevance the layer receives (up to the
    stabilizer), from the op's ``conserves`` fact: pass-through and pooling/sum/concat layers
    under the z-rules do; a linear layer (BatchNormalization included) does when it has no
    bias (or the rule drops it: ``zero_bias=True``, ``FlatRule``) and the rule is not an
    ``AlphaBetaRule`` with ``alpha - beta != 1``; ``GradientRule`` does not."""
    if isinstance(rule, PassRule):
        return True
    spec = spec_of(layer.kind)
    return (spec.conserves if spec is not None else conserves_default)(layer, rule)


def _recorded_rules(record: dict[str, Any], label: str) -> list[Rule] | None:
    if not record:
        return None
    try:
        layers = record["layers"]
        return [parse_rule(la["rule"]) for la in layers]
    except (ValueError, KeyError, TypeError, LRPError) as exc:
        raise UnsupportedModel(f"{label}: unreadable lrp_onnx metadata ({exc})") from None


def _is_compiled(model: onnx.ModelProto) -> bool:
    return (any(i.name in (TARGET, OUTPUT_RELEVANCE) for i in model.graph.input)
            and any(o.name == RELEVANCE for o in model.graph.output))


#: Sequence length of the random token ids where the model's is dynamic.
TOKENS = 8


def _token_feeds(model: onnx.ModelProto, record: dict[str, Any], rng: np.random.Generator,
                 n: int) -> dict[str, np.ndarray]:
    """Feeds of a model compiled on token ids: uniform ids in the embedding's rows for the
    explained input, ones for every ``*mask*`` input, zeros for the other integer inputs
    (``token_type_ids``); ``TOKENS`` positions where the length is dynamic."""
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (n if k == 0 else TOKENS)
                 for k, d in enumerate(tt.shape.dim)]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if vi.name == record.get("explained_input"):
            feeds[vi.name] = rng.integers(0, int(record["tokens"]), shape).astype(dtype)
        elif np.issubdtype(dtype, np.floating) and "mask" not in vi.name.lower():
            feeds[vi.name] = np.clip(rng.standard_normal(shape), -3, 3).astype(dtype)
        else:
            feeds[vi.name] = np.full(shape, int("mask" in vi.name.lower()), dtype)
    return feeds


def _random_feeds(model: onnx.ModelProto, rng: np.random.Generator, n: int, label: str,
                  record: dict[str, Any]) -> dict[str, np.ndarray]:
    """Standard normal values, clipped to [-3, 3] (the range of normalized image inputs), for
    every data input of ``model`` in graph order (one draw for a one-input model, as ever);
    token ids and their masks for a model compiled on token ids (``record``)."""
    if record.get("tokens"):
        return _token_feeds(model, record, rng, n)
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    feeds = {}
    for name in names:
        others = [k for k in names if k != name]
        key, value = random_input(model, rng, batch=n, label=label, exclude=others, clip=3.0)
        feeds[key] = value
    return feeds


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    scale = max(float(np.abs(b64).max(initial=0.0)), 1e-30)
    return float(np.abs(a64 - b64).max(initial=0.0) / scale)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], device: str
         ) -> tuple[dict[str, np.ndarray], str]:
    session = make_session(model, device=device)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds))), session.get_providers()[0]


def _sums(values: np.ndarray, n: int) -> np.ndarray:
    """Per-sample sums of a batch of ``n``; a leading axis that merged the batch with others
    (``[N T, D]`` in a text model's dense layers, batch-major) is split back."""
    out: np.ndarray = values.reshape(n, -1).astype(np.float64).sum(axis=1)
    return out


def _conservation(analyzer: LRP, outs: dict[str, np.ndarray], n: int
                  ) -> tuple[CheckResult, bool]:
    """Per-layer check; returns the result and whether every layer conserves."""
    checked, skipped, worst, failed = 0, [], 0.0, []
    for layer, rule in zip(analyzer.layers, analyzer.rules):
        i = layer.index + 1
        received = [v for k, v in outs.items()
                    if k == f"{AUDIT_PREFIX}{i}" or k.startswith(f"{AUDIT_PREFIX}{i}_")]
        sent = [v for k, v in outs.items()
                if k == f"{PER_LAYER_PREFIX}{i}" or k.startswith(f"{PER_LAYER_PREFIX}{i}_")]
        if not received:
            continue  # no relevance reaches this layer
        if not conserving(layer, rule):
            skipped.append(i)
            continue
        r_out = sum(_sums(v, n) for v in received)
        r_in = sum((_sums(v, n) for v in sent), np.zeros_like(r_out))
        scale = np.maximum(np.abs(r_out), 1e-12)
        err = float(np.max(np.abs(r_in - r_out) / scale))
        checked += 1
        worst = max(worst, err)
        if not err <= CONSERVATION_TOL:
            failed.append(f"layer {i} {layer.summary} => {rule!r}: {err:.3g}")
    detail = (f"{checked} layers checked, largest relative difference {worst:.3g} "
              f"(tolerance {CONSERVATION_TOL:g})")
    if skipped:
        detail += (f"; {len(skipped)} layers absorb relevance by design (bias, epsilon, "
                   f"alpha-beta, gradient), not checked: {', '.join(map(str, skipped))}")
    if failed:
        return CheckResult("conservation_layers", False, "; ".join(failed) + f" ({detail})"), False
    if checked == 0:
        return CheckResult("conservation_layers", None, detail), not skipped
    return CheckResult("conservation_layers", True, detail), not skipped


def check_model(model: Any, rules_or_composite: Any = None, *, samples: int = 4, seed: int = 0,
                device: str = "cpu", output: str | None = None,
                output_relevance: bool = False, input: str | None = None) -> CheckReport:
    """Check ``model`` (a path or ``ModelProto``; original or compiled) as described in the
    module docstring. ``output_relevance`` and ``input`` compile an original model as
    :class:`~lrp_onnx.LRP` does (a compiled model's are read from its record). Raises
    :class:`~lrp_onnx.errors.LRPError` subclasses when the model is refused (unreadable,
    unsupported); failed checks are reported, not raised."""
    if samples < 1:
        raise ValueError("samples must be >= 1")
    proto, label = load_model(model)
    compiled_input = _is_compiled(proto)
    results: list[CheckResult] = []
    if compiled_input:
        if rules_or_composite is not None:
            raise UnsupportedModel(f"{label}: already compiled; check it without rules (they "
                                   "are read from the file)")
        if output_relevance:
            raise UnsupportedModel(f"{label}: already compiled; its seed mode is read from the "
                                   "file: check it without output_relevance")
        product = proto
        original = strip_compiled(proto)
        record = read_record(proto)
        rules: Any = _recorded_rules(record, label)
        normalize = bool(record.get("normalize_output_relevance", True))
        output = output or record.get("explained_output")
        output_relevance = seed_mode(record) == SEED_OUTPUT_RELEVANCE
        input = input or record.get("explained_input")
    else:
        original, rules, normalize = proto, rules_or_composite, True
        product = LRP(proto, rules, normalize_output_relevance=normalize, output=output,
                      output_relevance=output_relevance, input=input).model
    try:
        run_onnx_checker(product)
        onnx.shape_inference.infer_shapes(skeleton(product), check_type=True, strict_mode=True)
        results.append(CheckResult("onnx_checker", True,
                                   "onnx.checker and strict shape inference passed"))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        results.append(CheckResult("onnx_checker", False, str(exc).strip().splitlines()[0]))

    rng = np.random.default_rng(seed)
    feeds = _random_feeds(original, rng, samples, label, read_record(product))
    n = next(iter(feeds.values())).shape[0]  # a static batch dimension wins over ``samples``
    orig_outs, _ = _run(original, feeds, device)
    seed_feed: dict[str, np.ndarray] = {TARGET: np.full((n,), -1, dtype=np.int64)}
    if any(i.name == TARGET_POSITION for i in product.graph.input):
        seed_feed[TARGET_POSITION] = np.full((n,), -1, dtype=np.int64)
    if output_relevance:
        like = orig_outs[output or original.graph.output[0].name]
        seed_feed = {OUTPUT_RELEVANCE: rng.random(like.shape).astype(like.dtype)}
    prod_outs, provider = _run(product, {**feeds, **seed_feed}, device)
    report = CheckReport(label, compiled_input, n, seed, provider, results)

    diffs = {k: _rel_diff(prod_outs[k], v) for k, v in orig_outs.items()}
    worst = max(diffs.values(), default=0.0)
    bad = [k for k, d in diffs.items() if not d <= OUTPUT_RTOL]
    results.append(CheckResult(
        "outputs_unchanged", not bad,
        f"{len(diffs)} outputs, largest relative difference {worst:.3g} "
        f"(tolerance {OUTPUT_RTOL:g})" + (f"; differ: {', '.join(bad)}" if bad else "")))

    rel = prod_outs[RELEVANCE]
    audit: LRP | None = None
    if rules is not None or not compiled_input:
        audit = LRP(original, rules, normalize_output_relevance=normalize, output=output,
                    output_relevance=output_relevance, input=input, _audit=True)
    audit_outs = _run(audit.model, {**feeds, **seed_feed}, device)[0] if audit else {}
    nonfinite = [k for k, v in {RELEVANCE: rel, **audit_outs}.items()
                 if k.startswith((RELEVANCE, PER_LAYER_PREFIX, AUDIT_PREFIX))
                 and not np.isfinite(v).all()]
    results.append(CheckResult(
        "relevance_finite", not nonfinite,
        "relevance and every layer's relevance finite" if not nonfinite
        else f"NaN/Inf in {', '.join(nonfinite[:5])}" + (" ..." if len(nonfinite) > 5 else "")))

    if compiled_input:
        if audit is None:
            results.append(CheckResult("recorded_rules", None,
                                       "no lrp_onnx metadata: rules unknown"))
        else:
            diff = rel_l2(rel, audit_outs[RELEVANCE])
            results.append(CheckResult(
                "recorded_rules", diff <= REPRODUCE_TOL,
                f"recompiled with the {len(audit.rules)} recorded rules: relative L2 "
                f"difference {diff:.3g} (tolerance {REPRODUCE_TOL:g})"))
    if audit is None:
        results.append(CheckResult("conservation_layers", None, "rules unknown"))
        results.append(CheckResult("conservation_total", None, "rules unknown"))
        return report
    layer_result, all_conserve = _conservation(audit, audit_outs, n)
    results.append(layer_result)
    if output_relevance:
        seed_sum, seed_name = _sums(seed_feed[OUTPUT_RELEVANCE], n), "output_relevance"
    else:
        seed_sum = np.ones(n) if normalize else _seed_logits(audit_outs, n)
        seed_name = "1" if normalize else "logit"
    totals = _sums(rel, n)
    err = float(np.max(np.abs(totals - seed_sum) / np.maximum(np.abs(seed_sum), 1e-12)))
    sums = ", ".join(f"{t:.6g}" for t in totals)
    if all_conserve:
        results.append(CheckResult(
            "conservation_total", err <= CONSERVATION_TOL * len(audit.layers),
            f"relevance sums {sums} (seed {seed_name}), largest relative "
            f"difference {err:.3g}"))
    else:
        results.append(CheckResult(
            "conservation_total", None,
            f"not every layer conserves (see conservation_layers); relevance sums {sums}"))
    return report


def _seed_logits(outs: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Per-sample seed when relevance starts at the logit: what arrives at the output of the
    last layer relevance reaches (the layer computing the logits)."""
    last = max(int(k[len(AUDIT_PREFIX):].split("_")[0]) for k in outs
               if k.startswith(AUDIT_PREFIX))
    arrived = [_sums(v, n) for k, v in outs.items()
               if k == f"{AUDIT_PREFIX}{last}" or k.startswith(f"{AUDIT_PREFIX}{last}_")]
    total: np.ndarray = np.sum(arrived, axis=0)
    return total


__all__: Sequence[str] = ("CheckReport", "CheckResult", "check_model", "conserving",
                          "strip_compiled")
