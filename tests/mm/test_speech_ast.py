"""Speech translation (AST) and audio conditions in the speech stage: with AST off the batches are the ASR
batches of before; with AST on the drawn share of rows are translation rows laid out as the text corpus's parallel
line with the speech in the English sentence's place (CTC still on the English); BLEU and exact match on a
hand-made example; `mm translate` refuses another language and bad files; `mm transcribe` decodes a long
recording piece by piece, in order; training conditions are fixed by the stream position (cached or not); the
evaluation reports one WER per condition (clip i heard with seed i). Spoken questions: a record with `context`
and `answer` is a row laid out as the corpus's question line (the speech in the question's place, no prompt),
scored by answer accuracy per family; `mm chat --audio` answers with a bundle trained on them."""

import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch

from mm.datasets.audio import SAMPLE_RATE, AudioFeatures, SpeechCollator, audio_decoder, decode_audio
from mm.datasets.audio_conditions import apply_condition
from mm.datasets.seeding import derive_seed
from mm.datasets.speech_tasks import SpeechBatches, SpeechRows
from mm.datasets.streams import open_stream
from mm.lm import Tokenizer, Transformer, preset
from mm.prompts import ASR_PROMPT, AST_PROMPT, DIALOGUE_PROMPT
from mm.world.corpus import QUESTION_FAMILIES
from mm.world.spanish import to_spanish, translation_line

