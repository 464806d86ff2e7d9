"""Protects the one-import-root layout: our rooms live under `mm.`, never shadowing HF `datasets`."""

import importlib
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_rooms_import_under_mm():
    for room in ("lm", "encoders", "adapters", "datasets"):
        mod = importlib.import_module(f"mm.{room}")
        assert Path(mod.__file__).resolve().parent == ROOT / room, (room, mod.__file__)


def test_hf_datasets_not_shadowed_in_process():
    import datasets

    import mm.datasets

    assert Path(datasets.__file__).resolve().is_relative_to(Path(sysconfig.get_paths()["purelib"]).resolve())
    assert hasattr(datasets, "load_dataset")  # the Hugging Face package, not ours
    assert Path(mm.datasets.__file__).resolve().parent == ROOT / "datasets"


def test_hf_datasets_not_shadowed_from_another_cwd(tmp_path):
    code = (
        "import datasets, mm.datasets, mm.lm; "
        "print(datasets.__file__); print(mm.datasets.__file__); print(hasattr(datasets, 'load_dataset'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    hf_file, ours, has_load = out.stdout.split()
    assert "site-packages" in hf_file
    assert Path(ours).resolve().parent == ROOT / "datasets"
    assert has_load == "True"
