"""The nested layer structure: ``ChainTuple`` / ``ParallelTuple`` / ``SkipConnectionTuple``.

The tree is built in two steps:

1. **Module scopes.** A layer's module path comes from
   :func:`lrp_onnx.frontend.graph.scope_of`. A path that is a strict prefix of another layer's
   path is a container (``Sequential``, ``BasicBlock``); a layer whose own path is a container
   (a functional ``Add`` inside a block) sits in it, any other layer sits in its path's parent.
   Children keep their topological order. A model without scopes is one flat chain.
2. **Merges.** Inside each container, an ``Add``/``Sum``/``Concat`` layer with several data inputs
   splits the units before it into branches: units feeding none of its inputs stay in front; if
   exactly one input comes through layers and the other straight from the fork, those layers form a
   ``SkipConnectionTuple`` (a residual block); if every input comes through its own layers, they
   form a ``ParallelTuple`` of branches. The merge layer itself follows (it has its own rule, the
   proportional split). Where branches are not disjoint the container stays a plain chain.

Positions are 1-based, as RelevancePropagation.jl's ``show_layer_indices`` prints them. As there,
a ``SkipConnectionTuple`` wraps a multi-layer content in a ``ChainTuple``, and a branch of one
layer is not wrapped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from lrp_onnx.emit.registry import spec_of
from lrp_onnx.frontend.layers import Layer


def _merges(kind: str) -> bool:
    """Whether a layer of ``kind`` with several data inputs merges branches (``Add``, ``Sum``,
    ``Concat``: the op's ``merges`` fact)."""
    spec = spec_of(kind)
    return spec is not None and spec.merges


# -- the tuple containers (the seed page's ChainTuple & co.) ---------------------------------------
class _RuleTuple(tuple[Any, ...]):
    """A tuple that prints as ``Name(\\n  item,\\n  ...\\n)`` and equals only its own kind."""

    def __new__(cls, *items: Any) -> _RuleTuple:
        return super().__new__(cls, items)

    def __repr__(self) -> str:
        return "\n".join(self.lines())

    def lines(self, item: Any = None) -> list[str]:
        out = [f"{type(self).__name__}("]
        for child in self:
            if isinstance(child, _RuleTuple):
                sub = child.lines(item)
                out += ["  " + s for s in sub[:-1]] + ["  " + sub[-1] + ","]
            else:  # a trailing "  # comment" stays after the comma
                text, sep, comment = (item(child) if item else _leaf(child)).partition("  # ")
                out.append(f"  {text},{sep}{comment}")
        out.append(")")
        return out

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and tuple.__eq__(self, cast(tuple[Any, ...], other))

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(self)))

    def __getnewargs__(self) -> tuple[Any, ...]:
        return tuple(self)

    def leaves(self) -> Iterator[Any]:
        """Items in order, descending into nested containers."""
        for child in self:
            if isinstance(child, _RuleTuple):
                yield from child.leaves()
            else:
                yield child


def _leaf(value: Any) -> str:
    if isinstance(value, Layer):
        return value.summary
    return repr(value)


class ChainTuple(_RuleTuple):
    """Rules (or indices, or layers) of a chain, in order."""


class ParallelTuple(_RuleTuple):
    """One entry per parallel branch (branches merged by Add/Sum/Concat)."""


class SkipConnectionTuple(_RuleTuple):
    """The layers of a residual branch whose input is also added to its output."""


# -- building the tree -----------------------------------------------------------------------------
@dataclass(eq=False)
class Container:
    """A container: ``kind`` is ``"chain"``, ``"parallel"`` or ``"skip"``."""

    kind: str
    children: list[Layer | Container] = field(default_factory=list)
    path: tuple[str, ...] = ()

    def leaves(self) -> Iterator[Layer]:
        for child in self.children:
            if isinstance(child, Container):
                yield from child.leaves()
            else:
                yield child

    def map(self, fn: Any) -> _RuleTuple:
        """The same structure as tuples, with ``fn(layer)`` at the leaves."""
        cls = {"chain": ChainTuple, "parallel": ParallelTuple, "skip": SkipConnectionTuple}
        items = [c.map(fn) if isinstance(c, Container) else fn(c) for c in self.children]
        return cls[self.kind](*items)


def _scope_tree(layers: Sequence[Layer]) -> Container:
    paths = [la.scope for la in layers]
    containers = {p[:k] for p in paths for k in range(1, len(p))}
    root = Container("chain")
    index: dict[tuple[str, ...], Container] = {(): root}

    def container(path: tuple[str, ...]) -> Container:
        if path not in index:
            parent = container(path[:-1])
            node = Container("chain", path=path)
            parent.children.append(node)
            index[path] = node
        return index[path]

    for layer in layers:
        owner = layer.scope if layer.scope in containers else layer.scope[:-1]
        container(owner).children.append(layer)
    return root


