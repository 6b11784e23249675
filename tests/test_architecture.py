"""The package's layers (docs/ARCHITECTURE.md): no module imports a layer above its own, and no two modules import
each other (at any place in the file: at the top, under TYPE_CHECKING, or inside a function).

    config, errors, atomic, seeding  ←  model, data  ←  engine  ←  eval, viz  ←  stages  ←  cli (the entry points' part)

model and data sit side by side and import neither each other; the engine imports no evaluation code.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "crate_mae"
RANK = {"config": 0, "errors": 0, "atomic": 0, "seeding": 0, "model": 1, "data": 1, "engine": 2, "eval": 3, "viz": 3, "stages": 4, "cli": 5}


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("crate_mae."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("crate_mae."))
    return found


def test_no_module_imports_a_layer_above_it() -> None:
    faults = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if own not in RANK:
            continue
        for module in _imports(path):
            other = _layer(module)
            if other == own or other not in RANK:
                continue
            if RANK[other] > RANK[own] or {own, other} == {"model", "data"}:
                faults.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not faults, faults


def test_every_layer_of_the_package_is_ranked() -> None:
    layers = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if not p.name.startswith("_") and p.name != "py.typed"}
    assert layers - {"__pycache__"} == set(RANK)


def _module_name(path: Path) -> str:
    parts = ("crate_mae", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_two_modules_import_each_other() -> None:
    """A pair that imports each other, even for typing or inside a function, is one module split in two (or a
    layering waiting to break): a package's __init__ counts as a module, and `from pkg import mod` names both."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("crate_mae"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("crate_mae"))
        edges[name] = {m for m in found if m in modules and m != name}
    pairs = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if a in edges.get(b, set())})
    assert not pairs, pairs
