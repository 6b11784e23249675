"""The package's layers (docs/ARCHITECTURE.md): no module imports a layer above its own.

    config, atomic, seeding  ←  model, data  ←  engine  ←  eval, viz  ←  stages  ←  cli (the entry points' shared part)

model and data sit side by side and import neither each other; the engine imports no evaluation code.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "crate_mae"
RANK = {"config": 0, "atomic": 0, "seeding": 0, "model": 1, "data": 1, "engine": 2, "eval": 3, "viz": 3, "stages": 4, "cli": 5}


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
