"""The README's commands work as written: every `mm ...` line of its bash blocks parses with the real CLI, names
files and configs that exist, and its KEY=VALUE overrides are valid keys of the config it loads; `make`
targets exist; Python blocks compile. The quick commands run for real in a scratch folder."""

import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mm.app.cli import build_parser
from mm.training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent


def blocks(lang: str) -> list[str]:
    """Fenced code blocks of a language in the README."""
    return re.findall(rf"```{lang}\n(.*?)\s*```", README.read_text(), flags=re.S)


def commands() -> list[str]:
    """Shell commands of the bash blocks (continuation lines joined, comments dropped)."""
    out = []
    for block in blocks("bash"):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


MM_COMMANDS = [c for c in commands() if re.match(r"^(torchrun .* -m )?mm ", c)]


def config_class(command: str, config: Path) -> type | None:
    """The typed config class a command loads its YAML into."""
    from mm.training.config import LMPretrainConfig

    text = config.read_text()
    if command == "pretrain-lm":
        return LMPretrainConfig
    if command == "pretrain-encoder":
        if re.search(r"^kind:\s*bestrq", text, flags=re.M):
            from mm.stages.bestrq_pretrain import BestRQPretrainConfig

            return BestRQPretrainConfig
        from mm.stages.clip_pretrain import ClipPretrainConfig

        return ClipPretrainConfig
    stage = re.search(r"^stage:\s*(\S+)", text, flags=re.M)
    stage = stage.group(1) if stage else "image-pretrain"
    if stage.startswith("image"):
        from mm.stages.image import ImageStageConfig

        return ImageStageConfig
    if stage == "video":
        from mm.stages.video import VideoStageConfig

        return VideoStageConfig
    if stage == "speech":
        from mm.stages.speech import SpeechStageConfig

        return SpeechStageConfig
    return None


def test_readme_has_the_two_commands_and_many_mm_commands():
    cmds = commands()
    assert "make demo" in cmds and "make test" in cmds
    assert len(MM_COMMANDS) >= 10


@pytest.mark.parametrize("line", MM_COMMANDS)
def test_each_mm_command_parses_and_its_config_keys_exist(line):
    argv = shlex.split(re.sub(r"^torchrun .* -m mm ", "mm ", line))[1:]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = list(getattr(args, "overrides", []) or []) + [e for e in extra if "=" in e]
    overrides += [d for d in (getattr(args, "data", None) or []) if re.match(r"^[A-Za-z_][\w.]*=", d)]
    assert not [e for e in extra if "=" not in e], f"unknown arguments in README line: {line}"
    config = getattr(args, "config", None)
    if config:
        path = ROOT / config
        assert path.is_file(), f"README names a config that does not exist: {config}"
        cls = config_class(args.command, path)
        if cls is not None:
            load_config(cls, path, overrides)  # raises ConfigError naming an unknown key


def test_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    for c in commands():
        if c.startswith("make "):
            for target in c.split()[1:]:
                assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), target


def test_python_blocks_compile():
    for i, block in enumerate(blocks("python")):
        compile(textwrap.dedent(block), f"README python block {i}", "exec")


def test_quick_readme_commands_run(tmp_path):
    """The README's first training example and generation, as written (they use README.md itself as data)."""
    (tmp_path / "README.md").write_text(README.read_text())
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    train = next(c for c in MM_COMMANDS if "--data README.md" in c)
    gen = next(c for c in MM_COMMANDS if c.startswith("mm generate"))
    for c in (train, gen):
        argv = shlex.split(c)
        r = subprocess.run([str(BIN / "mm"), *argv[1:]], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, (c, r.stderr[-2000:])
    assert (tmp_path / "runs" / "readme" / "final" / "config.json").is_file()
    prompt = shlex.split(gen)[-1]
    assert r.stdout.startswith(prompt) and r.stdout[len(prompt) :].strip(), r.stdout  # it adds words
