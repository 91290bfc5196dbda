"""The house (docs/architecture.md): qbco's packages are layers, imports only run downward, the packages of one
layer do not import each other, no module of a package imports in a circle, and the run folder's file names
live in one module. The layer contract is import-linter's, configured in pyproject.toml; these tests run it on
the package and on copies of it with one bad import added, which it must refuse."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    """import-linter with pyproject.toml's contracts on the qbco package under `root` (first on the path)."""
    return subprocess.run([str(LINT), str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def copy_of_the_package(tmp_path_factory):
    """A copy of pyproject.toml and qbco/ to add one bad import to, per test."""
    top = tmp_path_factory.mktemp("house")
    shutil.copy(ROOT / "pyproject.toml", top / "pyproject.toml")
    shutil.copytree(ROOT / "qbco", top / "qbco", ignore=shutil.ignore_patterns("__pycache__"))
    return top


def test_the_package_keeps_its_layers_and_has_no_import_circle():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout


@pytest.mark.parametrize("module, bad_import, broken", [
    # up a layer: the reader (data) would depend on the command line
    ("qbco/data/reader.py", "from qbco.cli import tables", "qbco's layers"),
    # up a layer from inside a function, the way the old circles were dodged: still an import
    ("qbco/reward/loss.py", "def _dodge():\n    from qbco.run.folder import RunFolder  # noqa\n", "qbco's layers"),
    # sideways on one layer: eval may not lean on train
    ("qbco/eval/plot.py", "from qbco.train import loop", "qbco's layers"),
    # a circle inside a package: names <- loading already; names -> loading closes it
    ("qbco/model/names.py", "from qbco.model import loading", "no import circle"),
])
def test_a_bad_import_is_refused(copy_of_the_package, module, bad_import, broken):
    target = copy_of_the_package / module
    original = target.read_text(encoding="utf-8")
    target.write_text(original + "\n" + bad_import + "\n", encoding="utf-8")
    try:
        out = lint(copy_of_the_package)
    finally:
        target.write_text(original, encoding="utf-8")
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(re.escape(broken) + r"[^\n]* BROKEN\n", out.stdout), out.stdout


# An import of qbco's own modules inside a function is allowed only to keep a start-up cheap (torch under
# `qbco --help`, `import qbco`), never to dodge a circle: these are all there are, each commented where it stands.
IMPORTS_FOR_START_UP = {
    ("qbco/__init__.py", "qbco.eval.score"),  # `import qbco` without torch; Scorer on first use
    ("qbco/run/config.py", "qbco.reward.objectives"),  # TrainConfig's checks; --help reads the config's fields
    *{("qbco/cli/main.py", m) for m in ("qbco.run.folder", "qbco.train.loop", "qbco.eval.evaluate", "qbco.eval.generate",
                                       "qbco.eval.score", "qbco.eval.plot", "qbco.export.merge",
                                       "qbco.export.gguf")},  # merge --gguf: torch, transformers, gguf
}


def test_qbco_modules_are_imported_in_functions_only_for_start_up_cost():
    found = set()
    for path in sorted((ROOT / "qbco").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qbco"):
                    found.add((path.relative_to(ROOT).as_posix(), node.module))
                elif isinstance(node, ast.Import):
                    found |= {(path.relative_to(ROOT).as_posix(), a.name) for a in node.names if a.name.startswith("qbco")}
    assert found == IMPORTS_FOR_START_UP


# Every file of a run is named in the run-folder module; no other module spells one (docs/architecture.md).
RUN_FILE_NAMES = ("config.yaml", "reward_shift.json", "state.json", "state.pt", "calibration.json", "metrics.jsonl",
                  "adapter_config.json", "adapter_model.safetensors", "qbco_merge.json")


def test_the_run_folder_module_alone_spells_the_names_of_a_runs_files():
    folder = (ROOT / "qbco/run/folder.py").read_text(encoding="utf-8")
    assert all(f'"{name}"' in folder for name in RUN_FILE_NAMES)
    spelled = {(path.relative_to(ROOT).as_posix(), name)
               for path in (ROOT / "qbco").rglob("*.py") if path.name != "folder.py" or path.parent.name != "run"
               for name in RUN_FILE_NAMES if name in path.read_text(encoding="utf-8")}
    assert spelled == set()


def test_every_package_init_is_thin():
    """A package __init__ holds a docstring only (qbco's own: __version__ and the lazy Scorer): a re-export would
    let a test patch a name where it is not looked up, and the patch would silently do nothing."""
    for init in (ROOT / "qbco").rglob("__init__.py"):
        if init.parent == ROOT / "qbco":
            continue
        body = ast.parse(init.read_text(encoding="utf-8")).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), init
