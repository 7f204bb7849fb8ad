"""Rule files: a Composite spelled in TOML or JSON, for the CLI's ``--rules FILE``.

TOML (Python's own ``tomllib``; JSON has the same structure)::

    preset = "EpsilonPlusFlat"            # optional, e.g. "EpsilonGammaBox(low=-3, high=3)"

    [[map]]                               # primitives, applied in order after the preset
    type = "GlobalTypeMap"                # later entries overwrite earlier ones
    rules = { Conv = "ZPlusRule()", Dense = "EpsilonRule(epsilon=1e-5)" }

    [[map]]
    type = "LayerMap"
    index = [1, 5]                        # 1-based, nested as show_layer_indices prints it
    rule = "EpsilonRule()"

    [[map]]
    type = "NameMap"
    pattern = "/features/features.0/*"    # glob on ONNX node names
    rule = "FlatRule()"

Rules are written as calls with numeric keyword or positional arguments and are parsed, never
evaluated; ZBox bounds may be (nested) lists of numbers, ``"ZBoxRule(low=[[[-2.1]], [[-2.0]],
[[-1.8]]], high=2.6)"``. Each rule checks its hyper-parameters (see docs/rules.md for the valid
ranges) and a bad one is a one-line :class:`~lrp_onnx.errors.RuleAssignmentError`. Keys
``range`` take ``[first, last]`` (inclusive, 1-based) and ``n`` an integer.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from lrp_onnx.errors import RuleAssignmentError
from lrp_onnx.rules import composites as C
from lrp_onnx.rules import core as R
from lrp_onnx.rules import presets as P
from lrp_onnx.rules.spelling import NotACallError, NotANumberError, parse_spelling, quoted

RULES: dict[str, type[R.Rule]] = {cls.__name__: cls for cls in R.ALL_RULES}

_RULE_PRIMS = {"GlobalMap": C.GlobalMap, "FirstLayerMap": C.FirstLayerMap,
               "LastLayerMap": C.LastLayerMap}
_TYPE_PRIMS = {"GlobalTypeMap": C.GlobalTypeMap, "FirstLayerTypeMap": C.FirstLayerTypeMap,
               "LastLayerTypeMap": C.LastLayerTypeMap}


def parse_rule(text: str) -> R.Rule:
    """Parse ``"EpsilonRule(epsilon=1e-5)"`` (or ``"ZeroRule"``) into a rule, without eval.

    Reads what :meth:`~lrp_onnx.rules.core.Rule.spelling` writes (array bounds as nested lists)
    back into an equal rule; a rule whose hyper-parameters are out of range is refused with the
    rule's own message (``EpsilonRule: epsilon must be a finite number >= 0, got -1``)."""
    names = ", ".join(RULES)
    try:
        # a **mapping makes it no rule call; a repeated keyword keeps its last value
        name, args, kwargs = parse_spelling(str(text), booleans=True, keywords="loose",
                                            arrays=True)
    except NotACallError:
        raise RuleAssignmentError(f"rule {quoted(text)} is not a rule call; rules: "
                                  f"{names}") from None
    except NotANumberError:
        raise RuleAssignmentError(f"rule {quoted(text)}: arguments must be numbers, true/false or "
                                  "lists of numbers") from None
    if name not in RULES:
        raise RuleAssignmentError(f"unknown rule {name!r}; rules: {names}")
    try:
        return RULES[name](*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise RuleAssignmentError(f"rule {quoted(text)}: {exc}") from None


def _type_key(key: str) -> C.TypeKey:
    return C.GROUPS.get(key, key)


def _positions(value: Any, where: str) -> range:
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return range(value[0], value[1] + 1)
    raise RuleAssignmentError(f"{where}: 'range' must be [first, last] (1-based, inclusive)")


def _primitive(entry: dict[str, Any], where: str) -> C.Primitive:
    if "type" not in entry:
        raise RuleAssignmentError(f"{where}: needs the key 'type' (a primitive name)")
    kind = entry["type"]
    if not isinstance(kind, str):
        raise RuleAssignmentError(f"{where}: 'type' must be a primitive name (a string), not "
                                  f"{quoted(kind)}")
    try:
        if kind in _RULE_PRIMS:
            return _RULE_PRIMS[kind](parse_rule(entry["rule"]))
        if kind in _TYPE_PRIMS:
            pairs = {_type_key(k): parse_rule(v) for k, v in dict(entry["rules"]).items()}
            return _TYPE_PRIMS[kind](pairs)
        if kind == "LayerMap":
            index = entry["index"]
            idx = index if isinstance(index, int) else tuple(int(i) for i in index)
            return C.LayerMap(idx, parse_rule(entry["rule"]))
        if kind == "RangeMap":
            return C.RangeMap(_positions(entry["range"], where), parse_rule(entry["rule"]))
        if kind == "RangeTypeMap":
            pairs = {_type_key(k): parse_rule(v) for k, v in dict(entry["rules"]).items()}
            return C.RangeTypeMap(_positions(entry["range"], where), pairs)
        if kind == "FirstNTypeMap":
            pairs = {_type_key(k): parse_rule(v) for k, v in dict(entry["rules"]).items()}
            return C.FirstNTypeMap(int(entry["n"]), pairs)
        if kind == "NameMap":
            return C.NameMap(str(entry["pattern"]), parse_rule(entry["rule"]))
    except KeyError as exc:
        raise RuleAssignmentError(f"{where}: {kind} needs the key {exc.args[0]!r}") from None
    except RuleAssignmentError as exc:  # a rule's own message, said where it is
        raise RuleAssignmentError(f"{where}: {exc}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise RuleAssignmentError(f"{where}: {exc}") from None
    known = sorted([*_RULE_PRIMS, *_TYPE_PRIMS, "LayerMap", "RangeMap", "RangeTypeMap",
                    "FirstNTypeMap", "NameMap"])
    raise RuleAssignmentError(f"{where}: unknown primitive type {kind!r}; known: "
                              f"{', '.join(known)}")


def composite_from_dict(data: dict[str, Any], label: str) -> C.Composite:
    """Build a Composite from the parsed file contents (see the module docstring)."""
    unknown = set(data) - {"preset", "map"}
    if unknown:
        raise RuleAssignmentError(f"{label}: unknown top-level keys {sorted(unknown)}; "
                                  "expected 'preset' and 'map'")
    prims: list[C.Primitive] = []
    if "preset" in data:
        try:
            prims += list(P.parse_composite(str(data["preset"])).primitives)
        except RuleAssignmentError as exc:
            raise RuleAssignmentError(f"{label}: preset: {exc}") from None
    entries = data.get("map", [])
    if not isinstance(entries, list):
        raise RuleAssignmentError(f"{label}: 'map' must be a list of tables")
    for i, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise RuleAssignmentError(f"{label}: map entry {i} must be a table")
        prims.append(_primitive(entry, f"{label}: map entry {i}"))
    return C.Composite(*prims)


def load_rules(path: str | Path) -> C.Composite:
    """Read a ``.toml`` or ``.json`` rule file into a Composite."""
    p = Path(path)
    label = str(p)
    if not p.is_file():
        raise RuleAssignmentError(f"{label}: no such rule file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleAssignmentError(f"{label}: cannot read ({exc})") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        elif p.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            raise RuleAssignmentError(f"{label}: rule files must end in .toml or .json")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        first = (str(exc).splitlines() or ["nested too deeply"])[0]
        raise RuleAssignmentError(f"{label}: not valid {p.suffix[1:].upper()}: {first}") \
            from None
    if not isinstance(data, dict):
        raise RuleAssignmentError(f"{label}: the file must hold a table/object")
    return composite_from_dict(data, label)
