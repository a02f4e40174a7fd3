"""Architecture rules of metamtl, checked by reading the source (no import of the package).

Run ``python tools/check_architecture.py``: it prints every broken rule and exits 1 if any.
``tests/test_architecture.py`` runs the same checks in the default suite.

1. **Layers.** Every module of ``metamtl/`` belongs to one layer of the data flow (:data:`LAYERS`,
   bottom to top); a module may import modules of its own layer and of lower ones only.  Every
   ``import`` statement counts, also those inside functions and under ``if TYPE_CHECKING:``.
2. **No import cycles between modules.**  Edges are the imports that run (``TYPE_CHECKING``
   imports are left out); importing ``a.b.c`` also runs the ``__init__`` of packages ``a`` and
   ``a.b`` unless the importing module is inside them, so those count as edges too.
3. **Short functions.**  No function or method is longer than :data:`MAX_FUNCTION_LINES` lines
   (signature, docstring and body) unless a comment ``# long function: <reason>`` on its ``def``
   line (or the line above it) says why.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "metamtl"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

#: Layers from the bottom of the data flow to the top, and what each may import (itself and below).
LAYERS = ("foundation", "data", "tasks", "models", "adaptation", "algorithms", "learner", "surfaces")

#: Module (or package) -> layer; the longest matching prefix wins (``"metamtl"`` itself: only
#: the package's ``__init__``).
MODULE_LAYERS = {
    "metamtl.errors": "foundation",
    "metamtl.version": "foundation",
    "metamtl.environment": "foundation",
    "metamtl.memory": "foundation",
    "metamtl.devices": "foundation",  # what a device setting names (torch only)
    "metamtl.files": "foundation",
    "metamtl.yaml_io": "foundation",  # the one YAML reader (YAML 1.2 numbers)  # atomic file writes (stdlib only)
    "metamtl.config_merge": "foundation",  # merging config sections (stages, extends, overrides) as plain dicts
    "metamtl.progress_bars": "foundation",
    "metamtl.allocator": "foundation",  # glibc malloc settings and the budget guard (stdlib only)
    "metamtl.data": "data",
    "metamtl.tasks": "tasks",
    "metamtl.models": "models",
    "metamtl.multitask": "models",
    "metamtl.heads": "models",  # feature heads classify trunk features: models and tasks, no adaptation
    "metamtl.adaptation": "adaptation",
    "metamtl.algorithms": "algorithms",
    "metamtl.learner": "learner",
    "metamtl.predictors": "learner",
    "metamtl.inference": "learner",
    "metamtl.placement": "learner",
    "metamtl.inputs": "learner",
    "metamtl.evaluation": "learner",
    "metamtl.ensemble": "learner",
    "metamtl.fit_loop": "learner",
    "metamtl.run_state": "learner",
    "metamtl.numerics": "learner",
    "metamtl.callbacks": "learner",
    "metamtl.checkpoint": "learner",
    "metamtl.distributed": "learner",
    "metamtl.interrupt": "learner",
    "metamtl.distill": "learner",
    "metamtl.steps_curve": "surfaces",
    "metamtl.config": "surfaces",
    "metamtl.experiment": "surfaces",
    "metamtl.ensemble_fit": "surfaces",
    "metamtl.reporting": "surfaces",
    "metamtl.cli": "surfaces",
    "metamtl.__main__": "surfaces",
    "metamtl": "surfaces",
}

MAX_FUNCTION_LINES = 60
LONG_OK = "# long function:"


@dataclass(frozen=True)
class Import:
    """One import statement's target module, where it is, and whether it runs."""

    source: str  # importing module
    target: str  # imported module (``from a import b`` with ``a.b`` a module: ``a.b``)
    path: Path
    line: int
    text: str  # the statement as written
    scope: str  # "module level", "in function f", ...
    runtime: bool  # False under ``if TYPE_CHECKING:``

    def where(self) -> str:
        return f"{_rel(self.path)}:{self.line} `{self.text}` ({self.scope})"


