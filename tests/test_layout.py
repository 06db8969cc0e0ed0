"""The packages' import graph (issue 12): no import cycle between modules, no private name imported across them."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("phi3mini", "lora", "kernels", "training")
# Lazy (function-level) imports that close a cycle, each with its reason; every other cycle fails. Remove an entry
# when its cycle goes.
KNOWN_LAZY: dict[tuple[str, str], str] = {}
# Private names imported across modules that predate this check (another helper's files, in flux): to make public.
KNOWN_PRIVATE: set[tuple[str, str, str]] = set()


def project_imports(path: Path):
    """(module imported, [names]) for every import of a project module in path, function-level ones included."""
    package = path.parent.name
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package if node.level == 1 else None
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            if module and module.split(".")[0] in PACKAGES:
                names = [a.name for a in node.names]
                # `from pkg import mod` imports a module: count it as an edge to pkg.mod
                subs = [n for n in names if (ROOT / module.replace(".", "/") / f"{n}.py").exists()]
                for n in subs:
                    yield f"{module}.{n}", []
                yield module, [n for n in names if n not in subs]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PACKAGES:
                    yield a.name, []


def modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            yield name, path


def test_no_private_names_imported_across_modules():
    bad = [f"{path.relative_to(ROOT)}: from {module} import {n}"
           for _, path in modules() for module, names in project_imports(path) for n in names
           if n.startswith("_") and (str(path.relative_to(ROOT)), module, n) not in KNOWN_PRIVATE]
    assert not bad, bad


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_between_modules(package):
    # package __init__ files only re-export: an edge into a package counts as none
    graph = {name: {m for m, _ in project_imports(path) if m not in PACKAGES and m != name
                    and (name, m) not in KNOWN_LAZY}
             for name, path in modules() if name not in PACKAGES and name.startswith(package + ".")}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
