"""The reverse walk: seed relevance at the target logit (or with the given ``output_relevance``),
call each layer's emitter from the last layer to the first, accumulate at fan-out, and attach
``target``/``output_relevance`` and ``relevance`` to the model."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from lrp_onnx.dtypes import float_dtype
from lrp_onnx.emit import ops  # noqa: F401  (fills the op registry)
from lrp_onnx.emit.builder import Builder
from lrp_onnx.emit.contract import (
    AUDIT_PREFIX,
    OUTPUT_RELEVANCE,
    RECORD_KEY,
    RELEVANCE,
    RELEVANCE_EMBEDDING,
    SEED_OUTPUT_RELEVANCE,
    TARGET,
    TARGET_POSITION,
    _drop_contract_io,
    class_axis,
    per_layer_name,
    seed_input,
)
from lrp_onnx.emit.optimizations import Optimizations
from lrp_onnx.emit.registry import OpSpec, resolve_entries
from lrp_onnx.emit.relevance_support import relu_covers
from lrp_onnx.errors import RuleNotApplicable, UnsupportedModel, node_label
from lrp_onnx.frontend.graph import Graph
from lrp_onnx.frontend.layers import Layer
from lrp_onnx.frontend.load import run_onnx_checker, shape_inference_error, skeleton
from lrp_onnx.rules.core import Rule
from lrp_onnx.version import __version__


def _seed(b: Builder, graph: Graph, target: gs.Variable, position: gs.Variable | None,
          normalize: bool) -> gs.Tensor:
    """One-hot (value 1, or the logit itself) at ``target``; ``target < 0`` picks the argmax.
    A sequence output ``[N, T, V]`` is seeded at ``position`` (``< 0`` counts from the end):
    the target is picked among that position's logits, every other position gets 0. A 4-D head
    ``[N, K, 1, 1]`` is seeded as ``[N, K]`` (the one-hot built on the flattened logits and
    unsqueezed back)."""
    logits = graph.logits
    shape = graph.shape(logits)
    axis = class_axis(shape) if position is None else len(shape) - 1
    head = position is None and axis == 1 and len(shape) > 2  # [N, K, 1, ...]
    if (len(shape) != (3 if position is not None else 2) and not head) or shape[axis] is None:
        raise UnsupportedModel(
            f"{graph.label}: the explained value '{logits.name}' has shape {logits.shape}; "
            "a [batch, classes], [batch, classes, 1, 1] or [batch, positions, classes] output "
            "with a static class count is required"
        )
    classes = int(shape[axis])  # type: ignore[arg-type]
    with b.scope("seed"):
        scores, at = logits, None
        if head:
            scores = b.op("Flatten", logits, tag="scores", axis=1)
        if position is not None:
            length = b.op("Shape", logits, tag="length", start=1, end=2)
            fixed = b.op("Where", b.op("Less", position, b.scalar(0, np.int64), tag="from_end"),
                         b.op("Add", position, length, tag="counted"), position, tag="position")
            index = b.op("Expand", b.op("Unsqueeze", fixed, b.ints([1, 2]), tag="index"),
                         b.op("Concat", b.op("Shape", logits, tag="n", start=0, end=1),
                              b.ints([1, classes]), tag="index_shape", axis=0), tag="indices")
            scores = b.op("Squeeze", b.op("GatherElements", logits, index, tag="pick", axis=1),
                          b.ints([1]), tag="scores")
            at = _onehot(b, fixed, length, "at")
        best = b.op("ArgMax", scores, tag="argmax", axis=1, keepdims=0)
        chosen = b.op("Where", b.op("Less", target, b.scalar(0, np.int64), tag="auto"), best,
                      target, tag="target")
        onehot = _onehot(b, chosen, b.ints([classes]), "onehot")
        if head:
            onehot = b.op("Unsqueeze", onehot, b.ints(list(range(2, len(shape)))),
                          tag="onehot/expand")
        if at is not None:
            onehot = b.op("Mul", b.op("Unsqueeze", at, b.ints([2]), tag="at/expand"),
                          b.op("Unsqueeze", onehot, b.ints([1]), tag="onehot/expand"),
                          tag="onehot/sequence")
        if normalize:
            return onehot
        return b.factored(b.op("Mul", onehot, logits, tag="logit"), logits, onehot)


def _onehot(b: Builder, index: gs.Tensor, depth: gs.Tensor, tag: str) -> gs.Tensor:
    """``OneHot(index, depth)`` in the model's float type (ORT implements OneHot for float32
    values only: built there, cast)."""
    values = b.const(np.array([0.0, 1.0]), "onehot_values", np.float32)
    onehot = b.op("OneHot", index, depth, values, tag=tag, axis=-1)
    if b.dtype != np.float32:
        onehot = b.op("Cast", onehot, tag=f"{tag}_cast",
                      to=int(onnx.helper.np_dtype_to_tensor_dtype(b.dtype)))
    return onehot


def _explicit_seed(b: Builder, graph: Graph) -> tuple[gs.Variable, gs.Tensor]:
    """The ``output_relevance`` input (shaped like the explained output, its dtype, dynamic dims
    kept) and the seed it gives at the logits (a stripped Softmax head keeps the shape)."""
    explained, logits = graph.explained, graph.logits
    if not float_dtype(explained):
        raise UnsupportedModel(f"{graph.label}: the explained output '{explained.name}' is not a "
                               f"float tensor ({explained.dtype}); output_relevance needs one")
    shape, at = graph.shape(explained), graph.shape(logits)
    if len(shape) != len(at) or any(a is not None and c is not None and a != c
                                    for a, c in zip(shape, at)):
        raise UnsupportedModel(f"{graph.label}: the explained output '{explained.name}' has "
                               f"shape {shape} but relevance starts at '{logits.name}' of shape "
                               f"{at}; output_relevance needs them equal")
    seed_in = gs.Variable(OUTPUT_RELEVANCE, dtype=explained.dtype, shape=list(explained.shape))
    graph.gs.inputs.append(seed_in)
    seed: gs.Tensor = seed_in
    if np.dtype(explained.dtype) != b.dtype:
        with b.scope("seed"):
            seed = b.op("Cast", seed, tag="cast",
                        to=int(onnx.helper.np_dtype_to_tensor_dtype(b.dtype)))
    return seed_in, seed


def _sum(b: Builder, values: list[gs.Tensor], tag: str, at: gs.Tensor | None = None
         ) -> gs.Tensor:
    """The relevances ``values`` arriving at ``at`` summed; where each is ``at * t_k``, the sum
    is recorded as ``at * sum_k t_k`` (the gradient form)."""
    if len(values) == 1:
        return values[0]
    total = b.op("Sum", *values, tag=tag)
    if at is not None and all(b.has_factor(v, at) for v in values):
        b.factored(total, at, b.later(lambda: b.op(
            "Sum", *(b.factor(v, at) for v in values), tag=f"{tag}/g")))
    return total


def _route_factors(b: Builder, layer: Layer, rule: Rule, entry: OpSpec,
                   r_outs: list[gs.Tensor | None], r_ins: Sequence[gs.Tensor | None]) -> None:
    """A layer that only moves values sends ``x * route(g)`` where it got ``y * g``: record
    each input's relevance so, emitting ``route(g)`` (the emitter run on ``g``) only when an
    ε = 0 rule upstream asks for it."""
    outputs = layer.outputs if entry.multi_output else (layer.output,)
    if not any(r_outs) or not all(r is None or b.has_factor(r, y)
                                  for r, y in zip(r_outs, outputs)):
        return
    memo: list[Sequence[gs.Tensor | None]] = []

    def routed() -> Sequence[gs.Tensor | None]:
        if not memo:
            gs_ = [None if r is None else b.factor(r, y) for r, y in zip(r_outs, outputs)]
            with b.scope(layer.name):
                memo.append(entry.emit(b, layer, rule,  # type: ignore[misc]
                                       gs_ if entry.multi_output else gs_[0]))
        return memo[0]

    for k, (x, r) in enumerate(zip(layer.inputs, r_ins)):
        if r is not None:
            b.factored(r, x, lambda k=k: routed()[k])  # type: ignore[misc]


def _add_output(graph: Graph, value: gs.Tensor, name: str, like: gs.Tensor) -> None:
    if name in graph.tensors:
        raise UnsupportedModel(f"{graph.label}: the model already has a value named '{name}', "
                               "which the per-layer outputs need")
    # the shape ONNX inference or the run-time shape facts give (a graph output needs one)
    out = gs.Variable(name, dtype=like.dtype, shape=list(graph.shape(like)))
    graph.gs.nodes.append(gs.Node("Identity", name=f"lrp/{name}", inputs=[value], outputs=[out]))
    graph.gs.outputs.append(out)


def compile_layers(graph: Graph, layers: Sequence[Layer], rules: Sequence[Rule], *,
                   normalize_output_relevance: bool = True,
                   model_meta: onnx.ModelProto | None = None,
                   optimizations: Optimizations | None = None,
                   per_layer: bool = False, audit: bool = False,
                   output_relevance: bool = False,
                   embedding_relevance: bool = False) -> onnx.ModelProto:
    """Emit the relevance pass for ``layers`` with ``rules`` (aligned) into ``graph``.

    Returns the compiled ``ModelProto``: original inputs plus ``target`` (int64 ``[N]``) or,
    with ``output_relevance``, plus ``output_relevance`` (shape and dtype of the explained
    output: the seed as given, ``normalize_output_relevance`` does not apply), original outputs
    plus ``relevance`` (shape and dtype of the data input; for token ids: per token, and with
    ``embedding_relevance`` also ``relevance_embedding``). A sequence output ``[N, T, V]``
    adds the input ``target_position`` (int64 ``[N]``) beside ``target``. ``per_layer``
    adds the relevance each layer sends to each of its inputs as outputs (names from
    :func:`per_layer_name`, first layer first, after ``relevance``); ``audit`` (used by
    :mod:`lrp_onnx.check`) also adds, per layer, the relevance arriving at its output.
    """
    entries = resolve_entries(layers, rules, graph.label, graph.opset, graph.shape)
    if output_relevance and not normalize_output_relevance:
        raise UnsupportedModel(
            f"{graph.label}: normalize_output_relevance=False (the logit seed) does not apply "
            "with output_relevance=True, whose seed is used as given; multiply it by the "
            "output yourself")
    if embedding_relevance and graph.embedding is None:
        raise UnsupportedModel(f"{graph.label}: embedding_relevance applies to a model explained "
                               f"at token ids; '{graph.data_input.name}' is a float input")
    seed_name = OUTPUT_RELEVANCE if output_relevance else TARGET
    for name in (seed_name, RELEVANCE, TARGET_POSITION, RELEVANCE_EMBEDDING):
        if name in graph.tensors:
            raise UnsupportedModel(f"{graph.label}: the model already has a value named "
                                   f"'{name}', which the compiled model's contract reserves")
    b = Builder(graph, optimizations)
    for layer, rule in zip(layers, rules):  # hyper-parameters the model's float type can hold
        problem = rule.dtype_problem(b.dtype)
        if problem is not None:
            raise RuleNotApplicable(f"{rule!r} on layer {layer.index + 1} "
                                    f"{node_label(layer.name, layer.kind)}: {problem}")
    if b.options.relu_denominators:
        b.relu_covers = relu_covers(graph, layers, rules)
    batch = graph.fed_input.shape[0]
    if output_relevance:
        seed = _explicit_seed(b, graph)[1]
    else:
        target = gs.Variable(TARGET, dtype=np.int64, shape=[batch])
        graph.gs.inputs.append(target)
        position = None
        if len(graph.shape(graph.logits)) == 3:
            position = gs.Variable(TARGET_POSITION, dtype=np.int64, shape=[batch])
            graph.gs.inputs.append(position)
        seed = _seed(b, graph, target, position, normalize_output_relevance)

    pending: dict[str, list[gs.Tensor]] = {graph.logits.name: [seed]}
    # per-layer outputs: (layer index, value, output name, shape like)
    extra: list[tuple[int, gs.Tensor, str, gs.Tensor]] = []
    for layer, rule, entry in zip(reversed(layers), reversed(rules), reversed(entries)):
        outputs = layer.outputs if entry.multi_output else (layer.output,)
        arrived = [pending.pop(t.name, None) for t in outputs]
        if not any(arrived):
            continue  # symbolic zero: nothing reaches this layer, so nothing is emitted
        assert entry.emit is not None  # resolve_entries returns specs with emitters only
        with b.scope(layer.name):
            r_outs = [_sum(b, a, f"R_out{i}" if i else "R_out", y) if a else None
                      for i, (a, y) in enumerate(zip(arrived, outputs))]
            r_ins = entry.emit(b, layer, rule, r_outs if entry.multi_output else r_outs[0])
        if entry.routes:
            _route_factors(b, layer, rule, entry, r_outs, r_ins)
        if len(r_ins) != len(layer.inputs):
            raise AssertionError(f"emitter for {layer.kind} returned {len(r_ins)} relevances "
                                 f"for {len(layer.inputs)} inputs")
        if audit:
            for i, r_out in enumerate(r_outs):
                if r_out is not None:
                    suffix = f"_{i + 1}" if entry.multi_output else ""
                    extra.append((layer.index, r_out, f"{AUDIT_PREFIX}{layer.index + 1}{suffix}",
                                  outputs[i]))
        for k, (x, r) in enumerate(zip(layer.inputs, r_ins)):
            if r is not None:
                b.expect_shape(r, x)
                pending.setdefault(x.name, []).append(r)
                if per_layer or audit:
                    extra.append((layer.index, r, per_layer_name(layer, k, len(layer.inputs)), x))

    x = graph.data_input
    reached = pending.pop(x.name, [])
    with b.scope("output"):
        if reached:
            final = _sum(b, reached, "sum")
        else:  # no path carries relevance (all rules absorb it): an explicit zero map
            final = b.op("Mul", b.op("Cast", x, to=onnx.TensorProto.BOOL, tag="nz"),
                         b.scalar(0.0), tag="zero")
    if graph.embedding is not None:
        _token_outputs(b, graph, final, embedding_relevance)
    else:
        out = gs.Variable(RELEVANCE, dtype=x.dtype, shape=list(x.shape))
        graph.gs.nodes.append(gs.Node("Identity", name="lrp/relevance", inputs=[final],
                                      outputs=[out]))
        graph.gs.outputs.append(out)
    for _, value, name, like in sorted(extra, key=lambda e: e[0]):  # stable: first layer first
        _add_output(graph, value, name, like)
    _drop_unread(graph)

    model = _export(graph, model_meta, layers, rules, normalize_output_relevance,
                    output_relevance)
    _check(model, graph, b)
    return model


def _token_outputs(b: Builder, graph: Graph, final: gs.Tensor, embedding_relevance: bool
                   ) -> None:
    """``relevance`` per token (the embedding relevance summed over the hidden axis, shaped
    like the ids) and, with ``embedding_relevance``, ``relevance_embedding``."""
    emb = graph.embedding
    assert emb is not None
    with b.scope("output"):
        per_token = b.op("ReduceSum", final, b.ints([-1]), tag="tokens", keepdims=0)
        if emb.moved:
            per_token = b.op("Reshape", per_token, b.op("Shape", emb.ids, tag="ids_shape"),
                             tag="tokens/reshape")
    outputs = [(RELEVANCE, per_token, emb.ids)]
    if embedding_relevance:
        outputs.append((RELEVANCE_EMBEDDING, final, emb.output))
    for name, value, like in outputs:
        out = gs.Variable(name, dtype=emb.output.dtype, shape=list(like.shape))
        graph.gs.nodes.append(gs.Node("Identity", name=f"lrp/{name}", inputs=[value],
                                      outputs=[out]))
        graph.gs.outputs.append(out)


def _drop_unread(graph: Graph) -> None:
    """Drop emitted nodes whose results nothing reads (a relevance ``x * s`` that a later layer
    re-derived in another form, see :func:`lrp_onnx.emit.denominators.divide`); the model's own
    nodes stay as they are."""
    outputs = {t.name for t in graph.gs.outputs}
    kept = []
    for node in reversed(graph.gs.nodes):  # emission order is topological: readers come later
        if node.name.startswith("lrp/") and not any(o.outputs or o.name in outputs
                                                    for o in node.outputs):
            node.inputs.clear()
            node.outputs.clear()
            continue
        kept.append(node)
    graph.gs.nodes = kept[::-1]


def _export(graph: Graph, meta: onnx.ModelProto | None, layers: Sequence[Layer],
            rules: Sequence[Rule], normalize: bool, explicit: bool = False) -> onnx.ModelProto:
    """The compiled model, built in the pipeline's private canonicalised copy of the input.

    The nodes are re-exported from the graphsurgeon graph (forward nodes as they were, plus
    the emitted ones); the initializers already in the model stay where they are and only the
    emitted constants are appended, so no weight is copied (``gs.export_onnx`` would copy
    every one).
    """
    model = graph.proto
    g = model.graph
    nodes = [OnnxExporter.export_node(n) for n in graph.gs.nodes]
    for node in nodes:
        props = graph.node_meta.get(node.name)
        if props:
            node.metadata_props.extend(props)
    del g.node[:]
    g.node.extend(nodes)
    have = {t.name for t in g.initializer}
    for tensor in graph.gs.tensors().values():
        if isinstance(tensor, gs.Constant) and tensor.name not in have:
            g.initializer.append(OnnxExporter.export_tensor_proto(tensor))
    for protos, tensors in ((g.input, graph.gs.inputs), (g.output, graph.gs.outputs)):
        present = {vi.name for vi in protos}
        for t in tensors:
            if t.name not in present:
                protos.append(OnnxExporter.export_value_info_proto(t, do_type_check=True))
    if meta is not None:
        del model.opset_import[:]
        model.opset_import.extend(meta.opset_import)
    kept = [p for p in model.metadata_props if p.key != RECORD_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    record = {
        "version": __version__,
        "normalize_output_relevance": normalize,
        "explained_output": graph.explained.name,
        "logits": graph.logits.name,
        "layers": [{"index": la.index + 1, "nodes": list(la.node_names),
                    "rule": r.spelling()}
                   for la, r in zip(layers, rules)],
    }
    # Written only where they say something, so that other models keep their exact bytes.
    if explicit:
        record["seed"] = SEED_OUTPUT_RELEVANCE
    if graph.embedding is not None:
        record["explained_input"] = graph.embedding.ids.name
        record["tokens"] = int(graph.embedding.gather.inputs[0].shape[0])  # the vocabulary
    elif len(graph.float_inputs) > 1:
        record["explained_input"] = graph.data_input.name
    record.update(graph.upgraded_from)  # an old opset / IR upgraded (empty for others)
    entry = model.metadata_props.add()
    entry.key, entry.value = RECORD_KEY, json.dumps(record, sort_keys=True)
    return model


def _check(model: onnx.ModelProto, graph: Graph, b: Builder) -> None:
    """``onnx.checker`` (weights not serialized) and the emitters' shape promises, on the
    compiled model."""
    try:
        run_onnx_checker(model)
    except onnx.checker.ValidationError as exc:  # pragma: no cover - emitter bug
        raise AssertionError(f"compiled model fails onnx.checker: {exc}") from None
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model), strict_mode=True,
                                                     data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        _input_at_fault(model, graph)
        raise AssertionError(f"compiled model fails shape inference: {exc}") from None
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                               for d in vi.type.tensor_type.shape.dim]
    for rel, like in b.checks:
        got = shapes.get(rel.name)
        want = graph.shape(like)
        if got is None:
            continue
        if len(got) != len(want) or any(g is not None and w is not None and g != w
                                        for g, w in zip(got, want)):
            _input_at_fault(model, graph)
            raise AssertionError(f"relevance '{rel.name}' has shape {got}, expected {want} "
                                 f"(shape of '{like.name}')")


def _input_at_fault(model: onnx.ModelProto, graph: Graph) -> None:
    """After a failed check of the compiled model: raise a clean error if the input model's own
    nodes are at fault (it fails strict shape inference, or ONNX Runtime cannot run it on zeros);
    return if the input is sound (the emitted nodes are wrong: an lrp_onnx bug)."""
    # Every node of the input, even unused ones (``strip_compiled`` prunes those, and an
    # unused node can be the one at fault): the emitted nodes are the ``lrp/`` ones.
    original = onnx.ModelProto()
    original.CopyFrom(model)
    g = original.graph
    kept = [n for n in g.node if not n.name.startswith("lrp/")]
    del g.node[:]
    g.node.extend(kept)
    _drop_contract_io(g, seed_input(model))
    error = shape_inference_error(original)
    if error is not None:
        raise UnsupportedModel(f"{graph.label}: fails ONNX shape inference: {error}")
    import onnxruntime as ort

    inits = {t.name for t in g.initializer}
    feeds = {}
    for vi in g.input:  # zeros for every input: the explained one and any other (a mask)
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
                 for d in tt.shape.dim]
        feeds[vi.name] = np.zeros(shape, dtype=onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        session = ort.InferenceSession(original.SerializeToString(), opts,
                                       providers=["CPUExecutionProvider"])
        session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - any failure says the input does not run
        text = " ".join(str(exc).split())[:300]
        raise UnsupportedModel(f"{graph.label}: the input model does not run in ONNX Runtime "
                               f"(its shapes are inconsistent): {text}") from None
