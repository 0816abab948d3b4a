"""Imports point down, read from the code's own import statements (no module is imported here).

launcher/ (the driver) → trainer/ (every worker) → models/, data_pipelines/, cluster/. The run spec, the
error type and run-directory storage live in trainer/ (trainer.spec, trainer.errors, trainer.storage), below
the launcher; models and data never import the trainer; trainer.storage imports nothing else of trainer's.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("launcher", "trainer", "models", "data_pipelines", "cluster")
# What each package may import of the others (itself always).
ALLOWED = {
    "launcher": {"trainer", "models", "data_pipelines", "cluster"},
    "trainer": {"models", "data_pipelines", "cluster"},
    "models": set(),
    "data_pipelines": set(),
    "cluster": set(),
}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the file, at any depth (lazy imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_every_package_is_checked():
    assert all(modules(p) for p in PACKAGES)
    assert any(m == "launcher.cli" or m.startswith("launcher.")
               for _, m in imports_of(ROOT / "launcher" / "ray_launch.py")), "the parser sees imports"


def test_imports_point_down():
    upward = []
    for package in PACKAGES:
        for path in modules(package):
            for line, module in imports_of(path):
                top = module.split(".")[0]
                if top in PACKAGES and top != package and top not in ALLOWED[package]:
                    upward.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not upward, "imports that point up:\n  " + "\n  ".join(upward)


def test_storage_is_the_bottom_of_the_trainer():
    """Run-directory storage is used by the driver and every worker: it needs nothing of either."""
    inside = []
    for path in sorted((ROOT / "trainer" / "storage").rglob("*.py")):
        for line, module in imports_of(path):
            if module.split(".")[0] in ("trainer", "launcher") and not module.startswith("trainer.storage"):
                inside.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not inside, "\n".join(inside)
