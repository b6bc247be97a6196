"""The package is a straight stack: every import of src/ (at the top of a module or inside a function) looks
down or sideways, never up, and no modules import each other in a circle; nothing imports the package root.

The floors, lowest first, are written here once. A module's floor is that of its longest prefix listed.
A module's ``if __name__ == "__main__":`` block is a script run on its own (a pattern module draws its
mask), not part of what importing the module imports, so its imports are not counted.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
ROOT = "sparseattn"

FLOORS = [
    ["_version", "paths", "errors"],  # errors: sparseattn's own exception types
    ["layout", "sparsity", "patterns"],
    ["plans"],  # which pattern applies where; the text form of plans
    ["backends"],  # how attention runs under a plan
    ["models", "text"],  # loading models and tokenizers; parses and per-example structure
    ["integrations", "model_sparsity"],  # sparsify a transformers model; its sparsity on real batches
    ["training"],  # the core every method runs on: data, batching, loop, evaluation, records, method registry
    ["learned", "pruning", "lm"],  # methods
    ["reports"],  # tables and plots of rows of runs; drawing masks
    ["experiments"],  # sweeps, the results database, the demo, and their commands
    ["bench"],
    ["cli"],
]

# Imports that break the rules in code another change owns; each is to go with that change.
PENDING: set = set()  # (importer, imported) pairs waiting for a fix; none now


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The src modules ``name`` imports, anywhere in it: ``from pkg import mod`` names the module mod when
    there is one, else the package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    tree.body = [n for n in tree.body if not _is_main_block(n)]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # `import sparseattn.plans.plan.Plan`-like names: the module holding it
                t = t.rpartition(".")[0]
            if t.startswith(ROOT) and t != name:
                out.add(t)
    return out


def _is_main_block(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test).replace("'", '"') == '__name__ == "__main__"'


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def floor_of(module: str) -> int:
    rel = module[len(ROOT) + 1:] if module != ROOT else ""
    best, best_len = None, -1
    for i, floor in enumerate(FLOORS):
        for prefix in floor:
            if (rel == prefix or rel.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if rel == "":
        return len(FLOORS)  # the root re-exports; it sits above everything
    if best is None:
        raise AssertionError(f"{module} is on no floor; add it to FLOORS in {__file__}")
    return best


def test_every_module_is_on_a_floor():
    for name in MODULES:
        floor_of(name)


def test_no_import_looks_up():
    upward = []
    for name, targets in GRAPH.items():
        for t in sorted(targets):
            if (name, t) in PENDING:
                continue
            if t == ROOT:
                upward.append(f"{name} imports the package root (import from the module that defines the name)")
            elif floor_of(t) > floor_of(name):
                upward.append(f"{name} (floor {FLOORS[floor_of(name)]}) imports {t} (floor {FLOORS[floor_of(t)]})")
    assert not upward, "imports that look up:\n  " + "\n  ".join(upward)


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {n: {t for t in ts if (n, t) not in PENDING} for n, ts in GRAPH.items()}
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert not _cycles(), "modules that import each other in a circle: " + "; ".join(map(str, _cycles()))


@pytest.mark.parametrize("source, expected", [
    ("from ..patterns.base import Pattern", {"sparseattn.patterns.base"}),
    ("from .. import sparsify", {"sparseattn"}),
    ("from . import spec", {"sparseattn.plans.spec"}),
    ("import sparseattn.plans.io", {"sparseattn.plans.io"}),
    ("def f():\n    from ..reports.masks import draw_mask", {"sparseattn.reports.masks"}),
    ("if __name__ == '__main__':\n    from ..reports.masks import draw_mask", set()),
])
def test_imports_are_resolved_to_modules(tmp_path, source, expected):
    """The checks above see what they should: relative and absolute imports resolve to src modules."""
    path = SRC / ROOT / "plans" / "plan.py"
    fake = tmp_path / "plan.py"
    fake.write_text(source + "\n")
    assert _imports("sparseattn.plans.plan", fake) == expected
    assert path.exists()


def test_pending_exceptions_still_exist():
    """An exception whose import is gone is removed from PENDING, so it cannot hide a new one."""
    gone = [edge for edge in PENDING if edge[1] not in GRAPH.get(edge[0], set())]
    assert not gone, f"remove from PENDING, the imports are gone: {gone}"