def _rel(path: Path) -> str:
    """``metamtl/x/y.py``: the path from the folder holding the package."""
    parts = path.parts
    return "/".join(parts[parts.index(PACKAGE):]) if PACKAGE in parts else str(path)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package at ``root``, by dotted name."""
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def layer_of(module: str) -> str | None:
    """The layer of ``module``: its longest listed prefix (the bare package name counts only for
    the package's own ``__init__``, so a new top-level module must be given a layer)."""
    for cut in range(module.count(".") + 1, 1, -1):
        prefix = ".".join(module.split(".")[:cut])
        if prefix in MODULE_LAYERS:
            return MODULE_LAYERS[prefix]
    return MODULE_LAYERS.get(module) if module == PACKAGE else None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(source: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = source.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class _Collector(ast.NodeVisitor):
    def __init__(self, source: str, path: Path, known: set[str], lines: list[str]) -> None:
        self.source, self.path, self.known, self.lines = source, path, known, lines
        self.is_package = path.name == "__init__.py"
        self.scope: list[str] = []
        self.type_only = 0
        self.found: list[Import] = []

    def _add(self, node: ast.stmt, target: str) -> None:
        if target != PACKAGE and not target.startswith(PACKAGE + "."):
            return
        scope = f"in {' > '.join(self.scope)}" if self.scope else "module level"
        if self.type_only:
            scope += ", under TYPE_CHECKING"
        text = " ".join(self.lines[node.lineno - 1].split())
        self.found.append(Import(self.source, target, self.path, node.lineno, text, scope, not self.type_only))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve(self.source, self.is_package, node)
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in self.known else base for a in node.names]
        for target in dict.fromkeys(targets):  # once per module, in order
            self._add(node, target)

    def _scoped(self, node: ast.AST, kind: str) -> None:
        self.scope.append(f"{kind} {node.name}")  # type: ignore[attr-defined]
        self.generic_visit(node)
        self.scope.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._scoped(node, "function")

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._scoped(node, "class")

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.type_only += 1
            for child in node.body:
                self.visit(child)
            self.type_only -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)


def imports(root: Path = ROOT) -> list[Import]:
    """Every import of a ``metamtl`` module in ``metamtl/``, function-local ones included."""
    found: list[Import] = []
    mods = modules(root)
    for name, path in mods.items():
        text = path.read_text()
        collector = _Collector(name, path, set(mods), text.splitlines())
        collector.visit(ast.parse(text, str(path)))
        found += collector.found
    return found


def layer_violations(root: Path = ROOT) -> list[str]:
    """One message per import of a higher layer, and per module no layer is declared for."""
    problems = []
    for mod in modules(root):
        if layer_of(mod) is None:
            problems.append(f"{mod} has no layer: add it to MODULE_LAYERS in tools/check_architecture.py")
    for imp in imports(root):
        src, dst = layer_of(imp.source), layer_of(imp.target)
        if src is None or dst is None or LAYERS.index(dst) <= LAYERS.index(src):
            continue
        allowed = ", ".join(LAYERS[: LAYERS.index(src) + 1])
        problems.append(
            f"{imp.where()}: {imp.source} (layer '{src}') imports {imp.target} (layer '{dst}'), a higher "
            f"layer. Layer '{src}' may import only {allowed}. Move the code that needs {imp.target} up "
            f"to layer '{dst}' (or above), or move what it uses down."
        )
    return problems


def _edges(found: list[Import], known: set[str]) -> dict[str, dict[str, Import]]:
    graph: dict[str, dict[str, Import]] = {}
    for imp in found:
        if not imp.runtime:
            continue
        parts = imp.target.split(".")
        targets = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        for target in targets:  # packages whose __init__ runs first, then the module itself
            inside = imp.source == target or imp.source.startswith(target + ".")
            if target in known and not inside and target != imp.source:
                graph.setdefault(imp.source, {}).setdefault(target, imp)
    return graph


def import_cycles(root: Path = ROOT) -> list[str]:
    """One message per import cycle (each listed once, with the import behind every step)."""
    graph = _edges(imports(root), set(modules(root)))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_describe_cycle(graph, comp) for comp in components]


def _describe_cycle(graph: dict[str, dict[str, Import]], comp: list[str]) -> str:
    members = set(comp)
    path, seen = [comp[0]], {comp[0]}
    while True:  # walk inside the component until a module repeats
        nxt = next(w for w in sorted(graph[path[-1]]) if w in members)
        if nxt in seen:
            path = path[path.index(nxt):] + [nxt]
            break
        path.append(nxt)
        seen.add(nxt)
    steps = "\n".join(f"  {a} -> {b}: {graph[a][b].where()}" for a, b in zip(path, path[1:]))
    return (f"import cycle between {', '.join(comp)}:\n{steps}\n  Break it by moving the shared code into "
            "the lower module (or a new one both can import).")


def long_functions(root: Path = ROOT, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions longer than ``limit`` lines without a ``# long function: <reason>`` comment."""
    problems = []
    for path in modules(root).values():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines), str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = node.end_lineno - node.lineno + 1
            marked = any(LONG_OK in lines[i - 1] for i in (first - 1, node.lineno) if i >= 1)
            if length > limit and not marked:
                problems.append(
                    f"{_rel(path)}:{node.lineno} function {node.name} has {length} lines "
                    f"(limit {limit}): split it, or say why it must stay long in a '{LONG_OK} <reason>' "
                    "comment on its def line"
                )
    return problems


def main() -> int:
    problems = layer_violations() + import_cycles() + long_functions()
    for p in problems:
        print(p, end="\n\n")
    print(f"{len(problems)} problem(s) in {len(modules())} modules, {len(imports())} imports")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
