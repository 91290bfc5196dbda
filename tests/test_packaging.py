"""What `pip install qbco` gives: every third-party module qbco imports is a dependency (not an extra), and
the recipes that `qbco train` matches ship inside the package."""

from __future__ import annotations

import ast
import fnmatch
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].strip().lower().replace("_", "-")


def imported_modules() -> set[str]:
    """Top-level names of every absolute import in qbco/, stdlib and qbco itself left out."""
    names = set()
    for path in (ROOT / "qbco").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "qbco"}


def test_every_module_qbco_imports_is_a_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    dependencies = {requirement_name(d) for d in project["dependencies"]}
    owners = metadata.packages_distributions()
    missing = {}
    for module in imported_modules():
        dists = {d.lower().replace("_", "-") for d in owners.get(module, [module])}
        if not dists & dependencies:
            missing[module] = sorted(dists)
    # scikit-learn and matplotlib were an extra: `qbco eval` failed on a plain `pip install qbco`.
    assert {"sklearn", "matplotlib"} <= imported_modules()
    assert missing == {}


def test_the_recipes_ship_in_the_package():
    from qbco.config import RECIPES, shipped_recipes

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["package-data"]["qbco"]
    recipes = shipped_recipes()
    assert {"qwen2.5-3b-helpsteer2", "smollm2-135m-demo"} <= set(recipes)
    assert RECIPES.parent == ROOT / "qbco"
    for path in recipes.values():
        assert any(fnmatch.fnmatch(path.relative_to(ROOT / "qbco").as_posix(), p) for p in patterns), path
