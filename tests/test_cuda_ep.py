"""The CUDA path, checked on a machine without a GPU.

* Every compiled graph (the model's own nodes and every emitted one, each composite, with and
  without the optimizations, random CNNs of the fuzzer) stays inside onnxruntime's registered
  CUDA kernels (``cuda_kernels.cuda_gaps``): no node would be placed on the CPU under the CUDA EP.
* ``make_session(device="cuda", strict_device=True)`` builds the configuration the GPU checks use
  (CUDA EP only, ``use_tf32=0``, ``session.disable_cpu_ep_fallback=1``), and on a machine where
  CUDA cannot load it refuses to run rather than silently running on the CPU.

``scripts/gpu_check.py`` runs the same sessions on a real GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrp_onnx as L
from conftest import MODELS
from cuda_kernels import cuda_gaps
from lrp_onnx import runtime
from lrp_onnx.errors import LRPError
from lrp_onnx.testing import fuzzing
from lrp_onnx.testing.references import IR_VERSION, OPSET
from test_optimizations import COMPOSITES, _test_model


def _model(which: str) -> onnx.ModelProto:
    if which in ("geometry", "residual"):
        return _test_model(which, np.random.default_rng(0))[0]
    return onnx.load(str(MODELS / f"{which}.onnx"))


@pytest.mark.parametrize("plain", [False, True], ids=["optimized", "plain"])
@pytest.mark.parametrize("composite", sorted(COMPOSITES))
@pytest.mark.parametrize("which", ["seed_vgg", "digits_cnn", "geometry", "residual"])
def test_compiled_graph_has_cuda_kernels(which: str, composite: str, plain: bool) -> None:
    compiled = L.compile(_model(which), COMPOSITES[composite](),
                         optimizations=L.Optimizations.none() if plain else None)
    assert any(n.name.startswith("lrp/") for n in compiled.graph.node)
    assert cuda_gaps(compiled) == []


def test_fuzzed_graphs_have_cuda_kernels() -> None:
    compiled = 0
    for seed in range(40):
        net = fuzzing.random_cnn(np.random.default_rng(seed))
        try:
            model = L.compile(net.onnx_model(None), net.composite())
        except LRPError:
            continue
        compiled += 1
        assert cuda_gaps(model) == [], f"seed {seed}"
    assert compiled >= 30


def _one_node(op: str, inputs: list[onnx.ValueInfoProto], attrs: dict[str, Any] | None = None,
              inits: list[onnx.TensorProto] | None = None, domain: str = "",
              extra_inputs: list[str] | None = None) -> onnx.ModelProto:
    names = [i.name for i in inputs] + (extra_inputs or [])
    node = helper.make_node(op, names, ["y"], f"the_{op.lower()}", domain=domain,
                            **(attrs or {}))
    graph = helper.make_graph([node], "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.UNDEFINED, None)],
                              inits or [])
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(domain, 1)] if domain
                                                  else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)


def test_the_check_finds_what_cuda_lacks() -> None:
    f = helper.make_tensor_value_info
    # No CUDA kernel at all (MaxUnpool is CPU-only in onnxruntime).
    unpool = _one_node("MaxUnpool", [f("x", TensorProto.FLOAT, [1, 1, 2, 2]),
                                     f("i", TensorProto.INT64, [1, 1, 2, 2])],
                       {"kernel_shape": [2, 2], "strides": [2, 2]})
    assert cuda_gaps(unpool) == ["the_maxunpool (MaxUnpool): no CUDA kernel for version 11"]
    # A kernel, but not for this type: Where's CUDA kernel takes no int8.
    where = _one_node("Where", [f("c", TensorProto.BOOL, [4]), f("a", TensorProto.INT8, [4]),
                                f("b", TensorProto.INT8, [4])])
    gaps = cuda_gaps(where)
    assert len(gaps) == 3 and all("is int8" in g for g in gaps), gaps  # a, b and y
    # The same node on float is covered.
    ok = _one_node("Where", [f("c", TensorProto.BOOL, [4]), f("a", TensorProto.FLOAT, [4]),
                             f("b", TensorProto.FLOAT, [4])])
    assert cuda_gaps(ok) == []
    # An initializer's type counts too: OneHot's CUDA values are float/float16/int64 only.
    onehot = _one_node("OneHot", [f("k", TensorProto.INT64, [3])],
                       inits=[numpy_helper.from_array(np.array(4, np.int64), "depth"),
                              numpy_helper.from_array(np.array([0, 1], np.float64), "values")],
                       extra_inputs=["depth", "values"])
    assert any("values is double" in g for g in cuda_gaps(onehot)), cuda_gaps(onehot)
    # Another domain's op is not in the table.
    custom = _one_node("Mine", [f("x", TensorProto.FLOAT, [4])], domain="my.domain")
    assert cuda_gaps(custom) == ["the_mine (Mine): domain 'my.domain'"]


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, Any]]:
    """``onnxruntime.InferenceSession`` replaced by a recorder of (options, providers)."""
    import onnxruntime as ort

    calls: list[tuple[Any, Any]] = []

    def record(model: Any, opts: Any, providers: Any) -> str:
        calls.append((opts, providers))
        return "session"

    monkeypatch.setattr(ort, "InferenceSession", record)
    return calls


def test_strict_cuda_configuration(recorded: list[tuple[Any, Any]],
                                   seed_model_path: Any) -> None:
    runtime.make_session(seed_model_path, device="cuda", strict_device=True)
    runtime.make_session(seed_model_path, device="cuda")
    runtime.make_session(seed_model_path, device="cpu", strict_device=True)
    (strict, strict_p), (loose, loose_p), (cpu, cpu_p) = recorded
    assert strict_p == [(runtime.CUDA, {"use_tf32": 0})]
    assert strict.get_session_config_entry("session.disable_cpu_ep_fallback") == "1"
    assert loose_p == [(runtime.CUDA, {"use_tf32": 0}), runtime.CPU]
    with pytest.raises(RuntimeError, match="does not have configuration"):
        loose.get_session_config_entry("session.disable_cpu_ep_fallback")
    assert cpu_p == [runtime.CPU]  # a strict CPU session keeps its only provider


def test_auto_picks_cuda_only_with_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: [runtime.CUDA, runtime.CPU])
    monkeypatch.setattr(runtime, "_gpu_present", lambda: True)
    assert runtime.default_providers("auto")[0] == (runtime.CUDA, {"use_tf32": 0})
    monkeypatch.setattr(runtime, "_gpu_present", lambda: False)
    assert runtime.default_providers("auto") == [runtime.CPU]
    with pytest.raises(ValueError, match="device must be"):
        runtime.default_providers("gpu")


def test_strict_cuda_session_runs_on_cuda_or_refuses(seed_model_path: Any) -> None:
    """Where CUDA loads, every node runs on it and agrees with the CPU; where it cannot (this
    machine), the strict session refuses instead of falling back to the CPU."""
    compiled = L.compile(str(seed_model_path), L.EpsilonPlusFlat())
    cuda_loads = runtime.make_session(compiled, device="cuda").get_providers()[0] == runtime.CUDA
    if not cuda_loads:
        with pytest.raises(runtime.ort_errors(), match="fallback to CPU EP has been explicitly "
                                                       "disabled"):
            runtime.make_session(compiled, device="cuda", strict_device=True)
        return
    x = np.load(MODELS / "seed_vgg_input.npy")
    feeds = {compiled.graph.input[0].name: x, "target": np.full(len(x), -1, np.int64)}
    on_gpu = runtime.make_session(compiled, device="cuda", strict_device=True)
    got = on_gpu.run(["relevance"], feeds)[0]
    ref = runtime.make_session(compiled, device="cpu").run(["relevance"], feeds)[0]
    assert np.linalg.norm(got - ref) <= 1e-4 * np.linalg.norm(ref)
