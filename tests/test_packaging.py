"""A built wheel holds every room under `mm.` and the YAML presets (`mm.configs`), and an installed (not
editable) `mm` finds the presets `mm demo` reads, away from the repository.

The wheel is built from a copy of the source tree, so that the build leaves no `build/` folder in the repository.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mm.app.demo_steps import STEPS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "mm",
    "mm.training",
    "mm.models",
    "mm.stages",
    "mm.app",
    "mm.formats",
    "mm.formats.hf_llama",
    "mm.formats.hf_mllama",
    "mm.lm",
    "mm.encoders",
    "mm.adapters",
    "mm.datasets",
    "mm.configs",
)

# Run inside the installed copy: where each package comes from, and every demo step's config from its preset.
PROBE = """
import json, sys
from importlib import resources
from pathlib import Path
import mm, mm.app.demo_steps as ds, mm.lm, mm.configs
from mm.training.config import LMPretrainConfig
out = Path("out")
print(json.dumps({
    "files": {name: sys.modules[name].__file__ for name in ("mm", "mm.lm", "mm.configs", "mm.app.demo_steps")},
    "configs": str(resources.files("mm.configs")),
    "steps": {s.name: [s.preset, type(s.config(out, out / "data")).__name__] for s in ds.STEPS},
    "lm_max_steps": ds.load_preset(LMPretrainConfig, "lm/tiny.yaml").train.max_steps,
}))
"""


def built_wheel(tmp: Path) -> Path:
    """Build the project's wheel (no dependencies, no build isolation) from a copy of the source tree."""
    src = tmp / "src"
    skip = shutil.ignore_patterns(
        ".venv", "runs", ".git", "build", "*.egg-info", "__pycache__", ".ruff_cache", ".pytest_cache"
    )
    shutil.copytree(ROOT, src, ignore=skip)
    dist = tmp / "dist"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(dist),
        ".",
    ]
    subprocess.run(cmd, cwd=src, check=True, capture_output=True, text=True)
    (wheel,) = dist.glob("mm-*.whl")
    return wheel


@pytest.mark.slow
def test_installed_wheel_ships_rooms_and_presets(tmp_path):
    wheel = built_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in PACKAGES:
        assert f"{pkg.replace('.', '/')}/__init__.py" in names, pkg
    presets = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
    assert "configs/lm/tiny.yaml" in presets and len(presets) >= 8
    for p in presets:
        assert f"mm/{p}" in names, p
    assert all(f"mm/configs/{s.preset}" in names for s in STEPS)
    # one import root: nothing lands beside `mm` (no top-level `datasets` or `adapters` shadowing PyPI's)
    assert {n.split("/")[0] for n in names} == {"mm", wheel.name.split("-py")[0] + ".dist-info"}

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # -P: the current folder is not put on sys.path; PYTHONPATH puts the installed copy before the repo's
    # editable install (whose finder comes after the path-based one).
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    probe = subprocess.run(
        [sys.executable, "-P", "-c", PROBE],
        cwd=elsewhere,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    for name, file in found["files"].items():
        assert Path(file).resolve().is_relative_to(site.resolve()), (name, file)
    assert Path(found["configs"]).resolve() == (site / "mm" / "configs").resolve()
    assert found["steps"] == {
        "lm-pretrain": ["lm/tiny.yaml", "LMPretrainConfig"],
        "clip-pretrain": ["encoders/clip_tiny.yaml", "ClipPretrainConfig"],
        "image-pretrain": ["stages/image_pretrain_tiny.yaml", "ImageStageConfig"],
        "image-anneal": ["stages/image_anneal_tiny.yaml", "ImageStageConfig"],
        "video": ["stages/video_tiny.yaml", "VideoStageConfig"],
        "bestrq-pretrain": ["encoders/bestrq_tiny.yaml", "BestRQPretrainConfig"],
        "speech": ["stages/speech_tiny.yaml", "SpeechStageConfig"],
        "lm-sft": ["lm/sft_tiny.yaml", "LMSFTConfig"],
        "vision-sft": ["stages/vision_sft_tiny.yaml", "VisionSFTConfig"],
    }
    assert found["lm_max_steps"] == 1500  # the preset's value, read from the installed copy
    helped = subprocess.run(
        [sys.executable, "-P", "-m", "mm", "train", "--help"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert helped.returncode == 0, helped.stderr
    assert "--config" in helped.stdout and "--resume" in helped.stdout
