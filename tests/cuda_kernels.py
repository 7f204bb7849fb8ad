"""Which nodes of a model ONNX Runtime's CUDA execution provider has no kernel for.

A static check that runs on any machine: under the CUDA EP a node without a CUDA kernel for its
op version and input/output types is placed on the CPU (with copies to and from the GPU), and a
session with ``session.disable_cpu_ep_fallback=1`` refuses the model. The table
(``ort_cuda_kernels.json``) is onnxruntime's own list of registered CUDA kernels
(``docs/OperatorKernels.md``, generated from the kernel registrations; source commit in the
file). ``scripts/gpu_check.py`` is the check on a real GPU; this one keeps every compiled graph
inside the table between GPU runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import onnx

from lrp_onnx.frontend.load import default_opset, skeleton

TABLE: dict[str, list[dict]] = json.loads(
    (Path(__file__).with_name("ort_cuda_kernels.json")).read_text())["ops"]


def _dtypes(model: onnx.ModelProto) -> dict[str, str]:
    inferred = onnx.shape_inference.infer_shapes(skeleton(model))
    g = inferred.graph
    out = {vi.name: vi.type.tensor_type.elem_type
           for vi in [*g.input, *g.output, *g.value_info] if vi.type.HasField("tensor_type")}
    out.update({t.name: t.data_type for t in model.graph.initializer})
    return {k: onnx.TensorProto.DataType.Name(v).lower() for k, v in out.items() if v}


def cuda_gaps(model: onnx.ModelProto) -> list[str]:
    """One line per node the CUDA EP has no kernel for: op version or a type outside its row."""
    opset = default_opset(model)
    dtypes = _dtypes(model)
    gaps = []
    for node in model.graph.node:
        label = f"{node.name or '?'} ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            gaps.append(f"{label}: domain {node.domain!r}")
            continue
        schema = onnx.defs.get_schema(node.op_type, opset)
        version = schema.since_version
        row = next((r for r in TABLE.get(node.op_type, [])
                    if r["since"] <= version <= (r["until"] or math.inf)), None)
        if row is None:
            gaps.append(f"{label}: no CUDA kernel for version {version}")
            continue
        for formals, actuals in ((schema.inputs, node.input), (schema.outputs, node.output)):
            for i, name in enumerate(actuals):
                if not name or not formals:
                    continue
                var = formals[min(i, len(formals) - 1)].type_str  # the last one may be variadic
                allowed = row["types"].get(var)
                if allowed is not None and name in dtypes and dtypes[name] not in allowed:
                    gaps.append(f"{label}: {name} is {dtypes[name]}, CUDA kernel takes "
                                f"{var} in {allowed}")
    return gaps
