"""The mutation fuzzer: valid models corrupted in their bytes and their protobuf fields.

:func:`mutation_case` corrupts a valid model (bytes: flips, truncation, insertion; protobuf:
dangling names, cycles, dropped initializers, unknown ops and domains, old opsets, integer
inputs, missing batch dims, symbolic or huge dims (symbolic ones run at the base model's
sizes, sometimes + 1-3), NaN weights, bad attributes ...), then compiles and runs it. The
outcome must be a result or an ``LRPError`` whose message is one line naming the file;
anything else is a crash (see :mod:`lrp_onnx.testing.fuzzing` for the outcome types).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lrp_onnx.errors import LRPError, UnsupportedModel
from lrp_onnx.sampling import random_input
from lrp_onnx.testing.fuzzing import Outcome, random_cnn


# -- mutations ----------------------------------------------------------------------------------
def _proto_mutations() -> list[Callable[[onnx.ModelProto, np.random.Generator], None]]:
    def node(m: onnx.ModelProto, rng: np.random.Generator) -> onnx.NodeProto:
        picked: onnx.NodeProto = m.graph.node[int(rng.integers(len(m.graph.node)))]
        return picked

    def dangling(m: onnx.ModelProto, rng: np.random.Generator) -> None:
        n = node(m, rng)
        if n.input:
            n.input[int(rng.integers(len(n.input)))] = "nowhere"

    def cycle(m: onnx.ModelProto, rng: np.random.Generator) -> None:
        if len(m.graph.node) > 1:
            m.graph.node[0].input[0] = m.graph.node[-1].output[0]

    def drop_initializer(m: onnx.ModelProto, rng: np.random.Generator) -> None:
        if m.graph.initializer:
            del m.graph.initializer[int(rng.integers(len(m.graph.initializer)))]

    def unknown_op(m: onnx.ModelProto, rng: np.random.Generator) -> None:
        node(m, rng).op_type = str(rng.choice(["FancyOp", "Softsign", "Erf", "LRN", "Loop"]))

    def domain(m: onnx.ModelProto, rng: np.random.Generator) -> None:
        node(m, rng).domain = "com.example"

    def opset(m: onnx.ModelProto, rng: np.random.Generator) -> None:
        m.opset_import[0].version = int(rng.choice([1, 7, 12, 13, 16, 25, 99]))

    def input_type(m: onnx.ModelProto, rng: np.random.Generator) -> None:
        m.graph.input[0].type.tensor_type.elem_type = int(rng.choice(
            [TensorProto.INT64, TensorProto.BOOL, TensorProto.DOUBLE, TensorProto.FLOAT16,
             TensorProto.STRING, 0]))

    def dims(m: onnx.ModelProto, rng: np.random.Generator) -> None:
        d = m.graph.input[0].type.tensor_type.shape.dim
        choice = int(rng.integers(4))
        if choice == 0 and d:
            del d[0]
        elif choice == 1 and len(d) > 2:
            d[2].dim_param = "H"
        elif choice == 2 and d:
            d[int(rng.integers(len(d)))].dim_value = int(rng.choice([0, 2**40, 7]))
        else:
            d.add().dim_value = 1

    def nan_weights(m: onnx.ModelProto, rng: np.random.Generator) -> None:
        if m.graph.initializer:
            t = m.graph.initializer[int(rng.integers(len(m.graph.initializer)))]
            arr = numpy_helper.to_array(t).copy()
            if arr.dtype.kind == "f" and arr.size:
                arr.flat[int(rng.integers(arr.size))] = rng.choice([np.nan, np.inf, 1e38])
                t.CopyFrom(numpy_helper.from_array(arr, t.name))

    def attribute(m: onnx.ModelProto, rng: np.random.Generator) -> None:
        n = node(m, rng)
        if n.attribute:
            a = n.attribute[int(rng.integers(len(n.attribute)))]
            if a.ints:
                a.ints[int(rng.integers(len(a.ints)))] = int(rng.choice([-1, 0, 5, 99]))
            elif a.type == onnx.AttributeProto.INT:
                a.i = int(rng.choice([-1, 0, 3, 99]))
            else:
                del n.attribute[int(rng.integers(len(n.attribute)))]
        else:
            n.attribute.append(helper.make_attribute("axis", int(rng.integers(-3, 4))))

    def delete_node(m: onnx.ModelProto, rng: np.random.Generator) -> None:
        del m.graph.node[int(rng.integers(len(m.graph.node)))]

    def shuffle(m: onnx.ModelProto, rng: np.random.Generator) -> None:
        nodes = list(m.graph.node)
        order = rng.permutation(len(nodes))
        del m.graph.node[:]
        m.graph.node.extend(nodes[i] for i in order)

    def rewire(m: onnx.ModelProto, rng: np.random.Generator) -> None:
        names = [o for n in m.graph.node for o in n.output] + [m.graph.input[0].name]
        n = node(m, rng)
        if n.input:
            n.input[0] = str(rng.choice(names))

    def outputs(m: onnx.ModelProto, rng: np.random.Generator) -> None:
        choice = int(rng.integers(3))
        if choice == 0:
            del m.graph.output[:]
        elif choice == 1:
            m.graph.output.append(m.graph.output[0])
        else:
            m.graph.output[0].name = m.graph.input[0].name

    def symbolic(m: onnx.ModelProto, rng: np.random.Generator) -> None:
        """Symbolic (or unknown) channel/spatial dims, names shared at random ('H' twice)."""
        d = m.graph.input[0].type.tensor_type.shape.dim
        for k in range(1 if rng.random() < 0.3 else 2, len(d)):
            param = str(rng.choice(["H", "W", "N", "C", "H", ""]))
            if param:
                d[k].dim_param = param
            else:
                d[k].Clear()

    def symbolic_elsewhere(m: onnx.ModelProto, rng: np.random.Generator) -> None:
        """Symbolic dims on the output and value_info, and H/W on the input."""
        d = m.graph.input[0].type.tensor_type.shape.dim
        for k in range(2, len(d)):
            d[k].dim_param = "HW"[k % 2]
        for vi in [*m.graph.output, *m.graph.value_info]:
            for dim in vi.type.tensor_type.shape.dim:
                if rng.random() < 0.5:
                    dim.dim_param = str(rng.choice(["N", "K", "H", "W"]))

    return [dangling, cycle, drop_initializer, unknown_op, domain, opset, input_type, dims,
            nan_weights, attribute, delete_node, shuffle, rewire, outputs, symbolic,
            symbolic_elsewhere]


def _byte_mutation(data: bytes, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    choice = int(rng.integers(4))
    if choice == 0:
        for _ in range(int(rng.integers(1, 12))):
            buf[int(rng.integers(len(buf)))] = int(rng.integers(256))
    elif choice == 1:
        del buf[int(rng.integers(len(buf))):]
    elif choice == 2:
        at = int(rng.integers(len(buf)))
        buf[at:at] = rng.integers(0, 256, int(rng.integers(1, 64))).astype(np.uint8).tobytes()
    else:
        # a protobuf header region (the first kilobytes hold the graph's nodes)
        for _ in range(int(rng.integers(1, 4))):
            buf[int(rng.integers(min(len(buf), 4096)))] ^= 1 << int(rng.integers(8))
    return bytes(buf)


def base_models() -> list[bytes]:
    """The valid models mutations start from: the shipped models, three random CNNs and one
    with symbolic H/W (and a global-average-pool head: it runs at every size)."""
    root = Path(__file__).resolve().parents[2] / "models"
    out = [p.read_bytes() for p in (root / "digits_cnn.onnx", root / "seed_vgg.onnx")
           if p.is_file()]
    for seed in range(3):
        out.append(random_cnn(np.random.default_rng(1000 + seed)).onnx_model(None)
                   .SerializeToString())
    dynamic = random_cnn(np.random.default_rng(1014), dynamic=True)  # pool, concat, GAP head
    out.append(dynamic.onnx_model(None).SerializeToString())
    return out


def _random_input(model: onnx.ModelProto, rng: np.random.Generator,
                  base: list[int]) -> np.ndarray | None:
    """float32 normal values for the first non-initializer input (batch 2 where symbolic),
    whatever its type; a symbolic dim after the first takes the base model's size (``base``:
    its input's static dims; 8 where symbolic there too), a spatial one plus 1-3 in one case
    in four; None where it has no input or huge dimensions."""
    try:
        return random_input(model, rng, batch=2, first=True, dtype=np.float32, max_dim=4096)[1]
    except UnsupportedModel:
        pass
    inits = {t.name for t in model.graph.initializer}
    data = [i for i in model.graph.input if i.name not in inits]
    if not data:
        return None
    dims = data[0].type.tensor_type.shape.dim
    base = [*base, *[0] * len(dims)]
    grow = [0, 0, *(0 if rng.random() < 0.75 else int(rng.integers(1, 4)) for _ in dims)]
    shape = [d.dim_value if d.HasField("dim_value") else 2 if k == 0
             else (base[k] or 8) + grow[k] for k, d in enumerate(dims)]
    if any(v > 4096 for v in shape):
        return None
    return rng.standard_normal(shape).astype(np.float32)


def mutation_case(seed: int, bases: list[bytes], run_cli: bool | None = None) -> Outcome:
    """Mutate one base model, compile and (if it compiles) run it; classify the outcome."""
    from lrp_onnx.api import LRP
    from lrp_onnx.rules.presets import EpsilonPlusFlat

    rng = np.random.default_rng(seed)
    base = bases[int(rng.integers(len(bases)))]
    base_dims: list[int] = []
    if rng.random() < 0.5:
        data = _byte_mutation(base, rng)
        how = "bytes"
    else:
        model = onnx.ModelProto()
        model.ParseFromString(base)
        base_dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        kinds = _proto_mutations()
        mutate = kinds[int(rng.integers(len(kinds)))]
        mutate(model, rng)
        how = mutate.__name__
        data = model.SerializeToString()
    with tempfile.TemporaryDirectory(prefix="lrp_fuzz_") as tmp:
        path = Path(tmp) / "mutated.onnx"
        path.write_bytes(data)
        try:
            analyzer = LRP(path, EpsilonPlusFlat())
        except LRPError as exc:
            text = str(exc)
            if "\n" in text or not text.startswith(str(path)):
                return Outcome("crash", seed, f"{how}: message not one line naming the file: "
                               f"{text!r}", type(exc).__name__)
            outcome = Outcome("clean-error", seed, f"{how}: {text}", type(exc).__name__)
        except Exception as exc:  # noqa: BLE001
            return Outcome("crash", seed, f"{how}: {traceback.format_exc(limit=4)}",
                           type(exc).__name__)
        else:
            outcome = Outcome("ok", seed, how)
            x = _random_input(analyzer.model, rng, base_dims)
            if x is not None:
                try:
                    analyzer.analyze(x, device="cpu")
                except LRPError as exc:
                    outcome = Outcome("clean-error", seed, f"{how}: analyze: {exc}",
                                      type(exc).__name__)
                except Exception as exc:  # noqa: BLE001
                    return Outcome("crash", seed, f"{how}: analyze: "
                                   f"{traceback.format_exc(limit=4)}", type(exc).__name__)
        if run_cli if run_cli is not None else seed % 10 == 0:
            from lrp_onnx.cli.main import main

            out = Path(tmp) / "out.onnx"
            with contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()) as err:
                code = main(["convert", str(path), str(out), "--composite", "EpsilonPlusFlat"])
            compiled = outcome.kind == "ok" or "analyze:" in outcome.detail
            if (code == 0) != compiled or out.exists() != (code == 0) \
                    or (code and err.getvalue().count("\n") != 1):
                return Outcome("crash", seed, f"{how}: CLI exit {code}, output exists "
                               f"{out.exists()}, stderr {err.getvalue()!r}", "CLI")
    return outcome
