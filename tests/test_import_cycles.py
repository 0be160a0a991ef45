"""No import circle in ``lgrpo/``: each module's imports (top-level and inside functions) read with ``ast``.

A circle makes the order modules load in matter (the task glue once lived in the CLI, which imported
eval, which imported the CLI back), and it means two modules cannot be read, or changed, apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lgrpo

ROOT = Path(lgrpo.__file__).parent


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The lgrpo modules ``path`` imports anywhere in its body (``from . import x`` counts as ``pkg.x``
    when that is a module, else as ``pkg``)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" for alias in node.names] + [source]
        else:
            continue
        for target in targets:
            # the longest lgrpo module the target names (``lgrpo.x.y`` -> ``lgrpo.x`` when y is a function)
            while target and target not in modules:
                target = target.rpartition(".")[0]
            # a module's own packages are already loading when it runs: not an edge
            if target and target != name and not name.startswith(target + "."):
                out.add(target)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = sorted(root.rglob("*.py"))
    modules = {module_name(p, root) for p in files}
    return {module_name(p, root): imports_of(p, modules, root) for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None. A package's ``__init__`` importing its own
    submodules is how packages work, not a circle: edges from a package to its own submodules and back
    are left out."""
    def inside(child: str, parent: str) -> bool:
        return child.startswith(parent + ".")

    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if inside(n, m) or inside(m, n):
                continue
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle_in_lgrpo():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_walk_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: a circle closed by a relative import inside a function is found."""
    pkg = tmp_path / "lgrpo"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub.b import thing\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def thing():\n    from ..c import other\n    return other\n")
    (pkg / "c.py").write_text("import lgrpo.a\n\ndef other():\n    from . import a\n")
    graph = import_graph(pkg)
    assert graph["lgrpo.a"] == {"lgrpo.sub.b"} and graph["lgrpo.sub.b"] == {"lgrpo.c"}
    assert graph["lgrpo.c"] == {"lgrpo.a"}
    assert find_cycle(graph) == ["lgrpo.a", "lgrpo.sub.b", "lgrpo.c", "lgrpo.a"]
    (pkg / "c.py").write_text("def other():\n    from .sub import b\n")  # back through b's package
    graph = import_graph(pkg)
    assert graph["lgrpo.c"] == {"lgrpo.sub", "lgrpo.sub.b"}
    assert find_cycle(graph) == ["lgrpo.sub.b", "lgrpo.c", "lgrpo.sub.b"]
