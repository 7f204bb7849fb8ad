"""The package's shape: no import cycles, op facts only in the registry, a torch-free import,
small modules, and a registry whose facts agree with themselves."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import lrp_onnx
from lrp_onnx.emit import registry
from lrp_onnx.emit.registry import Kind

PACKAGE = Path(lrp_onnx.__file__).resolve().parent
#: Where op-type names may be listed: the registry and the op modules (each op's facts live with
#: its registration), and the test harness (its float64 runner implements ops independently).
OP_TABLES_ALLOWED = ("emit/registry.py", "emit/ops/", "testing/")
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _runtime_imports(path: Path, module: str, modules: dict[str, Path]) -> set[str]:
    """Modules of the package ``module`` imports when it runs (``if TYPE_CHECKING:`` blocks,
    which never run, are skipped)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    is_pkg = path.name == "__init__.py"

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules and m != module}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles of ``graph`` (module -> modules it imports), each as a path back to its
    start."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                walk(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [m])
    return cycles


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {m: _runtime_imports(p, m, modules) for m, p in modules.items()}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    """The checker sees a cycle through a relative import and ignores TYPE_CHECKING imports."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from pkg.c import y\nfrom pkg import a\nx = 1\n")
    (pkg / "c.py").write_text("from pkg.b import x\n")
    modules = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py",
               "pkg.c": pkg / "c.py"}
    graph = {m: _runtime_imports(p, m, modules) for m, p in modules.items()}
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg", "pkg.a"},
                     "pkg.c": {"pkg.b"}}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]


def _op_tables(path: Path, op_types: set[str]) -> list[str]:
    """Collection literals in ``path`` that list two or more ONNX op types."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Set, ast.List, ast.Tuple)):
            items = node.elts
        elif isinstance(node, ast.Dict):
            items = [k for k in node.keys if k is not None]
        else:
            continue
        names = [e.value for e in items if isinstance(e, ast.Constant) and e.value in op_types]
        if len(names) >= 2:
            found.append(f"{path.name}:{node.lineno}: {names}")
    return found


def test_no_op_type_tables_outside_the_registry() -> None:
    op_types = {s.name for s in onnx.defs.get_all_schemas_with_history()} | {"SiLU"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(OP_TABLES_ALLOWED):
            continue
        found += _op_tables(path, op_types)
    assert not found, "op-type tables outside the registry:\n" + "\n".join(found)


def test_op_table_check_finds_a_table(tmp_path: Path) -> None:
    code = tmp_path / "m.py"
    code.write_text('A = frozenset({"Conv", "Gemm"})\nB = ("value", "Conv")\n'
                    'def f(n):\n    return n.op in ("Relu", "Sigmoid")\n')
    found = _op_tables(code, {"Conv", "Gemm", "Relu", "Sigmoid"})
    assert len(found) == 2, found


def test_import_is_torch_free() -> None:
    code = ("import sys, lrp_onnx, lrp_onnx.cli; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'torchvision', 'zennit', 'lrp_onnx.testing') or "
            "m.startswith('lrp_onnx.testing')); print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_modules_are_small() -> None:
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


# -- the registry's facts -------------------------------------------------------------------
def test_registry_is_sealed_and_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        registry.declare("Conv", kind=Kind.LINEAR)


def test_groups_hold_only_ops_with_emitters() -> None:
    for spec in registry.specs():
        if spec.groups:
            assert spec.emit is not None, spec.op_type
    with pytest.raises(ValueError, match="only ops with an emitter join layer groups"):
        registry.declare("LayerNormalizationTest", kind=Kind.LINEAR, groups=("ConvLayer",))
    assert "LayerNormalizationTest" not in registry.OP_SPECS


def test_every_emitter_states_its_rules_and_kind() -> None:
    for spec in registry.specs():
        if spec.emit is not None:
            assert spec.rules, spec.op_type
            assert spec.doc, f"{spec.op_type}: the emitter's docstring states its formula"


def test_every_op_with_an_emitter_is_tested() -> None:
    """Each supported op appears in the op x rule table or a model test (by op type)."""
    text = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    missing = [op for op in registry.supported_ops() if f'"{op}"' not in text]
    assert not missing, f"ops without a test naming them: {missing}"
