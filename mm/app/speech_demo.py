"""The speech part of `mm demo` (`--modality speech|all`): speak the shapes world with espeak-ng, pretrain the
speech encoder with BEST-RQ (`bestrq-pretrain`), train the `speech` stage against the cached demo LM, and report
the word error rate on held-out sentences and held-out voices plus both learning curves. Stages are cached by
content hash like the other demo stages (`mm.app.demo.cached_stage`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mm.training.config import config_to_yaml, load_config

REPO = Path(__file__).resolve().parents[2]


def synth_speech_world(data_dir: Path) -> dict[str, float]:
    """Write the spoken shapes world's three splits unless present; seconds spent per split."""
    from mm.datasets.spoken_shapes import DEFAULT_SPEECH_COUNTS, synth_speech

    spent = {}
    for split, n in DEFAULT_SPEECH_COUNTS.items():
        if not (data_dir / "speech" / f"{split}.jsonl").is_file():
            t0 = time.perf_counter()
            synth_speech(data_dir, n=n, seed=0, split=split)
            spent[split] = time.perf_counter() - t0
    return spent


def _curve(metrics: Path, key: str, every: int) -> list[dict[str, float]]:
    """(step, value) of `key` in metrics.jsonl, averaged over windows of `every` steps."""
    if not metrics.is_file():
        return []
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    out = []
    for s in range(0, len(recs), every):
        win = [r[key] for r in recs[s : s + every] if key in r]
        if win:
            out.append({"step": recs[min(s + every, len(recs)) - 1]["step"], "value": sum(win) / len(win)})
    return out


def run_speech_stages(out: Path, data_dir: Path) -> dict[str, Any]:
    """bestrq-pretrain -> speech on the spoken shapes world; WER on the held-out splits; LM frozen check."""
    from mm.app.demo import _hash, cached_stage
    from mm.stages.bestrq_pretrain import BestRQPretrainConfig, run_bestrq_pretrain
    from mm.stages.speech import SpeechStageConfig, run_speech_stage
    from mm.training.bundle import verify_frozen

    t_all = time.perf_counter()
    synth_s = synth_speech_world(data_dir)
    lm_dir = out / "lm-pretrain" / "final"
    sp = data_dir / "speech"
    train, sent, voices = sp / "train.jsonl", sp / "heldout_sentences.jsonl", sp / "heldout_voices.jsonl"
    report: dict[str, Any] = {"stages": {}, "synth_wall_time_s": synth_s}

    bq = load_config(BestRQPretrainConfig, REPO / "configs" / "encoders" / "bestrq_tiny.yaml")
    bq.out = str(out / "bestrq-pretrain")
    bq.data.train, bq.data.heldout = [str(train)], [str(voices)]
    key = _hash(config_to_yaml(bq), train, sp / "train")
    t0 = time.perf_counter()
    s, reused = cached_stage(Path(bq.out), key, lambda r: run_bestrq_pretrain(bq, resume=r))
    report["stages"]["bestrq-pretrain"] = {
        "reused": reused,
        "wall_time_s": time.perf_counter() - t0,
        "train_wall_time_s": s.get("wall_time_s"),
        "stage_seconds": s.get("stage_seconds"),
        "step": s.get("step"),
        "final_loss": s.get("final_loss"),
        "heldout": s.get("heldout"),
        "masked_loss_curve": _curve(Path(bq.out) / "metrics.jsonl", "loss", 20),
    }

    cfg = load_config(SpeechStageConfig, REPO / "configs" / "stages" / "speech_tiny.yaml")
    cfg.lm, cfg.out = str(lm_dir), str(out / "speech")
    cfg.encoder_weights = str(Path(bq.out) / "final" / "encoder.safetensors")
    cfg.data.train, cfg.data.heldout = [str(train)], [str(sent), str(voices)]
    key = _hash(config_to_yaml(cfg), _hash(lm_dir), key, train, sp / "train", sent, voices)
    t0 = time.perf_counter()
    s, reused = cached_stage(Path(cfg.out), key, lambda r: run_speech_stage(cfg, resume=r))
    ev = s.get("eval", {})
    report["stages"]["speech"] = {
        "reused": reused,
        "wall_time_s": time.perf_counter() - t0,
        "train_wall_time_s": s.get("wall_time_s"),
        "stage_seconds": s.get("stage_seconds"),
        "step": s.get("step"),
        "final_loss": s.get("final_loss"),
        "loss_curve": _curve(Path(cfg.out) / "metrics.jsonl", "loss", 20),
        "data_skips": s.get("data_skips"),
    }
    report["wer_heldout_sentences"] = ev.get("heldout_sentences", {}).get("wer")
    report["wer_heldout_voices"] = ev.get("heldout_voices", {}).get("wer")
    report["wer_per_voice"] = ev.get("heldout_voices", {}).get("wer_per_voice")
    report["exact_match_heldout_sentences"] = ev.get("heldout_sentences", {}).get("exact_match")
    report["exact_match_heldout_voices"] = ev.get("heldout_voices", {}).get("exact_match")
    # Where the errors come from: the audio side alone (the adapter's CTC head, greedy) and the frozen LM
    # repeating the same sentences given as text (the ceiling of transcripts that the LM writes).
    report["ctc_wer_heldout_sentences"] = ev.get("heldout_sentences", {}).get("ctc_wer")
    report["ctc_wer_heldout_voices"] = ev.get("heldout_voices", {}).get("ctc_wer")
    report["lm_copy_wer_heldout_sentences"] = ev.get("heldout_sentences", {}).get("lm_copy_wer")
    report["lm_copy_wer_heldout_voices"] = ev.get("heldout_voices", {}).get("lm_copy_wer")
    report["examples"] = {k: v.get("examples") for k, v in ev.items()}
    final = Path(cfg.out) / "final"
    ok, msg = verify_frozen(final)
    report["lm_frozen"], report["lm_frozen_detail"] = ok, msg
    report["checkpoint"] = str(final)
    report["wall_time_s"] = time.perf_counter() - t_all
    return report
