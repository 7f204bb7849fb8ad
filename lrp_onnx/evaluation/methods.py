"""The attribution methods ``evaluate`` compares, each compiled into an ONNX model run by ONNX
Runtime: LRP composites (a preset call or a rule file) and the baselines ``Gradient``,
``GradientXInput``, ``IntegratedGradients(steps=n)`` and ``Random``.

The baselines come from one compiled graph: ``EpsilonRule(epsilon=0)`` on every layer, seeded
with the target logit. For a network of linear layers, ReLU and max/average pooling this is
exactly Gradient×Input (Ancona et al. 2018: ε-LRP with ε → 0 equals Gradient×Input on ReLU
networks), and the compiler emits it in the factored form ``relevance = x * g`` with
``g = ∂f/∂x`` the gradient. ``Gradient`` is the same graph with its output taken before that
final product; ``IntegratedGradients`` runs the Gradient×Input graph on ``α x`` and averages
``GxI(α x) / α = x * ∇f(α x)`` over the midpoints ``α = (i + 0.5) / n``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from lrp_onnx.errors import InvalidInput, RuleAssignmentError, UnsupportedModel
from lrp_onnx.rules.spelling import SpellingError, parse_spelling

#: Baseline names ``evaluate`` accepts besides composites and rule files.
BASELINES = ("Gradient", "GradientXInput", "IntegratedGradients", "Random")
#: Integrated Gradients' default number of midpoint steps.
IG_STEPS = 32
RULE_FILE_SUFFIXES = (".toml", ".json")


@dataclass(frozen=True)
class Method:
    """One parsed method: ``kind`` is ``"lrp"`` (``composite`` set), ``"gradient"``, ``"gxi"``,
    ``"ig"`` (``steps`` set) or ``"random"``; ``absolute``: features are ranked by ``|a|``
    (Gradient, as usual for a sensitivity) instead of the signed ``a``."""

    spec: str
    kind: str
    composite: Any = None
    steps: int = 0

    @property
    def absolute(self) -> bool:
        return self.kind == "gradient"


def parse_method(spec: str) -> Method:
    """Parse a method spec: a baseline (``"IntegratedGradients(steps=16)"``), a preset call as
    ``--composite`` takes it, or a ``.toml``/``.json`` rule file."""
    from lrp_onnx.rules.presets import PRESETS, parse_composite
    from lrp_onnx.rules.rulefile import load_rules

    text = str(spec).strip()
    if text.lower().endswith(RULE_FILE_SUFFIXES) and "(" not in text:
        return Method(text, "lrp", composite=load_rules(text))
    try:
        name, args, kwargs = parse_spelling(text)
    except SpellingError:
        name, args, kwargs = "", [], {}
    if name in BASELINES:
        return _baseline(text, name, args, kwargs)
    if name not in PRESETS:
        raise RuleAssignmentError(
            f"unknown method {text!r}; methods: {', '.join(BASELINES)}, a preset "
            f"({', '.join(PRESETS)}) or a .toml/.json rule file")
    return Method(text, "lrp", composite=parse_composite(text))


def _baseline(text: str, name: str, args: list[Any], kwargs: dict[str, Any]) -> Method:
    if name != "IntegratedGradients":
        if args or kwargs:
            raise RuleAssignmentError(f"method {text!r}: {name} takes no arguments")
        kind = {"Gradient": "gradient", "GradientXInput": "gxi", "Random": "random"}[name]
        return Method(text, kind)
    if args or set(kwargs) - {"steps"}:
        raise RuleAssignmentError(f"method {text!r}: IntegratedGradients takes only steps=N")
    steps = kwargs.get("steps", IG_STEPS)
    if not isinstance(steps, int) or steps < 1:
        raise RuleAssignmentError(f"method {text!r}: steps must be a positive integer")
    return Method(text, "ig", steps=steps)


def gradient_model(gxi: onnx.ModelProto, input_name: str, label: str) -> onnx.ModelProto:
    """The Gradient model from the compiled Gradient×Input model: its ``relevance`` output is
    ``Mul(x, g)`` (possibly behind ``Identity``); the copy outputs ``g``."""
    from lrp_onnx.emit.contract import RELEVANCE

    model = copy.deepcopy(gxi)
    producers = {out: node for node in model.graph.node for out in node.output}
    value = RELEVANCE
    node = producers.get(value)
    while node is not None and node.op_type == "Identity":
        value = node.input[0]
        node = producers.get(value)
    others = [v for v in node.input if v != input_name] if node is not None else []
    if node is None or node.op_type != "Mul" or len(others) != 1:
        raise UnsupportedModel(f"{label}: the Gradient baseline needs a first layer whose "
                               "Gradient×Input relevance is x * gradient (a Conv/Gemm/MatMul "
                               "reading the input)")
    gradient = others[0]
    for n in model.graph.node:
        if n.op_type == "Identity" and n.output[0] == RELEVANCE:
            n.input[0] = gradient
            break
    else:
        for n in model.graph.node:
            for i, v in enumerate(n.output):
                if v == RELEVANCE:
                    n.output[i] = f"{RELEVANCE}/product"
        model.graph.node.append(onnx.helper.make_node("Identity", [gradient], [RELEVANCE]))
    return model


Attribute = Callable[[np.ndarray, np.ndarray], np.ndarray]


class Attributors:
    """Compiles each method's model once per model and returns ``attribute(x, targets)``."""

    def __init__(self, model: str | os.PathLike[str] | onnx.ModelProto, device: str,
                 batch_size: int, seed: int) -> None:
        self.model, self.device, self.batch_size, self.seed = model, device, batch_size, seed
        self._gxi: Any = None

    def _run(self, analyzer: Any, session: Any, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        from lrp_onnx.runtime import run_compiled

        out = []
        for i in range(0, len(x), self.batch_size):
            expl = run_compiled(session, x[i:i + self.batch_size], t[i:i + self.batch_size],
                                analyzer.input_name, analyzer.output_name,
                                analyzer.num_classes)
            out.append(np.asarray(expl.relevance))
        return np.concatenate(out)

    def _compiled(self, composite: Any) -> Any:
        from lrp_onnx.api import LRP

        return LRP(self.model, composite, normalize_output_relevance=False)

    def _gxi_analyzer(self) -> Any:
        if self._gxi is None:
            from lrp_onnx.rules.composites import Composite, GlobalMap
            from lrp_onnx.rules.core import EpsilonRule

            self._gxi = self._compiled(Composite(GlobalMap(EpsilonRule(epsilon=0.0))))
        return self._gxi

    def get(self, method: Method) -> Attribute:
        """``attribute(x, targets)`` for ``method`` (compiles its model now)."""
        from lrp_onnx.runtime import make_session

        if method.kind == "random":
            rng = np.random.default_rng([self.seed, 1])
            return lambda x, t: rng.random(x.shape, dtype=np.float32)
        if method.kind == "lrp":
            lrp = self._compiled(method.composite)
            session = lrp.session(self.device)
            return lambda x, t: self._run(lrp, session, x, t)
        gxi = self._gxi_analyzer()
        if method.kind == "gradient":
            grad = gradient_model(gxi.model, gxi.input_name, gxi.label)
            session = make_session(grad, device=self.device)
            return lambda x, t: self._run(gxi, session, x, t)
        session = gxi.session(self.device)
        if method.kind == "gxi":
            return lambda x, t: self._run(gxi, session, x, t)
        alphas = (np.arange(method.steps, dtype=np.float64) + 0.5) / method.steps

        def integrated(x: np.ndarray, t: np.ndarray) -> np.ndarray:
            total = np.zeros(x.shape, dtype=np.float64)
            for a in alphas:
                total += self._run(gxi, session, (x * np.float32(a)).astype(x.dtype), t) / a
            return (total / len(alphas)).astype(x.dtype)

        return integrated


def check_given(name: str, a: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A precomputed attribution array for ``name``: real numbers, shaped like the data."""
    arr = np.asarray(a)
    if arr.shape != shape or not np.issubdtype(arr.dtype, np.number):
        raise InvalidInput(f"attributions {name!r}: expected real numbers of shape "
                           f"{list(shape)}, got {arr.dtype} {list(arr.shape)}")
    return arr.astype(np.float32)

