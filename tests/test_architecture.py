"""The layering of the package: the core needs no napari or Qt, and no module-level import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import napari_pdcr

PACKAGE_DIR = Path(napari_pdcr.__file__).parent
TESTS_DIR = Path(__file__).parent

#: A meta-path finder that makes napari, Qt, vispy and the plugin's napari layer unimportable.
BLOCK_NAPARI = """
import sys

BLOCKED = {"napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "vispy"}

class BlockNapari:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or (name + ".").startswith("napari_pdcr._napari."):
            raise ImportError(f"blocked in this test: {name}")
        return None

sys.meta_path.insert(0, BlockNapari())
"""


def run_blocked(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where napari, Qt and ``napari_pdcr._napari`` are blocked."""
    script = BLOCK_NAPARI + textwrap.dedent(code)
    command = [sys.executable, "-c", script]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=TESTS_DIR)


def core_modules() -> list[str]:
    """Every module of the package outside ``napari_pdcr._napari``, by dotted name."""
    names = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        if "_napari" in parts:
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_core_modules_import_without_napari_or_qt():
    modules = core_modules()
    assert "napari_pdcr.jobs" in modules and "napari_pdcr.console" in modules
    assert not any(m.startswith("napari_pdcr._napari") for m in modules)
    result = run_blocked(
        f"""
        import importlib
        for name in {modules!r}:
            importlib.import_module(name)
        leaked = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        assert not leaked, leaked
        try:
            import napari_pdcr._napari.layers
        except ImportError:
            pass
        else:
            raise AssertionError("the blocker let napari_pdcr._napari through")
        print("imported", len({modules!r}))
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"imported {len(modules)}"


def test_console_explains_arrays_without_importing_napari():
    result = run_blocked(
        """
        import numpy as np
        from synthetic import LocalConv, random_image, wrap
        from napari_pdcr.console import explain

        model = wrap(LocalConv(layers=2, width=4, seed=3), 2, activation="sigmoid", name="local")
        labels = np.zeros((32, 32), np.uint8)
        labels[12:20, 12:20] = 2
        labels[0:4, 0:4] = 1
        result = explain(random_image((32, 32), seed=1), labels, model=model, label=2,
                         intervention="zero", block_shape=8, n_screen=1, n_estimate=2, device="cpu")
        assert result.target_region.sum() == 64 and result.provenance["target_layer"] is None
        print("explained", result.ate.shape)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "explained (32, 32)"


# ---------------------------------------------------------------------- import cycles
def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements run on import: not in functions or classes, nor under TYPE_CHECKING."""
    found = []

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.append(node)
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    visit(block)
            elif isinstance(node, ast.With):
                visit(node.body)

    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules its top-level imports run.

    ``import a.b`` and ``from a.b import c`` point at ``a.b`` (and at ``a.b.c`` when that
    is a module); ``from a import name`` points at the package ``a`` itself when ``name``
    is not a submodule, because the name comes from its ``__init__``. The parents that
    Python imports first are left out: a package's ``__init__`` importing its own
    submodules is not a cycle.
    """
    modules = {module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in top_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                edges.add(submodule if submodule in modules else base)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


def test_the_cycle_finder_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_sees_the_layering():
    graph = import_graph()
    assert "napari_pdcr.jobs" in graph["napari_pdcr.console"]
    assert "napari_pdcr._napari.inputs" not in graph["napari_pdcr.console"]  # imported lazily
    assert "napari_pdcr.jobs" in graph["napari_pdcr._napari.inputs"]
    assert "napari_pdcr.components" in graph["napari_pdcr.jobs"]  # from a package's __init__
    assert "napari_pdcr.plotting.style" in graph["napari_pdcr._napari.layers"]


def test_the_widgets_share_a_base_not_each_other():
    graph = import_graph()
    assert "napari_pdcr._napari.widget" not in graph["napari_pdcr._napari.components_widget"]
    for widget in ("widget", "components_widget"):
        assert "napari_pdcr._napari.base_widget" in graph[f"napari_pdcr._napari.{widget}"]


def test_no_import_cycles_between_modules():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)
