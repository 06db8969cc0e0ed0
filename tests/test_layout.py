"""The package's layout: one namespace, `phi3lora`, its subpackages in layers (each imports only the ones below it),
no import cycle between modules, no private name imported across modules, and nothing left at the old top-level
names (`kernels` and `lora` belong to other distributions: Hugging Face's kernel hub, a PyPI project)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "phi3lora"
# What each unit may import from the others. The order is the picture: cli on top, kernels, atomic and console at the
# bottom (console: the info / warn / error lines and the progress line, for any unit that talks).
ALLOWED = {
    "cli": {"serve", "eval", "training", "data", "interp", "lora", "phi3mini", "kernels", "atomic", "console"},
    # serve: the OpenAI-compatible server (batching engine, many adapters per batch); eval: lm-eval's model and
    # base-vs-adapter comparison on a chat file
    "serve": {"data", "lora", "phi3mini", "kernels", "atomic", "console"},
    "eval": {"data", "lora", "phi3mini", "kernels", "atomic", "console"},
    "training": {"data", "lora", "phi3mini", "kernels", "atomic", "console"},
    "interp": {"lora", "phi3mini", "kernels", "atomic", "console"},
    "data": {"phi3mini", "atomic", "console"},
    "lora": {"phi3mini", "kernels", "atomic", "console"},
    "phi3mini": {"kernels", "atomic", "console"},
    "kernels": set(),
    "atomic": set(),
    "console": set(),
    "__main__": {"cli"},  # python -m phi3lora
}


def unit_of(module: str) -> str:
    """phi3lora.lora.inject -> lora; phi3lora.atomic -> atomic."""
    if module.endswith(".__main__"):  # `python -m phi3lora.eval`: an entry point sits on top, as phi3lora/__main__.py
        return "__main__"
    return module.split(".")[1] if module.count(".") else ""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path):
    """(module imported, [names]) for every phi3lora import in path, function-level ones included."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            if not module or module.split(".")[0] != "phi3lora":
                continue
            names = [a.name for a in node.names]
            # `from pkg import mod` imports a module: an edge to pkg.mod
            folder = ROOT / module.replace(".", "/")
            subs = [n for n in names if (folder / f"{n}.py").exists() or (folder / n / "__init__.py").exists()]
            for n in subs:
                yield f"{module}.{n}", []
            yield module, [n for n in names if n not in subs]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "phi3lora":
                    yield a.name, []


def modules():
    for path in sorted(PKG.rglob("*.py")):
        yield module_name(path), path


def test_the_card_units_are_subpackages_and_nothing_is_left_at_the_old_names():
    for unit in ("phi3mini", "lora", "kernels", "data", "training", "interp", "cli"):
        assert (PKG / unit / "__init__.py").is_file(), unit
    for old in ("phi3mini", "lora", "kernels", "training"):
        assert not (ROOT / old).exists(), f"{old}/ at the top level shadows or collides with other packages"
    units = {p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"}
    units |= {p.stem for p in PKG.glob("*.py") if p.name != "__init__.py"}
    assert units == set(ALLOWED), "a new unit needs its place in ALLOWED"


def test_each_unit_imports_only_the_units_below_it():
    bad = []
    for name, path in modules():
        unit = unit_of(name)
        for module, _ in project_imports(path):
            other = unit_of(module)
            if other and other != unit and other not in ALLOWED.get(unit, set()):
                bad.append(f"{path.relative_to(ROOT)} ({unit}) imports {module} ({other})")
    assert not bad, bad


def test_no_private_names_imported_across_modules():
    bad = [f"{path.relative_to(ROOT)}: from {module} import {n}"
           for _, path in modules() for module, names in project_imports(path) for n in names
           if n.startswith("_")]
    assert not bad, bad


@pytest.mark.parametrize("unit", sorted(u for u in ALLOWED if (PKG / u).is_dir()))
def test_no_import_cycle_between_modules(unit):
    packages = {name for name, path in modules() if path.name == "__init__.py"}
    # package __init__ files only re-export: an edge into a package counts as none
    graph = {name: {m for m, _ in project_imports(path) if m not in packages and m != name}
             for name, path in modules() if name not in packages and name.startswith(f"phi3lora.{unit}.")}
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
