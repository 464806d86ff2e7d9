"""`mm caption` / `mm describe` / `mm transcribe` given the checkpoint folder of another stage: exit 2 with one
line naming the folder, the stage it holds and the command that reads it (never a traceback), before any model is
loaded (the fake folders below hold only a config file)."""

import json

import pytest

from mm.app import cli
from mm.app.cli import main

COMMANDS = {"caption": "x.png", "describe": "x.mp4", "transcribe": "x.wav"}
READER = {
    "image-pretrain": "caption",
    "image-anneal": "caption",
    "video": "describe",
    "speech": "transcribe",
    "lm-pretrain": "generate",
}
READS = {"caption": "image-pretrain or image-anneal", "describe": "video", "transcribe": "speech"}


def fake_checkpoint(root, stage: str):
    """A folder holding only the config file of a `stage` checkpoint (an HF Llama config.json for lm-pretrain)."""
    folder = root / stage / "final"
    folder.mkdir(parents=True)
    if stage == "lm-pretrain":
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    else:
        (folder / "mm_config.json").write_text(json.dumps({"stage": stage, "lm_path": "../lm"}))
    return folder


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("stage", list(READER))
def test_a_checkpoint_of_another_stage_is_refused_naming_the_command_that_reads_it(
    tmp_path, capsys, command, stage
):
    folder = fake_checkpoint(tmp_path, stage)
    if READER[stage] == command:  # the command's own stage passes the check and reaches the loader
        assert cli._stage_of_checkpoint(folder) == stage
        assert not cli._refuse_other_stage(command, str(folder))
        assert capsys.readouterr().err == ""
        return
    assert main([command, "--checkpoint", str(folder), COMMANDS[command]]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"mm {command}: {folder} holds a '{stage}' checkpoint, not {READS[command]}; "
        f"read it with `mm {READER[stage]} --checkpoint {folder}`\n"
    )


def test_the_speech_bundle_given_to_caption_is_the_one_line_error_not_a_traceback(tmp_path, capfd):
    """The reported case: `mm caption --checkpoint runs/demo/speech/final IMG` ended in KeyError 'image_encoder'."""
    import subprocess
    import sys
    from pathlib import Path

    folder = fake_checkpoint(tmp_path, "speech")
    r = subprocess.run(
        [Path(sys.executable).parent / "mm", "caption", "--checkpoint", str(folder), "img.png"],
        capture_output=True,
        text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"mm caption: {folder} holds a 'speech' checkpoint, not image-pretrain or image-anneal; "
        f"read it with `mm transcribe --checkpoint {folder}`"
    ]


def test_a_stage_no_inference_command_reads_is_refused_and_a_missing_folder_left_to_the_loader(
    tmp_path, capsys
):
    other = tmp_path / "clip" / "final"
    other.mkdir(parents=True)
    (other / "mm_config.json").write_text(json.dumps({"stage": "clip-pretrain"}))
    assert main(["caption", "--checkpoint", str(other), "x.png"]) == 2
    assert capsys.readouterr().err == (
        f"mm caption: {other} holds a 'clip-pretrain' checkpoint, not image-pretrain or image-anneal; "
        "no inference command reads it\n"
    )
    assert cli._stage_of_checkpoint(tmp_path / "missing") is None
    assert not cli._refuse_other_stage("caption", str(tmp_path / "missing"))
    assert capsys.readouterr().err == ""