SR = SAMPLE_RATE
TEXTS = [
    "the red circle moves down.",
    "a small blue square.",
    "the green triangle moves left.",
    "a large orange circle and a small purple square.",
    "the blue square moves up.",
    "a small red triangle.",
]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tone(freq: float, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * math.pi * freq * t) * np.sin(math.pi * t / seconds)).astype(np.float32)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Six tone clips with world sentences and their Spanish; a manifest without `spanish` too."""
    root = tmp_path_factory.mktemp("astclips")
    lines, plain = [], []
    for i, text in enumerate(TEXTS):
        sf.write(root / f"{i}.wav", tone(200 + 90 * i, 0.6 + 0.1 * i), SR)
        lines.append(json.dumps({"audio": f"{i}.wav", "text": text, "spanish": to_spanish(text)}))
        plain.append(json.dumps({"audio": f"{i}.wav", "text": text}))
    (root / "m.jsonl").write_text("\n".join(lines) + "\n")
    (root / "plain.jsonl").write_text("\n".join(plain) + "\n")
    return root


@pytest.fixture(scope="module")
def tok(corpus):
    return Tokenizer.from_file(corpus["tokenizer"])


def samples(manifest, n=6, keep_wave=False, cache=False):
    features = AudioFeatures(normalize=True)
    stream = open_stream([str(manifest)], audio_decoder(features, keep_wave=keep_wave), seed=3, cache=cache)
    return [stream.sample(p) for p in range(n)], features


def n_slots(t: int) -> int:
    return (t + 7) // 8


def test_ast_off_gives_the_asr_batches_of_before(clips, tok):
    got, _ = samples(clips / "m.jsonl")
    coll = SpeechCollator(tok, ASR_PROMPT, n_slots, augment={"freq_masks": 1}, seed=3)
    before = coll(got)
    rows = SpeechRows(0.0, AST_PROMPT)
    assert not rows.active and all(rows(s) is s for s in got)
    after = SpeechBatches(rows, coll)(got)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    s, b = got[0], before
    n = n_slots(s["features"].shape[0])
    want = [tok.bos_id, tok.speech_start_id, *[tok.pad_id] * n, tok.speech_end_id]
    want += [*tok.encode(" " + ASR_PROMPT.rstrip()), *tok.encode(" " + s["text"]), tok.eos_id]
    assert b["tokens"][0, : len(want)].tolist() == want
    assert b["ctc_targets"][0, : b["ctc_lengths"][0]].tolist() == tok.encode(s["text"])
    own = coll(
        [{**s, "prompt": AST_PROMPT, "text": "el círculo."}]
    )  # a record's own other prompt: no CTC, as before
    assert own["ctc_lengths"].tolist() == [0]


def test_ast_rows_share_and_layout_of_the_parallel_line(clips, tok):
    rows = SpeechRows(0.3, AST_PROMPT, seed=3)
    tasks = [rows.task(p) for p in range(4000)]
    assert abs(tasks.count("ast") / 4000 - 0.3) < 0.03
    assert tasks == [SpeechRows(0.3, AST_PROMPT, seed=3).task(p) for p in range(4000)]  # fixed by position
    assert tasks != [SpeechRows(0.3, AST_PROMPT, seed=4).task(p) for p in range(4000)]
    got, _ = samples(clips / "m.jsonl")
    coll = SpeechCollator(tok, ASR_PROMPT, n_slots, seed=3)
    batch = SpeechBatches(SpeechRows(1.0, AST_PROMPT, seed=3), coll)(got)
    for b, s in enumerate(got):
        english, n = s["text"], n_slots(s["features"].shape[0])
        line = tok.encode(translation_line(english))  # `{english} {AST_PROMPT}{spanish}`
        head = tok.encode(english)
        assert line[: len(head)] == head
        row = batch["tokens"][b].tolist()
        assert row[: n + 3] == [tok.bos_id, tok.speech_start_id, *[tok.pad_id] * n, tok.speech_end_id]
        after = row[n + 3 : n + 3 + len(line) - len(head) + 1]
        assert after == [*line[len(head) :], tok.eos_id]  # the speech in the English sentence's place
        target = tok.encode(" " + to_spanish(english))
        labels = [t for t in batch["labels"][b].tolist() if t != -100]
        assert labels == [*target, tok.eos_id]
        assert batch["ctc_targets"][b, : batch["ctc_lengths"][b]].tolist() == head  # CTC: the English
    with pytest.raises(ValueError, match=r"0\.wav.*spanish"):
        SpeechBatches(SpeechRows(1.0, AST_PROMPT), coll)(samples(clips / "plain.jsonl", 1)[0])


def test_bleu_and_exact_match_on_a_hand_made_example():
    from mm.stages.speech_eval import translation_report

    # 1-4 gram precisions 5/6, 3/5, 2/4, 1/3, no brevity penalty: BLEU = (5/6*3/5*1/2*1/3)^(1/4)
    r = translation_report(["the red circle moves down now"], ["the red circle moves up now"])
    assert r["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 2 * 1 / 3) ** 0.25, abs=1e-6)
    assert r["exact_match"] == 0.0 and r["n"] == 1
    r = translation_report(
        ["El círculo rojo se mueve", "un cuadrado"], ["el círculo rojo se mueve.", "un triángulo"]
    )
    assert r["exact_match"] == 0.5  # case and punctuation aside
    assert translation_report(["un cuadrado azul ."], ["un cuadrado azul ."])["bleu"] == pytest.approx(100)


def test_training_conditions_fixed_by_position_cached_or_not(clips):
    features = AudioFeatures()
    rows = SpeechRows(conditions=["snr10", "telephone"], condition_prob=0.5, features=features, seed=3)
    drawn = [rows.condition(p) for p in range(400)]
    assert {None, "snr10", "telephone"} == set(drawn) and 150 < drawn.count(None) < 250
    cached, _ = samples(clips / "m.jsonl", keep_wave=True, cache=True)
    fresh, _ = samples(clips / "m.jsonl", keep_wave=True)
    for a, b in zip(cached, fresh, strict=True):
        ra, rb = rows(a), rows(b)
        assert ra.get("condition") == rows.condition(a["position"])
        assert torch.equal(ra["features"], rb["features"])
        name = ra.get("condition")
        if name is None:
            assert ra["features"] is a["features"]
        else:
            seed = derive_seed("mm.speech.noise", 3, a["position"])
            assert torch.equal(ra["features"], features(apply_condition(name, a["wave"], seed=seed)))
            assert not torch.equal(ra["features"], a["features"])
    assert any(rows(s).get("condition") for s in cached)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tok, corpus):
    """A tiny untrained speech bundle (trained with AST: it records the AST prompt)."""
    from mm.adapters.speech import SpeechAdapterConfig
    from mm.encoders.speech import SpeechEncoderConfig
    from mm.formats.bundle import dataclass_dict, save_bundle
    from mm.lm import save_hf
    from mm.stages.speech import SpeechFeaturesConfig, SpeechStageConfig, build_speech_model
    from mm.training.freeze import fingerprint

    root = tmp_path_factory.mktemp("astbundle")
    torch.manual_seed(0)
    lm = Transformer(preset("nano", vocab_size=tok.vocab_size))
    save_hf(lm, root / "lm")
    tok.save(root / "lm")
    cfg = SpeechStageConfig(
        speech_encoder=SpeechEncoderConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64),
        adapter=SpeechAdapterConfig(dim=32, n_heads=2, ffn_dim=64),
    )
    model = build_speech_model(cfg, lm)
    meta = {
        "stage": "speech",
        "lm_path": str(root / "lm"),
        "lm_fingerprint": fingerprint(lm),
        "tokenizer": None,
        "speech_encoder": dataclass_dict(cfg.speech_encoder),
        "speech_adapter": dataclass_dict(cfg.adapter),
        "features": dataclass_dict(SpeechFeaturesConfig(max_seconds=6.0)),
        "prompt": ASR_PROMPT,
        "ast_prompt": AST_PROMPT,
    }
    save_bundle(model.adapter_state(), root / "final", meta)
    asr_only = {**meta, "ast_prompt": None}
    save_bundle(model.adapter_state(), root / "asr_only", asr_only)
    return root


def test_translate_cli_refusals_and_one_line_per_file(clips, bundle, capsys):
    from mm.app.cli import main
    from mm.models.speech import translate_features
    from mm.stages.speech import load_speech_bundle

    final, good, bad = str(bundle / "final"), str(clips / "0.wav"), clips / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEfmt garbage")
    assert main(["translate", "--checkpoint", final, "--to", "fr", good]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "'fr'" in out.err and "es" in out.err
    assert main(["translate", "--checkpoint", final, "--to", "es", good, str(bad)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "bad.wav" in out.err
    video = bundle / "video"
    video.mkdir(exist_ok=True)
    (video / "mm_config.json").write_text(json.dumps({"stage": "video", "lm_path": "../lm"}))
    assert main(["translate", "--checkpoint", str(video), "--to", "es", good]) == 2
    assert capsys.readouterr().err == (
        f"mm translate: {video} holds a 'video' checkpoint, not speech; read it with `mm describe --checkpoint {video}`\n"
    )
    assert main(["translate", "--checkpoint", str(bundle / "asr_only"), "--to", "es", good]) == 2
    assert "not trained to translate" in capsys.readouterr().err
    assert main(["translate", "--checkpoint", final, "--to", "es", good, str(clips / "1.wav")]) == 0
    lines = capsys.readouterr().out.splitlines()
    model, tok, features, _ = load_speech_bundle(bundle / "final")
    want = translate_features(model, tok, [features.load(good), features.load(clips / "1.wav")])
    assert lines == want and len(lines) == 2 and all(lines), lines


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_transcribe_cli_decodes_a_long_recording_piece_by_piece_in_order(
    bundle, tmp_path, capsys, monkeypatch
):
    import mm.models.speech as speech
    from mm.app.cli import main
    from mm.datasets.long_audio import split_on_silence

    parts = [np.zeros(SR // 2, dtype=np.float32)]
    for i, text in enumerate(TEXTS * 2):
        wav = tmp_path / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-s", "120", "-w", str(wav), text], check=True, capture_output=True)
        parts += [decode_audio(wav).numpy(), np.zeros(int(1.2 * SR), dtype=np.float32)]
    long = tmp_path / "long.wav"
    sf.write(long, np.concatenate(parts), SR)
    wave = decode_audio(long)
    assert 35 * SR < wave.numel() < 60 * SR  # far beyond the bundle's 6 s window
    seen = []

    def by_length(model, tok, feats, **kw):  # names each piece by its frame count
        seen.append(len(feats))
        return [f"p{f.shape[0]}" for f in feats]

    monkeypatch.setattr(speech, "transcribe_features", by_length)
    assert main(["transcribe", "--checkpoint", str(bundle / "final"), str(long)]) == 0
    features = AudioFeatures(max_seconds=6.0)
    pieces = split_on_silence(wave, SR, 6.0, every_pause=True)
    want = " ".join(f"p{features(wave[a:b]).shape[0]}" for a, b in pieces)
    assert len(pieces) >= len(TEXTS) * 2 and seen == [len(pieces)]
    assert capsys.readouterr().out.splitlines() == [want]


def test_evaluation_reports_one_wer_per_condition_with_clip_seeds(clips, bundle, monkeypatch):
    import mm.stages.speech_eval as speech_eval
    from mm.stages.speech import load_speech_bundle

    model, tok, features, _ = load_speech_bundle(bundle / "final")
    waves = [decode_audio(clips / f"{i}.wav") for i in range(4)]
    want = {
        name: [features(apply_condition(name, w, seed=i)) for i, w in enumerate(waves)] for name in ("snr10",)
    }
    want["clean"] = [features(w) for w in waves]

    def fake(model, tok, feats, **kw):  # right on the clean features only
        clean = [torch.equal(f, c) for f, c in zip(feats, want["clean"], strict=True)]
        noisy = [torch.equal(f, c) for f, c in zip(feats, want["snr10"], strict=True)]
        assert all(clean) or all(noisy)
        return TEXTS[:4] if all(clean) else ["the red circle."] * 4

    monkeypatch.setattr(speech_eval, "transcribe_features", fake)
    res = speech_eval.evaluate_conditions(
        model, tok, features, str(clips / "m.jsonl"), 4, ASR_PROMPT, ["clean", "snr10"]
    )
    assert list(res) == ["clean", "snr10"] and res["clean"] == 0.0 and res["snr10"] > 0.5
    with pytest.raises(ValueError, match="unknown"):
        speech_eval.evaluate_conditions(
            model, tok, features, str(clips / "m.jsonl"), 4, ASR_PROMPT, ["snr99"]
        )
    monkeypatch.setattr(
        speech_eval, "translate_features", lambda m, t, f, **kw: [to_spanish(x) for x in TEXTS[:3]] + ["no"]
    )
    ast = speech_eval.evaluate_translation(model, tok, features, str(clips / "m.jsonl"), 4, AST_PROMPT)
    assert ast["exact_match"] == 0.75 and 0 < ast["bleu"] < 100
    with pytest.raises(ValueError, match="plain.jsonl.*spanish"):
        speech_eval.evaluate_translation(model, tok, features, str(clips / "plain.jsonl"), 4, AST_PROMPT)


def test_rows_are_the_same_in_one_and_two_processes(clips, tok):
    features = AudioFeatures()
    rows = SpeechRows(0.5, AST_PROMPT, ["snr10", "quiet"], 0.5, features, seed=3)
    dec = audio_decoder(features, keep_wave=True)
    one = open_stream([str(clips / "m.jsonl")], dec, seed=3)
    two = [open_stream([str(clips / "m.jsonl")], dec, seed=3, rank=r, world=2) for r in (0, 1)]
    kinds = set()
    for p in range(12):
        a, b = rows(one.sample(p)), rows(two[p % 2].sample(p))
        assert (a["text"], a.get("prompt"), a.get("condition")) == (
            b["text"],
            b.get("prompt"),
            b.get("condition"),
        )
        assert torch.equal(a["features"], b["features"])
        kinds.add((a.get("prompt") == AST_PROMPT, a.get("condition")))
    assert len(kinds) >= 3  # both tasks and several conditions met


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_speech_stage_trains_ast_with_conditions_and_reports_them(bundle, tmp_path, capsys):
    from pathlib import Path

    from mm.app.cli import main
    from mm.world.speech import merge_manifests, synth_speech

    root = Path(__file__).resolve().parents[2]
    synth_speech(tmp_path, n=4, split="train", workers=1)
    synth_speech(tmp_path, n=2, split="questions_train", workers=1)
    train = merge_manifests(tmp_path, ["train", "questions_train"], "mix")  # sentences and spoken questions
    held = synth_speech(tmp_path, n=2, split="heldout_voices", workers=1)
    questions = synth_speech(tmp_path, n=2, split="questions_heldout", workers=1)
    args = [
        "train",
        "--config",
        str(root / "configs/stages/speech_tiny.yaml"),
        "--data",
        str(train),
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
        f"lm={bundle / 'lm'}",
        "speech_encoder.dim=32",
        "speech_encoder.n_layers=1",
        "speech_encoder.n_heads=2",
        "speech_encoder.ffn_dim=64",
        "adapter.dim=32",
        "adapter.n_heads=2",
        "adapter.ffn_dim=64",
        "train.batch_size=2",
        "train.num_threads=1",
        "train.peak_flops=1e9",
        f"data.heldout=[{held},{questions}]",
        "data.ast_fraction=0.5",
        "data.conditions=[snr10,telephone]",
        "eval_conditions=[clean,snr10]",
        "eval_samples=2",
        "curve_samples=0",
    ]
    assert main(args) == 0
    capsys.readouterr()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    ev = summary["eval"][Path(held).stem]
    assert set(ev["ast"]) >= {"bleu", "exact_match", "n", "examples"} and ev["ast"]["n"] == 2
    assert list(summary["wer_by_condition"]) == ["clean", "snr10"]
    cfg = json.loads((tmp_path / "run" / "final" / "mm_config.json").read_text())
    assert cfg["ast_prompt"] == AST_PROMPT
    assert cfg["dialogue_prompt"] == DIALOGUE_PROMPT  # the training manifest has spoken questions
    q = summary["eval"]["questions_heldout"]
    assert q["n"] == 2 and 0.0 <= q["accuracy"] <= 1.0 and "wer" not in q
    assert q["by_family"] and set(q["by_family"]) <= set(QUESTION_FAMILIES) and q["examples"][0]["context"]


def question_sample(s: dict, context: str, question: str, answer: str) -> dict:
    """A decoded clip as a spoken-question record's sample."""
    return {**s, "text": question, "meta": {"context": context, "answer": answer, "family": "colour"}}


