"""No import circle among the project's modules, local imports included.

An import inside a function is still a dependency (it runs the first time the function does), so the graph is
read from every ``import`` statement in a module's source, wherever it stands, except those under
``if TYPE_CHECKING:`` (never executed). A circle of modules means none of them can be understood, tested or
changed alone; the checker is tried on a planted circle too, so that a green result means something.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("components", "flows", "infra", "benchmarks")
# The areas of components/, lowest first: a module imports from its own area or a lower one, never a higher one
# (docs/architecture.md, "The rooms").
AREAS = ("support", "settings", "intake", "model", "methods", "training", "registry", "pipeline", "scenarios")


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    return skipped


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (the most specific module each import names)."""

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skipped = _type_checking_only(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets.update(known(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets.update(known(f"{base}.{alias.name}") for alias in node.names)
        graph[name] = {t for t in targets if t and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_project_has_no_import_circle():
    graph = import_graph(module_files(REPO))
    assert len(graph) > 50  # the walk found the project
    assert circles(graph) == []


def upward_imports(graph: dict[str, set[str]], areas=AREAS) -> list[str]:
    """``a -> b`` for every import from a module of ``components/<area>/`` to one of a higher area."""

    def area(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if parts[0] == "components" and len(parts) > 2 and parts[1] in areas else None

    out = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            low, high = area(module), area(target)
            if low and high and areas.index(high) > areas.index(low):
                out.append(f"{module} -> {target}")
    return out


def test_every_module_of_components_lives_in_an_area_and_areas_import_downward_only():
    modules = module_files(REPO, ("components",))
    loose = [m for m in modules if m.count(".") == 1 and m.split(".")[1] not in AREAS]
    assert loose == []  # components/ holds area folders only (and its __init__)
    assert upward_imports(import_graph(modules)) == []


def test_an_upward_import_is_found(tmp_path):
    for area, text in (("model", "from components.training import learn\n"), ("training", "")):
        (tmp_path / "components" / area).mkdir(parents=True)
        (tmp_path / "components" / area / "__init__.py").write_text("")
        (tmp_path / "components" / area / ("pools.py" if area == "model" else "learn.py")).write_text(text)
    (tmp_path / "components" / "__init__.py").write_text("")
    graph = import_graph(module_files(tmp_path, ("components",)))
    assert upward_imports(graph) == ["components.model.pools -> components.training.learn"]


def test_the_checker_finds_a_planted_circle_through_a_local_import(tmp_path):
    """``a -> b -> c -> a`` where the last edge is an import inside a function, and a ``TYPE_CHECKING`` import
    that would close another circle (ignored, as it never runs)."""
    pkg = tmp_path / "components"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from components import b\n")
    (pkg / "b.py").write_text("from .c import thing\n")
    (pkg / "c.py").write_text("def thing():\n    from components.a import x\n    return x\n")
    (pkg / "d.py").write_text(
        "from typing import TYPE_CHECKING\nimport components.a\nif TYPE_CHECKING:\n    from components import d2\n"
    )
    (pkg / "d2.py").write_text("from components import d\n")
    graph = import_graph(module_files(tmp_path, ("components",)))
    assert graph["components.c"] == {"components.a"} and graph["components.d"] == {"components.a"}
    assert circles(graph) == [["components.a", "components.b", "components.c"]]
