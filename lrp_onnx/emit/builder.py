"""The emitting API: ``b.op(...)``, ``b.const(...)`` with unique, deterministic, readable names.

Every emitted node and value is named ``lrp/<layer node>/<tag>`` (``lrp/<tag>`` outside a layer),
so the backward subgraph is easy to recognise in Netron and to slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from lrp_onnx.emit.optimizations import Optimizations
from lrp_onnx.frontend.graph import Graph


class Builder:
    """Appends nodes to ``graph.gs``; dtypes come from the model's data input.

    Attributes:
        dtype: the float dtype of the model input (constants are emitted in it).
        options: the graph optimizations in effect.
        checks: ``(relevance value, forward value)`` pairs whose shapes must agree; verified by
            the compiler after shape inference on the result.
    """

    def __init__(self, graph: Graph, options: Optimizations | None = None) -> None:
        self.graph = graph
        self.options = options or Optimizations()
        self.gs = graph.gs
        self.dtype = graph.dtype(graph.data_input)
        self._taken: set[str] = set(graph.tensors) | {str(n.name) for n in self.gs.nodes}
        self._scope = ""
        self._cache: dict[Any, gs.Constant] = {}
        self.checks: list[tuple[gs.Tensor, gs.Tensor]] = []
        #: ``{z: relu(z)}`` for denominators stabilized through their ReLU output
        #: (:func:`lrp_onnx.emit.relevance_support.relu_covers`); set by the compiler before
        #: emitting.
        self.relu_covers: dict[str, gs.Tensor] = {}
        #: ``{relevance: (value, t)}``: the relevance tensor is ``value * t`` exactly, with ``t``
        #: a tensor or a function emitting it on first use (the gradient form, see
        #: :meth:`factored`).
        self._factors: dict[str, tuple[str, gs.Tensor | Callable[[], gs.Tensor]]] = {}

    # -- naming ------------------------------------------------------------------------------
    @contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Name everything emitted inside the block ``lrp/<name>/...``."""
        old, self._scope = self._scope, name
        try:
            yield
        finally:
            self._scope = old

    def name(self, tag: str) -> str:
        """A fresh unique name ``lrp/<scope>/<tag>`` (``_1``, ``_2``... on repeats)."""
        base = f"lrp/{self._scope}/{tag}" if self._scope else f"lrp/{tag}"
        name, k = base, 0
        while name in self._taken:
            k += 1
            name = f"{base}_{k}"
        self._taken.add(name)
        return name

    # -- emitting ----------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: gs.Tensor | None, tag: str | None = None,
           outputs: int = 1, **attrs: Any) -> Any:
        """Emit one node; returns its output (or a list when ``outputs > 1``).

        ``None`` inputs become ONNX's empty optional input. Attribute names are the spec's.
        """
        tag = tag or op_type
        node_name = self.name(tag)
        ins = [gs.Variable.empty() if t is None else t for t in inputs]
        outs = [gs.Variable(node_name if i == 0 else f"{node_name}:{i}") for i in range(outputs)]
        for o in outs[1:]:
            self._taken.add(o.name)
        node = gs.Node(op=op_type, name=node_name, attrs=dict(attrs), inputs=ins, outputs=outs)
        self.gs.nodes.append(node)
        return outs[0] if outputs == 1 else outs

    def const(self, array: np.ndarray, tag: str, dtype: Any = None) -> gs.Constant:
        """A new initializer holding ``array`` (cast to ``dtype`` or the model dtype if float)."""
        arr = np.asarray(array)
        if dtype is not None:
            arr = arr.astype(dtype)
        elif np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(self.dtype)
        return gs.Constant(self.name(tag), np.ascontiguousarray(arr))

    def scalar(self, value: float, dtype: Any = None) -> gs.Constant:
        """A cached 0-d constant in the model dtype (or ``dtype``), shared by all layers."""
        dt = np.dtype(dtype or self.dtype)
        key = ("scalar", float(value), dt.str)
        if key not in self._cache:
            old, self._scope = self._scope, ""
            self._cache[key] = self.const(np.array(value, dtype=dt), f"const/{value:g}", dt)
            self._scope = old
        return self._cache[key]

    def ints(self, values: list[int] | tuple[int, ...]) -> gs.Constant:
        """A cached 1-d int64 constant (shapes, axes, split sizes)."""
        key = ("ints", tuple(int(v) for v in values))
        if key not in self._cache:
            old, self._scope = self._scope, ""
            tag = "const/i64_" + "_".join(str(v).replace("-", "m") for v in key[1])
            self._cache[key] = self.const(np.asarray(key[1], dtype=np.int64), tag, np.int64)
            self._scope = old
        return self._cache[key]

    def cached(self, key: Any, make: Any) -> gs.Constant:
        """Return the constant stored under ``key``, creating it with ``make()`` once."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def reshape_like(self, value: gs.Tensor, like: gs.Tensor, tag: str = "reshape") -> gs.Tensor:
        """``Reshape(value, shape of like)`` with a constant shape (``-1`` for the batch)."""
        dims = self.graph.shape(like)
        shape = [-1 if d is None else d for d in dims]
        if shape.count(-1) > 1:
            return self.op("Reshape", value, self.op("Shape", like, tag=f"{tag}/shape"), tag=tag)
        return self.op("Reshape", value, self.ints(shape), tag=tag)

    def zeros_like(self, value: gs.Tensor, tag: str = "zeros") -> gs.Tensor:
        """Zeros shaped like ``value`` at run time (``Where(false, value, 0)``: no NaN from
        ``0 * inf``, no Shape/ConstantOfShape that an EP may place on the CPU)."""
        return self.filled_like(value, self.scalar(0.0), tag=tag)

    def filled_like(self, value: gs.Tensor, fill: gs.Tensor, tag: str) -> gs.Tensor:
        """``fill`` broadcast to the shape of ``value`` at run time (``Where(false, value,
        fill)``; ``value``'s numbers are never read)."""
        false = self.cached(("false",), lambda: gs.Constant("lrp/const/false",
                                                            np.array(False)))
        return self.op("Where", false, value, fill, tag=tag)

    def first_sample(self, value: gs.Tensor, tag: str) -> gs.Tensor:
        """``value[:1]``: one sample, for constants shaped like a sample whose size is known
        only at run time."""
        return self.op("Slice", value, self.ints([0]), self.ints([1]), self.ints([0]), tag=tag)

    # -- the gradient form ------------------------------------------------------------------
    def factored(self, r: gs.Tensor, value: gs.Tensor,
                 t: gs.Tensor | Callable[[], gs.Tensor]) -> gs.Tensor:
        """Record that the relevance ``r`` is ``value * t`` (``t`` a tensor, or a function that
        emits it when first asked for); returns ``r``. An ε-rule with ``ε = 0`` at ``value``
        then reads ``t`` as ``r / value`` (:func:`lrp_onnx.emit.denominators.divide`): the
        relevance pass runs as a modified gradient, without divisions."""
        self._factors[r.name] = (value.name, t)
        return r

    def later(self, make: Callable[[], gs.Tensor]) -> Callable[[], gs.Tensor]:
        """``make`` to be called later, in the scope that is current now."""
        scope = self._scope

        def run() -> gs.Tensor:
            old, self._scope = self._scope, scope
            try:
                return make()
            finally:
                self._scope = old

        return run

    def factor(self, r: gs.Tensor, value: gs.Tensor) -> gs.Tensor | None:
        """``t`` where ``r`` was recorded as ``value * t``, else ``None``."""
        found = self._factors.get(r.name)
        if found is None or found[0] != value.name:
            return None
        t = found[1]
        if callable(t):
            t = t()
            self._factors[r.name] = (value.name, t)
        return t

    def has_factor(self, r: gs.Tensor, value: gs.Tensor) -> bool:
        """Whether ``r`` was recorded as ``value * t`` (without emitting ``t``)."""
        found = self._factors.get(r.name)
        return found is not None and found[0] == value.name

    def expect_shape(self, rel: gs.Tensor, like: gs.Tensor) -> None:
        """Record that ``rel`` must have the shape of ``like`` (checked after compilation)."""
        self.checks.append((rel, like))
