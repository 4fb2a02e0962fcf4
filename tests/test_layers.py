"""The package layering: imports flow one way, and no module imports itself back through another.

    cli -> tools, memory -> training -> model, data -> recipe, hub, durable, sysmem

Every import counts, those inside functions too: a lazy import is still a dependency.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lean_relora"
LAYER = {"recipe": 0, "hub": 0, "durable": 0, "sysmem": 0, "data": 1, "model": 1, "training": 2, "memory": 3,
         "tools": 3, "cli": 4, "__main__": 5}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """lean_relora module -> the lean_relora modules it imports (a package import counts as its __init__)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    found = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lean_relora"):
                for alias in node.names:  # `from lean_relora.data import corpus` imports the submodule
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("lean_relora")}
        found[name] = targets - {name}
    return found


def place(module: str) -> str:
    """The package (or top-level module) a module belongs to: its layer's name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_import_goes_down_the_layers_or_stays_in_its_package():
    wrong = []
    for module, targets in imports().items():
        here = place(module)
        if here == "__init__":
            continue  # the package docstring imports nothing
        for target in targets:
            there = place(target)
            if there != here and not LAYER[there] < LAYER[here]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_no_import_cycle_among_the_modules():
    graph = {m: {t for t in targets if not t.endswith("__init__")} for m, targets in imports().items()}
    packages = {m for m in graph if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()}
    for package in packages:  # a package's __init__ re-exports its modules: an edge into it is one into them
        graph[package] = set()
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_layer_map_names_every_package():
    assert {place(m) for m in imports()} - {"__init__"} <= set(LAYER)
