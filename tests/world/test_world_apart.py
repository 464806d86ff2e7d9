"""The shapes world is demo data, not framework: it installs as `mm.world`, and no core module imports it."""

import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = (
    "mm.training",
    "mm.models",
    "mm.stages",
    "mm.formats",
    "mm.lm",
    "mm.encoders",
    "mm.adapters",
    "mm.datasets",
)

IMPORT_ALL = """
import importlib, pkgutil, sys
names = []
for package in sys.argv[1:]:
    pkg = importlib.import_module(package)
    names.append(package)
    if hasattr(pkg, "__path__"):
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".")]
for name in names:
    importlib.import_module(name)
print(len(names))
print(" ".join(sorted(m for m in sys.modules if m == "mm.world" or m.startswith("mm.world."))))
"""


def test_world_installs_under_mm():
    mod = importlib.import_module("mm.world")
    assert Path(mod.__file__).resolve().parent == ROOT / "world"


def test_core_modules_never_import_the_world():
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, *CORE, "mm.prompts"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    count, *world = out.stdout.splitlines()
    assert int(count) > 50, out.stdout  # every module of the core rooms was imported
    assert world in ([], [""]), f"core modules imported {world}"