def test_question_rows_mirror_the_corpus_question_line(clips, tok):
    got, _ = samples(clips / "m.jsonl", 2)
    coll = SpeechCollator(tok, ASR_PROMPT, n_slots, seed=3)
    context, question, answer = "a large red circle.", "what colour is the circle?", "red"
    q = question_sample(got[0], context, question, answer)
    batch = SpeechBatches(SpeechRows(1.0, AST_PROMPT, seed=3), coll)([q, got[1]])  # AST draws spare questions
    n = n_slots(q["features"].shape[0])
    ctx = tok.encode(context)
    row = batch["tokens"][0].tolist()
    head = [tok.bos_id, *ctx, tok.speech_start_id, *[tok.pad_id] * n, tok.speech_end_id]
    assert row[: len(head)] == head and batch["speech_mask"][0].sum() == n
    assert batch["speech_mask"][0, len(ctx) + 2 : len(ctx) + 2 + n].all()
    line = tok.encode(f"{context} {question} {answer}", eos=True)  # the corpus's question line
    assert line[: len(ctx)] == ctx
    target = tok.encode(" " + answer) + [tok.eos_id]
    assert line[-len(target) :] == target
    assert row[len(head) : len(head) + len(target)] == target  # no prompt: the answer right after the speech
    assert [t for t in batch["labels"][0].tolist() if t != -100] == target
    assert batch["ctc_targets"][0, : batch["ctc_lengths"][0]].tolist() == tok.encode(question)
    assert [t for t in batch["labels"][1].tolist() if t != -100][:-1] == tok.encode(
        " " + to_spanish(got[1]["text"])
    )
    scrambled = {**got[0], "text": "moves the of square.", "meta": {"asr_only": True}}
    row = SpeechBatches(SpeechRows(1.0, AST_PROMPT, seed=3), coll)([scrambled])  # never a translation row
    assert [t for t in row["labels"][0].tolist() if t != -100] == tok.encode(" moves the of square.") + [
        tok.eos_id
    ]


