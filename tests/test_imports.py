"""python/bitdlm has no import circle: the modules' imports, read with ast (at
module level and inside functions alike: a lazy import is still a dependency),
form an acyclic graph. No bitdlm module is imported here."""
from __future__ import annotations

import ast
from pathlib import Path

PKG_ROOT = Path(__file__).resolve().parents[1] / "python"


def module_files(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """{dotted module name: (file, is a package __init__)} of every .py under root/package."""
    out = {}
    for f in sorted((root / package).rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (f, is_pkg)
    return out


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """{module: modules of `package` it imports}. An import of one of its own parent
    packages is left out (importing a module imports its parents first anyway), and
    so is a name that is no Python module (e.g. the _core extension)."""
    mods = module_files(root, package)

    def owner(name):  # the module a dotted name lives in
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for mod, (f, is_pkg) in mods.items():
        here = mod if is_pkg else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[:len(here.split(".")) - node.level + 1]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
            else:
                continue
            for t in targets:
                if t == package or t.startswith(package + "."):
                    dep = owner(t)
                    if dep and dep != mod and not mod.startswith(dep + "."):
                        deps.add(dep)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_bitdlm_has_no_import_circle():
    graph = import_graph(PKG_ROOT, "bitdlm")
    assert len(graph) > 20 and "bitdlm.engine.core" in graph  # really read the package
    assert graph["bitdlm.serve_cli"] >= {"bitdlm.ray", "bitdlm.server.cli"}
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_check_finds_a_circle(tmp_path):
    """The walker on a made-up package: a lazy import inside a function closes a circle."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import f\n")
    (pkg / "a.py").write_text("from pkg.sub import f\nfrom . import _ext\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n    from .. import __version__\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.a"]
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import __version__\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) is None
