"""What `pip install qbco` gives: every third-party module qbco imports is a dependency (not an extra), and
the recipes that `qbco train` matches ship inside the package."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].strip().lower().replace("_", "-")


def imported_modules(skip: tuple[str, ...] = ()) -> set[str]:
    """Top-level names of every absolute import in qbco/ (but the modules in `skip`), stdlib and qbco itself
    left out."""
    names = set()
    for path in (ROOT / "qbco").rglob("*.py"):
        if path.relative_to(ROOT).as_posix() in skip:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "qbco"}


TRACKERS = "qbco/train/report.py"  # the one module that imports an extra (--report-to's clients), when asked


def test_every_module_qbco_imports_is_a_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    dependencies = {requirement_name(d) for d in project["dependencies"]}
    extras = {requirement_name(d) for name, group in project["optional-dependencies"].items() if name != "dev"
              for d in group}
    owners = metadata.packages_distributions()

    def missing(modules, allowed):
        found = {}
        for module in modules:
            dists = {d.lower().replace("_", "-") for d in owners.get(module, [module])}
            if not dists & allowed:
                found[module] = sorted(dists)
        return found

    # scikit-learn and matplotlib were an extra: `qbco eval` failed on a plain `pip install qbco`.
    assert {"sklearn", "matplotlib"} <= imported_modules()
    assert missing(imported_modules(skip=(TRACKERS,)), dependencies) == {}
    # The trackers' clients are extras (qbco[mlflow], ...): imported by the tracker module alone, only when asked.
    assert missing(imported_modules(), dependencies | extras) == {}
    assert {"mlflow", "wandb", "trackio"} <= imported_modules() - imported_modules(skip=(TRACKERS,))


def test_the_wheel_holds_every_module_the_recipes_and_the_demo(tmp_path):
    """recipes/ sits at the top of the tree, where a user looks; the build maps it into the wheel as qbco.recipes
    (pyproject.toml's package-dir), and there `qbco train` finds it (run.config.recipes_folder). The wheel is
    built here, from this tree, and read as a zip."""
    # With the environment's own setuptools when it is new enough for pyproject.toml (no download), else isolated.
    own = int(metadata.version("setuptools").split(".")[0]) >= 68
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", *(["--no-build-isolation"] if own else []),
                          "--quiet", "--wheel-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("qbco-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
    assert {"qwen2.5-3b-helpsteer2.yaml", "paper.yaml"} <= set(recipes)
    assert {f"qbco/recipes/{name}" for name in recipes} <= names
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "qbco").rglob("*.py")}
    assert modules - names == set()  # a package missing from pyproject.toml's list would be missing here
    assert "qbco/data/demo.jsonl" in names


def test_the_recipes_qbco_reads_are_the_ones_at_the_top_of_the_tree():
    from qbco.run.config import recipes_folder, shipped_recipes

    assert recipes_folder().resolve() == (ROOT / "recipes").resolve()  # an editable install reads them in place
    assert set(shipped_recipes()) == {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
