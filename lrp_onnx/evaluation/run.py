"""``evaluate``: score attribution methods by perturbation on a model's data, in ONNX Runtime."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

import lrp_onnx.evaluation.perturbation as P
from lrp_onnx.emit.contract import OUTPUT_RELEVANCE, TARGET
from lrp_onnx.errors import InvalidInput
from lrp_onnx.evaluation.methods import Attributors, Method, check_given, parse_method
from lrp_onnx.evaluation.results import Evaluation, MethodResult

#: Bytes of perturbed inputs built at a time.
CHUNK_BYTES = 64 << 20


class Forward:
    """The original model in ONNX Runtime: ``scores(x)`` is its output ``[N, classes]``."""

    def __init__(self, model: str | os.PathLike[str] | onnx.ModelProto, device: str,
                 output: str | None, batch_size: int) -> None:
        from lrp_onnx.frontend.load import load_model
        from lrp_onnx.runtime import make_session

        proto, self.label = load_model(model)
        self.session = make_session(proto, device=device)
        inputs = self.session.get_inputs()
        if {i.name for i in inputs} & {TARGET, OUTPUT_RELEVANCE}:
            raise InvalidInput(f"{self.label}: this is a compiled model; evaluate takes the "
                               "original model (it compiles each method itself)")
        if len(inputs) != 1:
            raise InvalidInput(f"{self.label}: evaluate needs a model with one input; it has "
                               f"{', '.join(i.name for i in inputs)}")
        self.input = inputs[0]
        self.output = output or self.session.get_outputs()[0].name
        self.batch_size = batch_size

    def check(self, x: np.ndarray, what: str) -> None:
        shape = list(self.input.shape)
        if x.ndim != len(shape) or any(isinstance(d, int) and d != a
                                       for d, a in zip(shape[1:], x.shape[1:])):
            dims = ["N" if not isinstance(d, int) else d for d in shape]
            raise InvalidInput(f"{what}: samples of shape {list(x.shape)} do not fit input "
                               f"'{self.input.name}' {dims} of {self.label}")

    def scores(self, x: np.ndarray) -> np.ndarray:
        from lrp_onnx.errors import RuntimeFailure
        from lrp_onnx.frontend.load import one_line
        from lrp_onnx.runtime import ort_errors

        out = []
        for i in range(0, len(x), self.batch_size):
            try:
                y = self.session.run([self.output], {self.input.name: x[i:i + self.batch_size]})
            except ort_errors() as exc:
                raise RuntimeFailure(f"{self.label}: ONNX Runtime failed: "
                                     f"{one_line(str(exc))}") from None
            out.append(np.asarray(y[0]).reshape(min(self.batch_size, len(x) - i), -1))
        return np.concatenate(out)


def evaluate(model: str | os.PathLike[str] | onnx.ModelProto, data: np.ndarray,
             labels: Sequence[int] | np.ndarray, methods: Sequence[str] = (), *,
             metric: str = "pixel-flipping", replacement: str | None = None,
             steps: int | None = None, patch: int | None = None, seed: int = 0,
             attributions: Mapping[str, np.ndarray] | None = None, output: str | None = None,
             batch_size: int = 256, device: str = "cpu",
             progress: Callable[[int, int], None] | None = None) -> Evaluation:
    """Score attribution methods on ``model`` by perturbing ``data`` in their order of relevance.

    Args:
        model: the original model (a path or ``ModelProto``), with one input ``[N, C, H, W]``.
        data: the samples ``[N, C, H, W]`` (cast to float32).
        labels: the class explained and scored for each sample (``[N]`` integers).
        methods: specs: a preset call as ``--composite`` takes it (``"EpsilonPlusFlat"``,
            ``"EpsilonGammaBox(low=0.0, high=1.0)"``), a ``.toml``/``.json`` rule file, or a
            baseline: ``"Gradient"``, ``"GradientXInput"``, ``"IntegratedGradients(steps=32)"``,
            ``"Random"``.
        metric: ``"pixel-flipping"`` (single pixels), ``"region-perturbation"`` (``patch`` x
            ``patch`` squares), ``"road"`` (noisy linear imputation, 10%..90% removed) or
            ``"srg"`` (pixel flipping ranked by SRG).
        replacement: ``"noise"`` (default: uniform in the data's range, per pixel), ``"mean"``
            (the data's mean image), ``"zero"`` or ``"blur"`` (Gaussian, sigma 1 pixel).
        steps: perturbation steps ``K`` (default: ``min(features, 64)``; ROAD: 9).
        patch: the side of a feature square (default 1; region perturbation: 2).
        seed: seeds the tie-break jitter, the replacement noise and ``Random``.
        attributions: precomputed attributions by name (arrays shaped like ``data``), scored
            after ``methods``.
        output: the model output to score and explain (default: the first).
        batch_size: samples per ONNX Runtime run.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        progress: called as ``progress(done, total)`` (perturbed samples scored so far).

    Returns:
        An :class:`Evaluation`, best method first.
    """
    x = np.ascontiguousarray(np.asarray(data, dtype=np.float32))
    t = np.asarray(labels)
    if not np.issubdtype(t.dtype, np.integer) or t.shape != (len(x),):
        raise InvalidInput(f"labels: expected {len(x)} integers (one per sample), got "
                           f"{t.dtype} {list(t.shape)}")
    t = t.astype(np.int64)
    protocol = P.resolve(metric, replacement, steps, patch, seed, x.shape)
    parsed: list[tuple[str, Method | np.ndarray]] = [(str(m), parse_method(m)) for m in methods]
    parsed += [(k, check_given(k, a, x.shape)) for k, a in (attributions or {}).items()]
    if not parsed:
        raise InvalidInput("no methods to evaluate")
    forward = Forward(model, device, output, batch_size)
    forward.check(x, "data")
    base = forward.scores(x)
    if ((t < 0) | (t >= base.shape[1])).any():
        bad = int(t[(t < 0) | (t >= base.shape[1])][0])
        raise InvalidInput(f"labels: {bad} is outside [0, {base.shape[1] - 1}]")
    scorer = _Scorer(x, t, protocol, forward, base, progress, len(parsed))
    attributors = Attributors(model, device, batch_size, seed)
    results = []
    for name, method in parsed:
        start = time.perf_counter()
        if isinstance(method, Method):
            a, absolute = attributors.get(method)(x, t), method.absolute
        else:
            a, absolute = method, False
        attributed = time.perf_counter()
        if not np.isfinite(a).all():
            raise InvalidInput(f"method {name!r}: the attributions are not finite (NaN/Inf)")
        results.append(scorer.score(name, a, absolute, start, attributed))
    ranked_by = {"srg": "srg", "road": "accuracy_morf_mean"}.get(protocol.metric, "aopc")
    results.sort(key=lambda r: r.road_morf if ranked_by == "accuracy_morf_mean"
                 else -getattr(r, ranked_by))
    settings = {"metric": protocol.metric, "replacement": protocol.replacement,
                "steps": protocol.steps, "patch": protocol.patch, "seed": seed,
                "features": protocol.features, "samples": len(x),
                "replaced": [int(n) for n in protocol.counts()],
                "score": f"output '{forward.output}' at the label", "ranked_by": ranked_by,
                "model": forward.label}
    return Evaluation(results, settings)


class _Scorer:
    """The shared part of every method's scoring: features, random draws, the unperturbed
    scores, and the runs of the perturbed inputs."""

    def __init__(self, x: np.ndarray, t: np.ndarray, protocol: P.Protocol, forward: Forward,
                 base: np.ndarray, progress: Callable[[int, int], None] | None,
                 n_methods: int) -> None:
        self.x, self.t, self.protocol, self.forward = x, t, protocol, forward
        n, _, h, w = x.shape
        self.fmap = P.feature_map(h, w, protocol.patch)
        rng = np.random.default_rng(protocol.seed)
        self.jitter = rng.random((n, protocol.features))
        lo, hi = float(x.min()), float(x.max())
        self.values = P.replacement_values(x, protocol.replacement, rng, lo, hi)
        self.noise = (rng.normal(0.0, P.ROAD_NOISE * (hi - lo), size=x.shape).astype(x.dtype)
                      if self.values is None else None)
        self.base = base[np.arange(n), t]
        self.base_correct = base.argmax(axis=1) == t
        self.progress, self.done = progress, 0
        self.total = n_methods * 2 * n * protocol.steps

    def score(self, name: str, a: np.ndarray, absolute: bool, start: float,
              attributed: float) -> MethodResult:
        p = self.protocol
        ranks = P.morf_ranks(P.feature_scores(a, self.fmap, p.features, absolute), self.jitter)
        curves = [self._curve(ranks[:, self.fmap]),
                  self._curve((p.features - 1 - ranks)[:, self.fmap])]
        (morf, acc_m), (lerf, acc_l) = curves
        drop_m = (self.base[:, None] - morf).mean()
        drop_l = (self.base[:, None] - lerf).mean()
        return MethodResult(name, float(drop_m), float(drop_l), float(drop_m - drop_l),
                            morf.mean(axis=0), lerf.mean(axis=0), acc_m.mean(axis=0),
                            acc_l.mean(axis=0), time.perf_counter() - start, attributed - start)

    def _curve(self, pixel_ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, correct)``, ``[N, K + 1]`` each, for one order's pixel ranks ``[N, H, W]``."""
        n = len(self.x)
        counts = self.protocol.counts()
        scores = np.empty((n, len(counts)))
        correct = np.empty((n, len(counts)), dtype=bool)
        scores[:, 0], correct[:, 0] = self.base, self.base_correct
        per = max(1, CHUNK_BYTES // max(self.x.nbytes, 1))
        for lo in range(1, len(counts), per):
            ks = np.arange(lo, min(lo + per, len(counts)))
            xs = P.perturbed(self.x, self.values, self.noise, pixel_ranks, counts[ks])
            out = self.forward.scores(xs).reshape(len(ks), n, -1)
            scores[:, ks] = out[:, np.arange(n), self.t].T
            correct[:, ks] = (out.argmax(axis=2) == self.t[None]).T
            self.done += len(ks) * n
            if self.progress is not None:
                self.progress(self.done, self.total)
        return scores, correct
