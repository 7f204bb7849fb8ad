"""The nested layer tree built from the exporter's module scopes (``show_layer_indices``).

A layer's module path comes from :func:`lrp_onnx.graph.scope_of`. A path that is a strict prefix
of another layer's path is a container (a ``Sequential``, a ``BasicBlock``); a layer whose path is
a container (a functional ``Add`` inside a block) sits inside it, any other layer sits in its
path's parent. Children keep their first-appearance (topological) order. A model without scopes
is one flat chain.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .layers import Layer


@dataclass(eq=False)
class Node:
    """A container in the layer tree: ``children`` are layers or nested containers."""

    path: tuple[str, ...]
    children: list[Layer | Node] = field(default_factory=list)

    def leaves(self) -> Iterator[Layer]:
        for child in self.children:
            if isinstance(child, Node):
                yield from child.leaves()
            else:
                yield child


def build_tree(layers: Sequence[Layer]) -> Node:
    """The container tree of ``layers`` (see the module docstring)."""
    paths = [la.scope for la in layers]
    containers = {p[:k] for p in paths for k in range(1, len(p))}
    root = Node(())
    index: dict[tuple[str, ...], Node] = {(): root}

    def container(path: tuple[str, ...]) -> Node:
        if path not in index:
            parent = container(path[:-1])
            node = Node(path)
            parent.children.append(node)
            index[path] = node
        return index[path]

    for layer in layers:
        path = layer.scope
        owner = path if path in containers else path[:-1]
        container(owner).children.append(layer)
    return root


def nested_indices(root: Node) -> dict[int, tuple[int, ...]]:
    """``{layer.index: (i, j, ...)}`` with 1-based positions, as RelevancePropagation.jl."""
    out: dict[int, tuple[int, ...]] = {}

    def walk(node: Node, prefix: tuple[int, ...]) -> None:
        for pos, child in enumerate(node.children, start=1):
            if isinstance(child, Node):
                walk(child, prefix + (pos,))
            else:
                out[child.index] = prefix + (pos,)

    walk(root, ())
    return out
