"""``lrp-onnx show``: the layer tree, the flat layer list, or one line per module path."""

from __future__ import annotations

from collections import Counter
from typing import Any

from lrp_onnx.frontend.layers import Layer
from lrp_onnx.rules.core import Rule


def show(model: Any, composite: Any, *, output: str | None = None, input: str | None = None,
         flat: bool = False, blocks: bool = False) -> list[str]:
    """The lines ``show`` prints: a header, then the nested tree (default), one line per layer
    (``flat``) or one line per run of layers sharing a module path (``blocks``). Every rule is
    checked against its layer first."""
    from lrp_onnx.api import assign_rules, prepare
    from lrp_onnx.emit.registry import resolve_entries

    prep = prepare(model, output, input=input)
    rules = assign_rules(prep, composite)
    resolve_entries(prep.layers, rules, prep.label, prep.graph.opset, prep.graph.shape)
    header = f"{prep.label}: {len(prep.layers)} layers"
    if blocks:
        return [header, *block_lines(prep.layers, rules)]
    width = max(len(str(prep.indices[la.index])) for la in prep.layers)

    def line(layer: Layer) -> str:
        idx = str(prep.indices[layer.index])
        text = f"{idx:<{width}}  {layer.summary} => {rules[layer.index]!r}"
        # the exporter's module path where it names something (a transformer's block,
        # attention, mlp, norm), not only positions in nn.Sequential
        named = any(not part.isdigit() for part in layer.scope)
        return f"{text}  # {'.'.join(layer.scope)}" if named else text

    if flat:
        return [header, *("  " + line(layer) for layer in prep.layers)]
    return [header, *prep.tree.map(lambda la: la).lines(line)]


def block_lines(layers: list[Layer], rules: list[Rule]) -> list[str]:
    """One line per run of consecutive layers with the same module path: the flat layer
    indices (1-based), the path, and each layer kind with its count and rule, in order."""
    runs: list[tuple[str, list[Layer]]] = []
    for layer in layers:
        path = ".".join(layer.scope) or "(no module path)"
        if runs and runs[-1][0] == path:
            runs[-1][1].append(layer)
        else:
            runs.append((path, [layer]))
    spans = [f"{run[0].index + 1}" if len(run) == 1 else
             f"{run[0].index + 1}-{run[-1].index + 1}" for _, run in runs]
    width = max(len(s) for s in spans)
    path_width = min(max(len(p) for p, _ in runs), 48)
    lines = []
    for span, (path, run) in zip(spans, runs):
        kinds = Counter((la.summary.split("(")[0], repr(rules[la.index])) for la in run)
        what = ", ".join(f"{kind}{f' x{n}' if n > 1 else ''} => {rule}"
                         for (kind, rule), n in kinds.items())
        lines.append(f"  {span:>{width}}  {path:<{path_width}}  {what}")
    return lines
