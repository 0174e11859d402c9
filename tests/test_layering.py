"""Dependencies point one way: the mlforce package never imports Prefect or the flows."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import ROOT


def test_no_prefect_import_in_source():
    offenders = []
    for path in (ROOT / "mlforce").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path}: {n}" for n in names if n.split(".")[0] in ("prefect", "flows")]
    assert offenders == []


def test_importing_every_module_does_not_load_prefect():
    code = (
        "import importlib, pkgutil, sys, mlforce\n"
        "for m in pkgutil.walk_packages(mlforce.__path__, 'mlforce.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'flows')]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
