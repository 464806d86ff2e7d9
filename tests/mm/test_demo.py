"""`mm demo`'s orchestration with fake stage runs: which steps a modality runs, the stage cache, the packaged
presets, and which sections of an earlier report.json survive a run."""

import json
from importlib import resources
from pathlib import Path

import pytest

import mm.app.demo as demo
import mm.formats.bundle
from mm.app.demo import run_demo, selected_steps
from mm.app.demo_steps import STEPS, load_preset
from mm.app.demo_world import WORLD
from mm.lm import Tokenizer, Transformer, preset, save_hf
from mm.training.config import LMPretrainConfig

ROOT = Path(__file__).resolve().parents[2]


class FakeRuns:
    """Stands in for `mm.training.runner.run`: writes OUT/final and OUT/summary.json, records the stage."""

    def __init__(self):
        self.calls = []

    def __call__(self, cfg, resume=False, before_step=None):
        out = Path(cfg.out)
        final = out / "final"
        final.mkdir(parents=True, exist_ok=True)
        self.calls.append(out.name)
        if out.name == "lm-pretrain":  # a real (untrained) HF Llama folder: the demo loads and prompts it
            text = Path(cfg.data[0].paths[0]).read_text()
            tok = Tokenizer.train(text.splitlines()[:300], 300)
            save_hf(Transformer(preset("tiny", vocab_size=tok.vocab_size)), final)
            tok.save(final)
            (final / "trained_on.txt").write_text(str(len(text)))
        else:
            (final / "weights.txt").write_text(f"{out.name} {cfg.out}")
        summary = {
            "step": 7,
            "stopped": "max_steps",
            "final_loss": 1.5,
            "wall_time_s": 0.25,
            "heldout_ppl": 3.0,
            "params": 1234,
            "eval": {
                "heldout_sentences": {"wer": 0.25, "exact_match": 0.5},
                "heldout_voices": {"wer": 0.5, "wer_per_voice": {"en-gb": 0.5}},
            },
        }
        (out / "summary.json").write_text(json.dumps(summary))
        return summary


def fake_speech_world(data_dir):
    sp = data_dir / "speech"
    if (sp / "train.jsonl").is_file():
        return {}
    (sp / "train").mkdir(parents=True)
    (sp / "questions_train").mkdir(parents=True)
    (sp / "train" / "0.wav").write_bytes(b"RIFF0000")
    splits = ("train", "train_mix", "heldout_sentences", "heldout_voices", "questions_heldout")
    for split in (*splits, "untrained_forms", "untrained_voices"):
        (sp / f"{split}.jsonl").write_text(
            json.dumps({"audio": "train/0.wav", "text": "a red circle"}) + "\n"
        )
    return {"train": 0.5}


@pytest.fixture
def fake_runs(monkeypatch):
    runs = FakeRuns()
    monkeypatch.setattr(demo, "run", runs)
    monkeypatch.setitem(WORLD, "speech", fake_speech_world)
    monkeypatch.setattr(mm.formats.bundle, "verify_frozen", lambda path: (True, f"fake check of {path}"))
    return runs


def test_modalities_run_their_section_and_what_it_needs():
    names = {
        m: [s.name for s in selected_steps(m)] for m in ("lm", "image", "video", "speech", "chat", "all")
    }
    assert names["lm"] == ["lm-pretrain"]
    assert names["image"] == ["lm-pretrain", "clip-pretrain", "image-pretrain", "image-anneal"]
    assert names["video"] == names["image"] + ["video"]  # video starts from image-anneal
    assert names["speech"] == ["lm-pretrain", "bestrq-pretrain", "speech"]
    assert names["all"] == names["video"] + ["bestrq-pretrain", "speech"]  # not the chat stages
    assert names["chat"] == names["video"] + ["lm-sft", "vision-sft"]  # on top of the video bundle
    with pytest.raises(ValueError, match="available: lm, image, video, speech, chat, all"):
        selected_steps("audio")


def test_steps_read_the_packaged_presets(tmp_path):
    assert (
        Path(str(resources.files("mm.configs"))).resolve() == ROOT / "configs"
    )  # editable: the repo's folder
    presets = [s.preset for s in STEPS]
    assert presets == [
        "lm/tiny.yaml",
        "encoders/clip_tiny.yaml",
        "stages/image_pretrain_tiny.yaml",
        "stages/image_anneal_tiny.yaml",
        "stages/video_tiny.yaml",
        "encoders/bestrq_tiny.yaml",
        "stages/speech_tiny.yaml",
        "lm/sft_tiny.yaml",
        "stages/vision_sft_tiny.yaml",
    ]
    assert load_preset(LMPretrainConfig, "lm/tiny.yaml").train.max_steps == 1500
    by_name = {s.name: s.config(tmp_path, tmp_path / "data") for s in STEPS}
    assert by_name["image-anneal"].init_from == str(tmp_path / "image-pretrain" / "final")
    assert by_name["vision-sft"].init_from == str(tmp_path / "video" / "final")
    assert by_name["vision-sft"].lm == str(tmp_path / "lm-sft" / "final")
    assert by_name["lm-sft"].init_from == str(tmp_path / "lm-pretrain" / "final")
    assert by_name["image-anneal"].encoder_weights is None
    assert by_name["image-pretrain"].encoder_weights == str(
        tmp_path / "clip-pretrain/final/encoder.safetensors"
    )
    assert by_name["speech"].data.heldout == [
        str(tmp_path / f"data/speech/{s}.jsonl")
        for s in (
            "heldout_sentences",
            "heldout_voices",
            "questions_heldout",
            "untrained_forms",
            "untrained_voices",
        )
    ]
    assert by_name["speech"].data.train == [str(tmp_path / "data/speech/train_mix.jsonl")]
    assert all(cfg.out == str(tmp_path / name) for name, cfg in by_name.items())


