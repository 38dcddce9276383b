"""The package is layered, and no import, at module level or inside a function, climbs a layer or closes a cycle.

errors/config/ops -> data -> linear -> models -> train -> eval -> bench -> the CLI (and the package's own
``giblet.load``): a module may import its own layer and those to its left, never one to its right.
"""

import ast
from pathlib import Path
from typing import Dict, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [
    ("giblet.errors", "giblet.config", "giblet.ops", "giblet.ops_reference", "giblet.progress", "giblet.version", "giblet._C"),
    ("giblet.data",),
    ("giblet.linear",),
    ("giblet.models",),
    ("giblet.train",),
    ("giblet.eval", "giblet.validate"),
    ("giblet.bench",),
    ("giblet", "giblet_cli"),  # the package's facade (giblet.load) and the command line
]


def module_files() -> Dict[str, Path]:
    files = {}
    for package, folder in (("giblet", ROOT / "giblet"), ("giblet_cli", ROOT / "cli")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([package, *parts])] = path
    return files


EXTENSIONS = {"giblet._C"}  # compiled modules: they import nothing of the project


def layer_of(module: str) -> int:
    best, best_length = None, -1
    for number, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = number, len(prefix)
    if best is None:
        raise AssertionError(f"{module}: no layer; add it to LAYERS in {__file__}")
    return best


def imports_of(module: str, path: Path, known: Set[str]) -> Set[str]:
    """Every project module ``module`` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known] or [base]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


GRAPH = None


def graph() -> Dict[str, Set[str]]:
    global GRAPH
    if GRAPH is None:
        files = module_files()
        known = set(files) | EXTENSIONS
        GRAPH = {module: imports_of(module, path, known) for module, path in files.items()}
        GRAPH.update({module: set() for module in EXTENSIONS})
    return GRAPH


def test_every_module_has_a_layer():
    for module in graph():
        layer_of(module)


def test_no_import_climbs_a_layer():
    climbing = [f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
                for module, targets in sorted(graph().items()) for target in sorted(targets)
                if layer_of(target) > layer_of(module)]
    assert not climbing, "imports against the layers:\n  " + "\n  ".join(climbing)


def test_no_import_cycle():
    edges = graph()
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_the_checker_sees_function_level_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from giblet.eval import evaluate\n    import giblet.models.stimuli\n")
    assert imports_of("giblet.data.m", source, {"giblet.eval", "giblet.eval.evaluate", "giblet.models",
                                                 "giblet.models.stimuli"}) == {"giblet.eval.evaluate", "giblet.models.stimuli"}