def test_question_evaluation_scores_answers_per_family(clips, bundle, monkeypatch):
    import mm.stages.speech_eval as speech_eval
    from mm.stages.speech import load_speech_bundle

    model, tok, features, _ = load_speech_bundle(bundle / "final")
    recs = [
        ("a large red circle.", "what colour is the circle?", "red", "colour"),
        ("a small blue square.", "is there a triangle?", "no", "exists"),
        ("a red circle moves up.", "which way does the circle move?", "up", "motion"),
        ("a small blue square.", "is there a square?", "yes", "exists"),
    ]
    lines = [
        json.dumps({"audio": f"{i}.wav", "text": q, "context": c, "answer": a, "family": f})
        for i, (c, q, a, f) in enumerate(recs)
    ]
    (clips / "questions.jsonl").write_text("\n".join(lines) + "\n")
    seen = []

    def fake(model, tok, feats, contexts, **kw):
        seen.append(list(contexts))
        return ["red", "yes", "up", "yes."]

    monkeypatch.setattr(speech_eval, "answer_features", fake)
    res = speech_eval.evaluate_questions(model, tok, features, str(clips / "questions.jsonl"), 4)
    assert seen == [[c for c, *_ in recs]]
    assert res["accuracy"] == 0.75 and res["n"] == 4 and res["skipped"] == 0
    assert res["by_family"] == {"colour": 1.0, "exists": 0.5, "motion": 1.0}
    assert speech_eval.is_question_manifest(str(clips / "questions.jsonl"))
    assert not speech_eval.is_question_manifest(str(clips / "m.jsonl"))
    with pytest.raises(ValueError, match="m.jsonl.*answer"):
        speech_eval.evaluate_questions(model, tok, features, str(clips / "m.jsonl"), 4)


