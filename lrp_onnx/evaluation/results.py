"""What :func:`lrp_onnx.evaluate` returns: one :class:`MethodResult` per method, ranked, in an
:class:`Evaluation` that prints as a table and converts to JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class MethodResult:
    """The scores of one method (higher is better for ``aopc`` and ``srg``, lower for
    ``aopc_lerf`` and, under ROAD, for ``accuracy_morf``).

    Attributes:
        method: the method's spec (``"EpsilonPlusFlat"``, ``"Gradient"``, a rule file).
        aopc: AOPC of the MoRF curve, ``mean_k (f(x) - f(x_k))`` averaged over the samples.
        aopc_lerf: the same for the LeRF curve.
        srg: the symmetric relevance gain, ``mean_k (LeRF_k - MoRF_k)`` = ``aopc - aopc_lerf``.
        morf, lerf: the mean target score after each step ``k = 0..K`` (``[K + 1]``).
        accuracy_morf, accuracy_lerf: the fraction of samples whose top class is still the
            label after each step (``[K + 1]``).
        seconds: wall time of the method: compiling, attributing and scoring.
        attribution_seconds: the part spent compiling and attributing.
    """

    method: str
    aopc: float
    aopc_lerf: float
    srg: float
    morf: np.ndarray
    lerf: np.ndarray
    accuracy_morf: np.ndarray
    accuracy_lerf: np.ndarray
    seconds: float
    attribution_seconds: float

    @property
    def road_morf(self) -> float:
        """ROAD's MoRF score: the mean accuracy over steps ``1..K`` (lower is better)."""
        return float(self.accuracy_morf[1:].mean())

    @property
    def road_lerf(self) -> float:
        """ROAD's LeRF score: the mean accuracy over steps ``1..K`` (higher is better)."""
        return float(self.accuracy_lerf[1:].mean())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the scores, the curves as lists, the times."""
        return {"method": self.method, "aopc": self.aopc, "aopc_lerf": self.aopc_lerf,
                "srg": self.srg, "accuracy_morf_mean": self.road_morf,
                "accuracy_lerf_mean": self.road_lerf,
                "morf": [float(v) for v in self.morf], "lerf": [float(v) for v in self.lerf],
                "accuracy_morf": [float(v) for v in self.accuracy_morf],
                "accuracy_lerf": [float(v) for v in self.accuracy_lerf],
                "seconds": self.seconds, "attribution_seconds": self.attribution_seconds}


@dataclass
class Evaluation:
    """The ranked results and the settings they were measured with.

    Attributes:
        results: one :class:`MethodResult` per method, best first (by ``settings["ranked_by"]``).
        settings: metric, replacement, steps, patch, seed, features, samples, score, ranked_by.
    """

    results: list[MethodResult]
    settings: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, method: str) -> MethodResult:
        """The result of ``method`` (its spec as given)."""
        for r in self.results:
            if r.method == method:
                return r
        raise KeyError(method)

    def table(self, times: bool = True) -> str:
        """The results as a text table, best first; ``times=False`` leaves out the time column
        (for reproducible output)."""
        road = self.settings.get("metric") == "road"
        head = ["method", "AOPC MoRF", "AOPC LeRF", "SRG"]
        head += ["acc MoRF", "acc LeRF"] if road else []
        head += ["time"] if times else []
        rows = []
        for r in self.results:
            row = [r.method, f"{r.aopc:.3f}", f"{r.aopc_lerf:.3f}", f"{r.srg:.3f}"]
            row += [f"{r.road_morf:.3f}", f"{r.road_lerf:.3f}"] if road else []
            row += [f"{r.seconds:.1f} s"] if times else []
            rows.append(row)
        widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
        lines = []
        for row in [head, *rows]:
            cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
            lines.append("  ".join(cells).rstrip())
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """``{"results": [...], "settings": {...}}`` (what ``--json`` writes)."""
        return {"results": [r.as_dict() for r in self.results], "settings": dict(self.settings)}
