"""Lowering of fused ops into the ops relevance rules are written for.

``Attention`` (opset 23+, torch's dynamo exporter emits it for ``scaled_dot_product_attention``)
becomes the computation its ONNX function body spells out: ``Q √scale · (Kᵀ √scale)``, an
additive mask, ``Softmax``, ``· V``. AttnLRP's and CP-LRP's rules are local to these ops, so the
lowered graph gets exactly the rules of an attention exported without the fused op. The forward
outputs then come from the lowered ops: equal to the fused kernel's up to float rounding (the
only pass that changes how a value is computed; every other pass only renames and annotates).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lrp_onnx.errors import CanonizerError
from lrp_onnx.frontend.load import skeleton


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _shapes_and_types(model: onnx.ModelProto
                      ) -> tuple[dict[str, list[int | None]], dict[str, int]]:
    """Static shapes (``None`` for unknown dims) and element types of every value."""
    inferred = onnx.shape_inference.infer_shapes(skeleton(model), strict_mode=False,
                                                 data_prop=True)
    shapes: dict[str, list[int | None]] = {}
    types: dict[str, int] = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        tt = vi.type.tensor_type
        types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                               for d in tt.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name], types[init.name] = list(init.dims), init.data_type
    return shapes, types


def _refuse(label: str, node: onnx.NodeProto, why: str) -> CanonizerError:
    return CanonizerError(f"{label}: node '{node.name}' (Attention): {why}; export at opset "
                          "20 or lower (torch: opset_version=20) to get the unfused attention")


def _lower(node: onnx.NodeProto, shapes: dict[str, list[int | None]], types: dict[str, int],
           label: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes and constants replacing one ``Attention`` node."""
    a = _attrs(node)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(types.get(node.input[0],
                                                               onnx.TensorProto.FLOAT)))
    ins = list(node.input) + [""] * (7 - len(node.input))
    q, k, v, mask, past_k, past_v, nonpad = ins[:7]
    if past_k or past_v or nonpad:
        raise _refuse(label, node, "a key/value cache (past_key, past_value, nonpad_kv_seqlen) "
                      "is not supported")
    if any(o for o in node.output[1:]):
        raise _refuse(label, node, "the present_key/present_value/qk_matmul_output outputs "
                      "are not supported")
    if float(a.get("softcap", 0.0)) != 0.0:  # type: ignore[arg-type]
        raise _refuse(label, node, "softcap is not supported")
    if int(a.get("qk_matmul_output_mode", 0)) != 0:  # type: ignore[call-overload]
        raise _refuse(label, node, "qk_matmul_output_mode is not supported")
    qs, ks, vs = (shapes.get(t) for t in (q, k, v))
    if qs is None or ks is None or vs is None or not len(qs) == len(ks) == len(vs) == 4:
        raise _refuse(label, node, "only 4-D Q, K, V ([batch, heads, sequence, head size]) "
                      "are supported")
    if qs[1] is None or qs[1] != ks[1] or ks[1] != vs[1]:
        raise _refuse(label, node, "grouped-query attention (fewer key/value heads than "
                      "query heads) or a head count known only at run time is not supported")
    head = qs[3]
    if head is None:
        raise _refuse(label, node, "the head size is known only at run time")
    scale = float(a["scale"]) if "scale" in a else 1.0 / math.sqrt(head)  # type: ignore[arg-type]
    p = f"{node.name}/lowered"
    consts = [numpy_helper.from_array(np.asarray(math.sqrt(scale), dtype=dtype), f"{p}/sqrt_scale")]
    nodes = [
        helper.make_node("Transpose", [k], [f"{p}/kT"], name=f"{p}/kT", perm=[0, 1, 3, 2]),
        helper.make_node("Mul", [q, f"{p}/sqrt_scale"], [f"{p}/q_scaled"], name=f"{p}/q_scaled"),
        helper.make_node("Mul", [f"{p}/kT", f"{p}/sqrt_scale"], [f"{p}/kT_scaled"],
                         name=f"{p}/kT_scaled"),
        helper.make_node("MatMul", [f"{p}/q_scaled", f"{p}/kT_scaled"], [f"{p}/scores"],
                         name=f"{p}/scores"),
    ]
    scores = f"{p}/scores"
    bias: str | None = None
    if mask:
        if shapes.get(mask) is None:
            raise _refuse(label, node, "the attention mask's rank is unknown")
        bias = mask
        # a boolean mask keeps True: the additive form is 0 where True, -inf where False
        if mask not in types:
            raise _refuse(label, node, f"the element type of the mask '{mask}' is unknown")
        if types[mask] == onnx.TensorProto.BOOL:
            consts += [numpy_helper.from_array(np.asarray(0.0, dtype=dtype), f"{p}/zero"),
                       numpy_helper.from_array(np.asarray(-np.inf, dtype=dtype), f"{p}/neg_inf")]
            nodes.append(helper.make_node("Where", [mask, f"{p}/zero", f"{p}/neg_inf"],
                                          [f"{p}/mask_bias"], name=f"{p}/mask_bias"))
            bias = f"{p}/mask_bias"
    if int(a.get("is_causal", 0)):  # type: ignore[call-overload]
        n_q, n_k = qs[2], ks[2]
        if n_q is None or n_k is None:
            raise _refuse(label, node, "is_causal with sequence lengths known only at run time")
        causal = np.where(np.tril(np.ones((n_q, n_k), dtype=bool)), 0.0, -np.inf).astype(dtype)
        consts.append(numpy_helper.from_array(causal, f"{p}/causal"))
        if bias is None:
            bias = f"{p}/causal"
        else:
            nodes.append(helper.make_node("Add", [bias, f"{p}/causal"], [f"{p}/mask_all"],
                                          name=f"{p}/mask_all"))
            bias = f"{p}/mask_all"
    if bias is not None:
        nodes.append(helper.make_node("Add", [scores, bias], [f"{p}/masked"], name=f"{p}/masked"))
        scores = f"{p}/masked"
    nodes += [
        helper.make_node("Softmax", [scores], [f"{p}/weights"], name=f"{p}/softmax", axis=-1),
        helper.make_node("MatMul", [f"{p}/weights", v], [node.output[0]], name=f"{p}/context"),
    ]
    return nodes, consts


def lower_attention(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    """Replace every ``Attention`` node (opset 23+) by its unfused computation."""
    if not any(n.op_type == "Attention" and n.domain in ("", "ai.onnx")
               for n in model.graph.node):
        return model
    shapes, types = _shapes_and_types(model)
    kept: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            kept.append(node)
            continue
        nodes, consts = _lower(node, shapes, types, label)
        kept += nodes
        model.graph.initializer.extend(consts)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model