def test_chat_answers_a_spoken_question_after_the_scene(clips, bundle, tmp_path, capsys):
    from mm.app.cli import main
    from mm.models.speech import answer_features, transcribe_features
    from mm.stages.speech import load_speech_bundle

    dialogue = tmp_path / "dialogue"
    shutil.copytree(bundle / "final", dialogue)
    cfg = json.loads((dialogue / "mm_config.json").read_text())
    (dialogue / "mm_config.json").write_text(json.dumps({**cfg, "dialogue_prompt": DIALOGUE_PROMPT}))
    model, tok, features, _ = load_speech_bundle(dialogue)
    clip = str(clips / "2.wav")
    feats = [features.load(clip)]
    assert main(["chat", "--checkpoint", str(dialogue), "--audio", clip, "a large red circle."]) == 0
    assert capsys.readouterr().out.splitlines() == answer_features(model, tok, feats, ["a large red circle."])
    # the row the answer comes from: the scene, then the speech, nothing after it
    ids, flags = SpeechCollator(tok, DIALOGUE_PROMPT, n_slots).prefix(
        DIALOGUE_PROMPT, 3, "a large red circle."
    )
    ctx = tok.encode("a large red circle.")
    assert ids == [tok.bos_id, *ctx, tok.speech_start_id, *[tok.pad_id] * 3, tok.speech_end_id]
    assert flags == [False] * (len(ctx) + 2) + [True] * 3 + [False]
    # a bundle without spoken questions transcribes, as before
    assert main(["chat", "--checkpoint", str(bundle / "final"), "--audio", clip]) == 0
    assert capsys.readouterr().out.splitlines() == transcribe_features(model, tok, feats, prompt=ASR_PROMPT)
    for name, data in (
        ("bad.wav", b"RIFF....WAVEfmt garbage"),
        ("empty.mp3", b""),
        ("notes.ogg", b"hello\n"),
    ):
        bad = tmp_path / name  # corrupt, empty, not audio: refused, naming the file
        bad.write_bytes(data)
        assert main(["chat", "--checkpoint", str(dialogue), "--audio", str(bad), "a small blue square."]) == 2
        out = capsys.readouterr()
        assert out.out == "" and name in out.err, out.err


