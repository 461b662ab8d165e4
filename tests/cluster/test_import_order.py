"""Each layer imports alone, in a fresh interpreter (no upward import hides behind another)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


PACKAGE = ROOT / "hpcdl"


def _import_alone(module: str) -> list[str]:
    """Import ``module`` first thing in a fresh interpreter; the hpcdl modules it loaded."""
    code = (
        f"import json, sys; import {module}; "
        "print(json.dumps([m for m in sys.modules if m == 'hpcdl' or m.startswith('hpcdl.')]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, f"python -c 'import {module}' failed:\n{proc.stderr}"
    return json.loads(proc.stdout.splitlines()[-1])


def _registry_modules() -> list[str]:
    found = PACKAGE.rglob("registry.py")
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in found)


def test_job_imports_alone_without_the_old_registry():
    """``python -c "import hpcdl.job"`` works in a fresh process, and the registry is no longer a
    top-level module that job.py and the registry import from each other."""
    loaded = _import_alone("hpcdl.job")
    assert "hpcdl.job" in loaded
    assert "hpcdl.registry" not in loaded
    assert not (PACKAGE / "registry.py").exists(), "hpcdl/registry.py should live in scheduler/"


@pytest.mark.parametrize("module", ["hpcdl.scheduler", "hpcdl.site", "hpcdl.config"])
def test_lower_layers_import_first(module):
    """Each lower layer imports first thing in a fresh process (a cycle through the package's
    ``__init__`` shows up as an ImportError only in one import order)."""
    assert module in _import_alone(module)


def test_registry_imports_first():
    """The registry, wherever it lives, imports first thing too (it used to need job.py)."""
    found = _registry_modules()
    assert found, "no registry module in hpcdl"
    for module in found:
        assert module in _import_alone(module)
