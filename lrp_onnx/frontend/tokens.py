"""Token-id inputs: an integer graph input that selects rows of an embedding table.

A text model's input is ``input_ids`` (int64 ``[N, T]``), read by ``Gather(table, ids)`` with a
constant float ``table [V, D]`` (the word embedding). Relevance cannot reach an integer, so such a
model is explained at the embedding's output ``[N, T, D]``: the compiled model keeps the ids as
its input and outputs the relevance per token, summed over the hidden axis (LXT's convention),
and on request the relevance of every embedding entry.

The ids may pass through ops that keep their order and only change their shape or type (the
registry fact ``keeps_order``; GPT-2 writes ``Reshape(input_ids, [-1, T])`` in front of its
Gather).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from lrp_onnx.dtypes import float_dtype, integer_dtype
from lrp_onnx.emit.registry import spec_of

#: The name an ambiguous choice falls back to (HF's, and torch exports keep it).
TOKEN_IDS = "input_ids"


@dataclass(frozen=True)
class Embedding:
    """A token input and the embedding lookup that reads it.

    Attributes:
        ids: the integer graph input (``input_ids``).
        gather: the ``Gather(table, ids')`` node (``ids'`` is ``ids`` or a reshape of it).
        output: the Gather's output ``[N, T, D]``: where relevance is computed.
    """

    ids: gs.Variable
    gather: gs.Node

    @property
    def output(self) -> gs.Variable:
        out: gs.Variable = self.gather.outputs[0]
        return out

    @property
    def moved(self) -> bool:
        """Whether the ids reach the Gather through a reshape (the per-token sum is then
        reshaped back to the ids' shape)."""
        return self.gather.inputs[1] is not self.ids


def _keeps_order(op: str) -> bool:
    spec = spec_of(op)
    return spec is not None and spec.keeps_order


def _is_lookup(node: gs.Node, ids: gs.Tensor) -> bool:
    """``node`` is ``Gather(float table [V, D], ids, axis=0)``."""
    if node.op != "Gather" or len(node.inputs) != 2 or node.inputs[1] is not ids:
        return False
    table = node.inputs[0]
    axis = int(node.attrs.get("axis", 0))
    if not isinstance(table, gs.Constant) or axis != 0 or len(table.shape) != 2:
        return False
    return float_dtype(table)


def find_embeddings(inputs: list[gs.Variable]) -> dict[str, Embedding]:
    """``{input name: Embedding}`` for every integer input read by exactly one embedding
    lookup (directly or through ops that move the ids)."""
    found: dict[str, Embedding] = {}
    for ids in inputs:
        if not integer_dtype(ids):
            continue
        lookups: list[gs.Node] = []
        frontier: list[gs.Tensor] = [ids]
        seen: set[str] = set()
        while frontier:
            value = frontier.pop()
            if value.name in seen:
                continue
            seen.add(value.name)
            for node in value.outputs:
                if _is_lookup(node, value):
                    lookups.append(node)
                elif _keeps_order(node.op) and node.inputs and node.inputs[0] is value and \
                        all(integer_dtype(o) for o in node.outputs):
                    frontier.extend(node.outputs)
        if len(lookups) == 1:
            found[ids.name] = Embedding(ids, lookups[0])
    return found