def test_learned_boundaries_replace_the_frozen_rows_and_train(tok):
    """With `learn_boundaries` the adapter's vectors stand at `<|speech_start|>` / `<|speech_end|>` (the LM's rows
    stay as they are), receive gradients, and are saved and read back with the adapter."""
    from mm.adapters.speech import SpeechAdapter, SpeechAdapterConfig
    from mm.encoders.speech import SpeechEncoder, SpeechEncoderConfig
    from mm.models.speech import SpeechLM

    torch.manual_seed(0)
    lm = Transformer(preset("nano", vocab_size=tok.vocab_size))
    enc = SpeechEncoder(SpeechEncoderConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64))
    cfg = SpeechAdapterConfig(dim=32, n_heads=2, ffn_dim=64, learn_boundaries=True)
    model = SpeechLM(lm, enc, SpeechAdapter(32, lm.cfg.dim, cfg))
    tokens = torch.tensor([[tok.bos_id, tok.speech_start_id, 5, tok.speech_end_id, 7]])
    with pytest.raises(ValueError, match="set_boundary_ids"):
        model.embed(tokens)
    model.set_boundary_ids(tok.speech_start_id, tok.speech_end_id)
    h, plain = model.embed(tokens), lm.embed(tokens)
    b = model.speech_adapter.boundaries()
    assert torch.equal(h[0, 1], b[0]) and torch.equal(h[0, 3], b[1])
    assert torch.equal(h[0, [0, 2, 4]], plain[0, [0, 2, 4]])
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    model(tokens).sum().backward()
    assert (
        model.speech_adapter.boundary.grad is not None and model.speech_adapter.boundary.grad.abs().sum() > 0
    )
    assert "speech_adapter.boundary" in model.adapter_state()
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in before.items())
    from mm.lm.vocab import SPECIAL_TOKENS

    model.set_layout_boundary_ids()  # no tokenizer (mm plan): a Llama 3 vocabulary's places for the two tokens
    base = lm.cfg.vocab_size - 256
    assert model.boundary_ids == tuple(
        base + SPECIAL_TOKENS.index(t) for t in ("<|speech_start|>", "<|speech_end|>")
    )
    off = SpeechLM(lm, enc, SpeechAdapter(32, lm.cfg.dim, SpeechAdapterConfig(dim=32, n_heads=2, ffn_dim=64)))
    assert torch.equal(off.embed(tokens), plain) and "speech_adapter.boundary" not in off.adapter_state()