def _unit_io(unit: Layer | Container) -> tuple[set[str], set[str]]:
    """``(values read from outside, values produced)`` of a unit."""
    leaves = [unit] if isinstance(unit, Layer) else list(unit.leaves())
    produced = {la.output.name for la in leaves}
    reads = {t.name for la in leaves for t in la.inputs} - produced
    return reads, produced


def _wrap(units: list[Layer | Container]) -> Layer | Container:
    return units[0] if len(units) == 1 else Container("chain", units)


def _structure(units: list[Layer | Container]) -> list[Layer | Container]:
    """Regroup a container's units around merge layers (see the module docstring)."""
    for u in units:
        if isinstance(u, Container):
            u.children = _structure(u.children)
    io = [_unit_io(u) for u in units]
    producer: dict[str, int] = {}
    for i, (_, produced) in enumerate(io):
        for name in produced:
            producer[name] = i
    out: list[Layer | Container] = []
    start = 0
    for j, unit in enumerate(units):
        if not (isinstance(unit, Layer) and _merges(unit.kind) and len(unit.inputs) > 1):
            continue
        segment = range(start, j)
        branches: list[set[int]] = []
        for value in unit.inputs:
            members: set[int] = set()
            todo = [producer[value.name]] if producer.get(value.name, -1) in segment else []
            while todo:
                k = todo.pop()
                if k in members:
                    continue
                members.add(k)
                todo += [producer[n] for n in io[k][0] if producer.get(n, -1) in segment]
            branches.append(members)
        used = set().union(*branches)
        prefix = [k for k in segment if k not in used]
        disjoint = sum(len(b) for b in branches) == len(used)
        ordered = not prefix or not used or max(prefix) < min(used)
        # the prefix must not feed a branch from the middle: every branch starts at the fork
        non_empty = [sorted(b) for b in branches if b]
        if not disjoint or not ordered or not non_empty:
            out += [units[k] for k in segment] + [unit]
            start = j + 1
            continue
        out += [units[k] for k in prefix]
        if len(non_empty) == 1 and len(branches) == 2:
            out.append(Container("skip", [_wrap([units[k] for k in non_empty[0]])]))
        elif len(non_empty) == len(branches):
            out.append(Container("parallel", [_wrap([units[k] for k in b]) for b in non_empty]))
        else:
            out += [units[k] for b in non_empty for k in b]
        out.append(unit)
        start = j + 1
    out += units[start:]
    return out


def build_tree(layers: Sequence[Layer]) -> Container:
    """The nested structure of ``layers`` (see the module docstring)."""
    root = _scope_tree(layers)
    root.children = _structure(root.children)
    return root


def nested_indices(root: Container) -> dict[int, tuple[int, ...]]:
    """``{layer.index: (i, j, ...)}`` with 1-based positions, as RelevancePropagation.jl."""
    out: dict[int, tuple[int, ...]] = {}

    def walk(node: Container, prefix: tuple[int, ...]) -> None:
        for pos, child in enumerate(node.children, start=1):
            if isinstance(child, Container):
                walk(child, prefix + (pos,))
            else:
                out[child.index] = prefix + (pos,)

    walk(root, ())
    return out


def zip_rules(root: Container, rules: _RuleTuple) -> list[tuple[Layer, Any]]:
    """Pair each layer with the rule at the same place in ``rules``; the structures must match."""
    pairs: list[tuple[Layer, Any]] = []

    def walk(node: Container, value: Any, where: str) -> None:
        cls = {"chain": ChainTuple, "parallel": ParallelTuple, "skip": SkipConnectionTuple}
        want = cls[node.kind]
        if not isinstance(value, _RuleTuple) or type(value) is not want:
            got = type(value).__name__
            raise TypeError(f"at {where or 'top level'}: expected a {want.__name__} with "
                            f"{len(node.children)} entries, got {got}")
        if len(value) != len(node.children):
            raise ValueError(f"at {where or 'top level'}: {want.__name__} has {len(value)} "
                             f"entries, the model has {len(node.children)} there")
        for pos, (child, sub) in enumerate(zip(node.children, value), start=1):
            here = f"{where}[{pos}]" if where else f"[{pos}]"
            if isinstance(child, Container):
                walk(child, sub, here)
            else:
                pairs.append((child, sub))

    walk(root, rules, "")
    return pairs