def test_lm_only_run_drops_a_stale_section_of_an_earlier_report(tmp_path, fake_runs):
    out = tmp_path / "demo"
    out.mkdir()
    stale = {
        "lm": {"heldout_ppl": 99.0},
        "speech": {
            "wer_heldout_sentences": 0.9,
            "stages": {"speech": {"reused": False, "wall_time_s": 5.0, "stage_seconds": 5.0}},
            "lm_frozen": True,
        },
        "lm_frozen": True,
    }
    (out / "report.json").write_text(json.dumps(stale))
    run_demo(out, modality="lm")
    report = json.loads((out / "report.json").read_text())
    assert fake_runs.calls == ["lm-pretrain"]
    assert "speech" not in report
    assert report["lm"]["heldout_ppl"] == 3.0 and report["lm"]["stages"]["lm-pretrain"]["reused"] is False
    assert list(report["wall_seconds"]) == ["lm-pretrain"]
    md = (out / "report.md").read_text()
    assert "Speech recognition" not in md and "speech.wer_heldout_sentences" not in md


def test_earlier_sections_survive_only_while_their_stages_are_unchanged(tmp_path, fake_runs):
    out = tmp_path / "demo"
    first = run_demo(out, modality="speech")
    assert fake_runs.calls == ["lm-pretrain", "bestrq-pretrain", "speech"]
    speech = first["speech"]
    assert speech["wer_heldout_sentences"] == 0.25 and speech["wer_per_voice"] == {"en-gb": 0.5}
    assert speech["lm_frozen"] is True and speech["checkpoint"] == str(out / "speech" / "final")
    assert speech["synth_wall_time_s"] == {"train": 0.5}
    assert set(speech["stages"]) == {"bestrq-pretrain", "speech"}
    assert first["lm_frozen"] is True

    # An lm-only run: every stage is cached, the speech section is still valid and is kept, as reused.
    fake_runs.calls.clear()
    second = run_demo(out, modality="lm")
    assert fake_runs.calls == []
    assert second["lm"]["stages"]["lm-pretrain"]["reused"] is True
    kept = second["speech"]
    assert kept["wer_heldout_sentences"] == 0.25
    assert kept["stages"]["speech"]["reused"] is True and kept["stages"]["speech"]["wall_time_s"] == 0.0
    assert kept["stages"]["speech"]["cache_key"] == speech["stages"]["speech"]["cache_key"]
    assert second["this_run_seconds"]["speech"] == 0.0
    assert "Speech recognition" in (out / "report.md").read_text()

    # New held-out voices: the speech stage's key changes, so its section no longer describes its inputs.
    with open(out / "data" / "speech" / "heldout_voices.jsonl", "a") as f:
        f.write(json.dumps({"audio": "train/0.wav", "text": "a blue square"}) + "\n")
    third = run_demo(out, modality="lm")
    assert fake_runs.calls == [] and "speech" not in third
    # ... and a speech run reruns only that stage (the BEST-RQ encoder's inputs did not change).
    run_demo(out, modality="speech")
    assert fake_runs.calls == ["speech"]

    # A retrained LM (new text) invalidates the speech section too: it was trained against the old LM.
    fake_runs.calls.clear()
    with open(out / "data" / "text" / "train.txt", "a") as f:
        f.write("a small red circle\n")
    fourth = run_demo(out, modality="lm")
    assert fake_runs.calls == ["lm-pretrain"] and "speech" not in fourth


class FakeBackground:
    """Stands in for a `BackgroundSection`: running until `done` is set."""

    threads = 1

    def __init__(self):
        self.done = False

    def running(self):
        return not self.done


def test_thread_budget_gives_the_background_section_its_core_and_takes_it_back(monkeypatch):
    import torch

    from mm.app.demo import ThreadBudget

    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    bg = FakeBackground()
    budget = ThreadBudget(bg)
    assert budget.threads(2) == 1 and budget.threads(1) == 1  # one core each while both run
    before = torch.get_num_threads()
    try:
        hook = budget.hook(2)
        hook(0)
        assert torch.get_num_threads() == 1
        bg.done = True  # the background section ended: the stage takes its threads back at the next step
        hook(1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 8)
    assert ThreadBudget(FakeBackground()).threads(4) == 4  # cores to spare: nothing to give up
    assert ThreadBudget().threads(3) == 3  # no background section


def test_speech_runs_beside_image_and_video_only_when_both_run(monkeypatch):
    from mm.app.demo import runs_beside

    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    beside = {m: runs_beside(selected_steps(m)) for m in ("lm", "image", "video", "speech", "all")}
    assert beside == {"lm": False, "image": False, "video": False, "speech": False, "all": True}
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 1)
    assert runs_beside(selected_steps("all")) is False  # one core: one section after the other