def test_ctc_embeddings_move_the_outputs_to_the_token_embeddings_the_head_reads(tok):
    """`ctc_embeddings` = a: the LM reads (1 - a) x outputs + a x CTC-posterior-weighted token embeddings; a sure
    head gives the token's own embedding; 0 leaves the outputs as they are."""
    from mm.adapters.speech import SpeechAdapter, SpeechAdapterConfig
    from mm.encoders.speech import SpeechEncoder, SpeechEncoderConfig
    from mm.models.speech import SpeechLM

    torch.manual_seed(0)
    lm = Transformer(preset("nano", vocab_size=tok.vocab_size))
    enc = SpeechEncoder(SpeechEncoderConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64))
    E = lm.tok_embeddings.weight.detach()

    def model(a: float) -> SpeechLM:
        cfg = SpeechAdapterConfig(dim=32, n_heads=2, ffn_dim=64, ctc_weight=1.0, ctc_embeddings=a)
        return SpeechLM(lm, enc, SpeechAdapter(32, lm.cfg.dim, cfg))

    sp = E[[5, 9]][None] * 3.0  # outputs pointing exactly at tokens 5 and 9
    assert torch.equal(model(0.0).speech_inputs(sp), sp)
    full = model(1.0)
    probs = full.speech_adapter.ctc_logits(sp, E)[..., :-1].softmax(-1)
    torch.testing.assert_close(full.speech_inputs(sp), probs @ E)
    with torch.no_grad():
        full.speech_adapter.ctc_log_scale.fill_(8.0)  # a sure head: the token's own embedding
    torch.testing.assert_close(full.speech_inputs(sp), E[[5, 9]][None], atol=1e-3, rtol=0)
    half = model(0.5)
    torch.testing.assert_close(
        half.speech_inputs(sp),
        0.5 * sp + 0.5 * (half.speech_adapter.ctc_logits(sp, E)[..., :-1].softmax(-1) @ E),
    )
    for bad in (
        {"ctc_weight": 1.0, "ctc_embeddings": 1.5},
        {"ctc_weight": 0.0, "ctc_embeddings": 0.5},
    ):
        with pytest.raises(ValueError, match="ctc_embeddings"):
            SpeechAdapter(32, lm.cfg.dim, SpeechAdapterConfig(dim=32, n_heads=2, ffn_dim=64, **bad))
