"""The demo's speech figures (`speech_figures`): held-out WER with its witnesses (the CTC head alone, the LM
repeating the text), speech translation, spoken questions, untrained sentence forms and voices, the WER per
audio condition, and the 60-second recording with pauses (`DATA/speech/long_recording.wav`, written by
`mm.world.speech.synth_long_recording`) transcribed whole by `transcribe_long`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mm.app.demo_world import content_hash
from mm.lm.io import write_json

if TYPE_CHECKING:
    from mm.app.demo_steps import StepRun

__all__ = ["run_long_recording", "speech_figures"]

log = logging.getLogger("mm.app.demo")

_WER_SPLITS = ("heldout_sentences", "heldout_voices", "untrained_forms", "untrained_voices")


def run_long_recording(bundle: Path, data_dir: Path) -> dict[str, Any]:
    """Transcribe `DATA/speech/long_recording.wav` whole (cut on silence, pieces in order): its WER against the
    sentences joined in order, and the transcript; kept in `bundle/../long_recording.json` while the bundle and
    the recording are unchanged."""
    from mm.datasets.audio import decode_audio
    from mm.models.speech import transcribe_long
    from mm.stages.evaluation import word_error_rate
    from mm.stages.speech import load_speech_bundle

    wav, ref_file = data_dir / "speech" / "long_recording.wav", data_dir / "speech" / "long_recording.json"
    if not (wav.is_file() and ref_file.is_file()):
        raise FileNotFoundError(f"{wav} or {ref_file} does not exist (written by `synth_speech_world`)")
    key = content_hash("long_recording", bundle, wav, ref_file)
    cache = bundle.parent / "long_recording.json"
    if cache.is_file():
        prev = json.loads(cache.read_text())
        if prev.get("hash") == key and isinstance(prev.get("result"), dict):
            return prev["result"]
    t0 = time.perf_counter()
    ref = json.loads(ref_file.read_text())
    model, tok, features, meta = load_speech_bundle(bundle)
    wave = decode_audio(wav)
    text = transcribe_long(model, tok, [wave], features, prompt=meta["prompt"])[0]
    result = {
        "seconds": ref["seconds"],
        "sentences": len(ref["sentences"]),
        "wer": word_error_rate([ref["text"]], [text]),
        "reference": ref["text"],
        "transcript": text,
    }
    log.info(
        "speech: the %.0f-s recording (%d sentences with pauses) transcribed whole, WER %.3f",
        result["seconds"],
        result["sentences"],
        result["wer"],
    )
    write_json({"hash": key, "result": result, "seconds": time.perf_counter() - t0}, cache)
    return result


def speech_figures(run: StepRun) -> dict[str, Any]:
    """WER per held-out split with where the errors come from, translation, spoken questions, conditions, the
    long recording, examples."""
    ev = run.summary.get("eval", {})
    out: dict[str, Any] = {}
    for split in _WER_SPLITS:
        res = ev.get(split)
        if not isinstance(res, dict) or "wer" not in res:
            continue
        out[f"wer_{split}"] = res.get("wer")
        out[f"exact_match_{split}"] = res.get("exact_match")
        # Where the errors come from: the audio side alone (the adapter's CTC head, greedy) and the frozen LM
        # repeating the same sentences given as text (the ceiling of transcripts that the LM writes).
        out[f"ctc_wer_{split}"] = res.get("ctc_wer")
        out[f"lm_copy_wer_{split}"] = res.get("lm_copy_wer")
        if isinstance(res.get("ast"), dict):
            out[f"ast_bleu_{split}"] = res["ast"].get("bleu")
            out[f"ast_exact_match_{split}"] = res["ast"].get("exact_match")
    out["wer_per_voice"] = {
        **(ev.get("heldout_voices", {}).get("wer_per_voice") or {}),
        **(ev.get("untrained_voices", {}).get("wer_per_voice") or {}),
    }
    questions = ev.get("questions_heldout")
    if isinstance(questions, dict) and "accuracy" in questions:
        out["question_accuracy"] = questions["accuracy"]
        out["question_accuracy_by_family"] = questions.get("by_family")
    if run.summary.get("wer_by_condition"):
        out["wer_by_condition"] = run.summary["wer_by_condition"]
    ok = bool(run.frozen and run.frozen[0])  # the bundle refuses a changed LM
    recording = run.data_dir / "speech" / "long_recording.wav"
    if ok and recording.is_file():
        long = run_long_recording(run.final, run.data_dir)
        out["long_recording_wer"] = long["wer"]
        out["long_recording"] = long
    out["examples"] = {k: v.get("examples") for k, v in ev.items() if isinstance(v, dict)}
    return out
