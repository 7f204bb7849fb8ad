"""The compiled model's contract: the names it adds, its metadata record, and how to strip it.

A compiled model has the original inputs plus ``target`` (int64 ``[N]``; with a sequence output
``[N, T, V]`` also ``target_position``) or, compiled with ``output_relevance=True``, plus
``output_relevance`` (shaped like the explained output), and the original outputs plus
``relevance`` (and, on request, ``relevance_embedding`` for a model read as token ids, and
per-layer relevance outputs). Its metadata
entry ``lrp_onnx`` records the rules it was compiled with, its seed mode and, where the model has
several float inputs, the explained one (:func:`read_record`, :func:`seed_mode`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import onnx

from lrp_onnx.frontend.layers import Layer

TARGET = "target"
RELEVANCE = "relevance"
#: The position input of a model whose explained output is a sequence ``[N, T, V]``.
TARGET_POSITION = "target_position"
#: The relevance of every embedding entry ``[N, T, D]`` (token-id models, on request).
RELEVANCE_EMBEDDING = "relevance_embedding"
#: The seed input of a model compiled with ``output_relevance=True``.
OUTPUT_RELEVANCE = "output_relevance"
#: Seed modes (:func:`seed_mode`): the one-hot ``target`` seed, or an explicit seed tensor.
SEED_TARGET, SEED_OUTPUT_RELEVANCE = "target", "output_relevance"
#: Metadata key of the compiled model's record (rules, explained output, version).
RECORD_KEY = "lrp_onnx"


def class_axis(shape: Sequence[int | str | None]) -> int:
    """The axis of the classes in an explained output of shape ``shape``: 1 for ``[N, K, 1, ...]``
    (rank 4 or more, every dim after ``K`` of size 1: a 1×1-conv classifier or a
    GlobalAveragePool without Flatten, explained as ``[N, K]``), else the last."""
    if len(shape) >= 4 and all(d == 1 for d in shape[2:]):
        return 1
    return len(shape) - 1


def per_layer_name(layer: Layer, k: int, n_inputs: int) -> str:
    """Output name of the relevance ``layer`` sends to its ``k``-th input (``per_layer``):
    ``relevance_in_<i>`` (1-based flat layer index), ``relevance_in_<i>_<k>`` (1-based) for
    layers with several data inputs (``Add``, ``Concat``)."""
    base = f"{PER_LAYER_PREFIX}{layer.index + 1}"
    return base if n_inputs == 1 else f"{base}_{k + 1}"


#: Prefix of the per-layer relevance outputs; ``relevance_out_<i>`` (audit only) is what arrives
#: at layer i's output, summed over its consumers.
PER_LAYER_PREFIX = "relevance_in_"
AUDIT_PREFIX = "relevance_out_"


def _is_relevance_output(name: str) -> bool:
    return name in (RELEVANCE, RELEVANCE_EMBEDDING) or \
        name.startswith((PER_LAYER_PREFIX, AUDIT_PREFIX))


def read_record(model: onnx.ModelProto) -> dict[str, Any]:
    """The ``lrp_onnx`` metadata a compiled model carries (``{}`` if it has none or it is not
    JSON)."""
    text = {p.key: p.value for p in model.metadata_props}.get(RECORD_KEY)
    try:
        record = json.loads(text) if text else {}
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def seed_mode(record: dict[str, Any]) -> str:
    """The seed mode a record says: ``"output_relevance"`` (its ``seed`` entry; written only in
    that mode, so that models compiled without it keep their bytes) or ``"target"``."""
    return SEED_OUTPUT_RELEVANCE if record.get("seed") == SEED_OUTPUT_RELEVANCE else SEED_TARGET


def seed_input(model: onnx.ModelProto) -> str:
    """The name of the compiled model's seed input: ``output_relevance`` or ``target``."""
    return OUTPUT_RELEVANCE if seed_mode(read_record(model)) == SEED_OUTPUT_RELEVANCE \
        else TARGET


def _drop_contract_io(g: onnx.GraphProto, seed: str = TARGET) -> None:
    """Remove the compiled contract's seed inputs (``target`` or ``output_relevance``, and
    ``target_position``) and relevance outputs from ``g``."""
    outputs = [o for o in g.output if not _is_relevance_output(o.name)]
    del g.output[:]
    g.output.extend(outputs)
    inputs = [i for i in g.input if i.name not in (seed, TARGET_POSITION)]
    del g.input[:]
    g.input.extend(inputs)


def strip_compiled(model: onnx.ModelProto) -> onnx.ModelProto:
    """The original model inside a compiled one: without its seed input (``target`` or
    ``output_relevance``), the relevance outputs and every node only they need (a new
    ``ModelProto``; ``model`` is not modified)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    _drop_contract_io(g, seed_input(model))
    needed = {o.name for o in g.output}
    kept = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
            for a in node.attribute:  # subgraphs read outer values
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    needed.update(i for n in sub.node for i in n.input if i)
    kept.reverse()
    del g.node[:]
    g.node.extend(kept)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    vis = [v for v in g.value_info if v.name in needed]
    del g.value_info[:]
    g.value_info.extend(vis)
    props = [p for p in out.metadata_props if p.key != RECORD_KEY]
    del out.metadata_props[:]
    out.metadata_props.extend(props)
    return out
