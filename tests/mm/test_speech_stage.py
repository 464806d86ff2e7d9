"""A real (tiny) speech path on the spoken shapes world: BEST-RQ pretraining through `mm pretrain-encoder` (the
frozen projection/codebooks stay bit-identical and are saved; targets of the saved encoder are reproducible),
then the `speech` stage through `mm train` from that encoder: the LM stays bit-identical, the bundle holds no LM
tensor, `mm verify-frozen` passes and fails on an LM altered by one value, `mm transcribe` prints one line per
file (and refuses a bad file), bad audio in the training manifest is skipped and counted, and a transcript of
the trained model equals the one from the reloaded bundle."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mm.app.cli import main as mm_main  # in-process CLI: a subprocess costs seconds of imports
from mm.lm import Tokenizer, Transformer, load_hf, preset, save_hf
from mm.stages.bestrq_pretrain import load_bestrq
from mm.stages.evaluation import normalize_text, word_error_rate
from mm.stages.speech import load_speech_bundle
from mm.training.checkpoint import load_tensors
from mm.training.freeze import FrozenLMChanged, fingerprint
from mm.world.speech import synth_speech

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
SHAPE = [
    "speech_encoder.dim=32",
    "speech_encoder.n_layers=1",
    "speech_encoder.n_heads=2",
    "speech_encoder.ffn_dim=64",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("speechworld")
    tok = Tokenizer.from_file(corpus["tokenizer"])
    torch.manual_seed(0)
    save_hf(Transformer(preset("nano", vocab_size=tok.vocab_size)), root / "lm")
    tok.save(root / "lm")
    train = synth_speech(root, n=12, split="train")
    held = synth_speech(root, n=3, split="heldout_voices")
    # Two bad files appended to the training manifest: a corrupt one and a silent one.
    (root / "speech" / "bad.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    silent = root / "speech" / "silent.wav"
    import numpy as np
    import soundfile as sf

    sf.write(silent, np.zeros(8000, dtype=np.float32), 16000)
    lines = train.read_text().splitlines()
    lines += [
        json.dumps({"audio": "bad.wav", "text": "x."}),
        json.dumps({"audio": "silent.wav", "text": "y."}),
    ]
    (root / "speech" / "train_bad.jsonl").write_text("\n".join(lines) + "\n")
    return {"root": root, "lm": root / "lm", "train": root / "speech" / "train_bad.jsonl", "held": held}


def mm(*args: object) -> subprocess.CompletedProcess:
    # One thread: the models are tiny, and OpenMP threads spin badly when the machine is busy.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([BIN / "mm", *map(str, args)], capture_output=True, text=True, env=env)


@pytest.fixture(autouse=True)
def one_thread():
    """In-process work (bundle reloads, transcription) on one thread, as the subprocesses."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("speechrun")
    common = ["train.batch_size=4", "train.save_every=2", "train.peak_flops=1e9", "train.num_threads=1"]
    r = mm(
        "pretrain-encoder",
        "--config",
        ROOT / "configs/encoders/bestrq_tiny.yaml",
        "--data",
        world["train"],
        "--out",
        out / "bestrq",
        "--max-steps",
        3,
        *SHAPE,
        *common,
        f"data.heldout=[{world['held']}]",
        "data.max_bad_fraction=0.5",
        "eval_samples=3",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lm_files = {p.name: p.read_bytes() for p in world["lm"].iterdir()}
    before = {k: v.clone() for k, v in load_hf(world["lm"]).state_dict().items()}
    r = mm(
        "train",
        "--config",
        ROOT / "configs/stages/speech_tiny.yaml",
        "--data",
        world["train"],
        "--out",
        out / "speech",
        "--max-steps",
        3,
        *SHAPE,
        *common,
        f"lm={world['lm']}",
        f"encoder_weights={out / 'bestrq/final/encoder.safetensors'}",
        "adapter.dim=32",
        "adapter.n_heads=2",
        "adapter.ffn_dim=64",
        f"data.heldout=[{world['held']}]",
        "data.max_bad_fraction=0.5",
        "eval_samples=3",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return {"out": out, "before": before, "lm_files": lm_files}


@pytest.mark.slow  # the module's end-to-end run (BEST-RQ + speech stage via the CLI)
def test_bestrq_output_keeps_the_frozen_quantizer_and_reproducible_targets(world, trained):
    final = trained["out"] / "bestrq" / "final"
    saved = load_tensors(final / "encoder.safetensors")
    model = load_bestrq(final)
    from mm.datasets.audio import AudioFeatures
    from mm.encoders.speech import BestRQ, SpeechEncoder

    init = BestRQ(SpeechEncoder(model.encoder.cfg), model.cfg)  # same seed -> the projection it started from
    assert torch.equal(saved["projection"], init.projection) and torch.equal(
        saved["codebooks"], init.codebooks
    )
    # The encoder trained, yet the saved model's targets on real speech are those of the untrained model the run
    # started from: the targets the run trained against are reproduced from the saved file.
    init_sd = init.state_dict()
    assert any(not torch.equal(v, init_sd[k]) for k, v in saved.items() if k.startswith("encoder."))
    clips = sorted((world["root"] / "speech" / "heldout_voices").glob("*.wav"))
    feats = AudioFeatures().load(clips[0])[None]
    stacked = model.encoder.stacker.stacked(feats)
    targets = model.targets(stacked)
    assert torch.equal(targets, init.targets(stacked))
    assert targets.unique().numel() >= 8  # many codes: the equality is not that of a constant
    summary = json.loads((trained["out"] / "bestrq" / "summary.json").read_text())
    assert summary["data_skips"]["skipped_by_reason"] == {"corrupt": 1, "silent": 1}
    assert set(summary["heldout"]["heldout_voices"]) == {"masked_loss", "code_accuracy", "n"}
    assert len((trained["out"] / "bestrq" / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_speech_stage_keeps_lm_bit_identical_and_bundle_free_of_lm(world, trained, faults):
    after = load_hf(world["lm"]).state_dict()
    for k, v in trained["before"].items():
        assert torch.equal(v, after[k]), k
    assert {p.name: p.read_bytes() for p in world["lm"].iterdir()} == trained["lm_files"]
    final = trained["out"] / "speech" / "final"
    tensors = load_tensors(final / "adapter.safetensors")
    assert tensors and not any(k.startswith("lm.") for k in tensors)
    assert {k.split(".")[0] for k in tensors} == {"speech_encoder", "speech_adapter"}
    meta = json.loads((final / "mm_config.json").read_text())
    assert meta["lm_fingerprint_start"] == meta["lm_fingerprint_end"] == fingerprint(load_hf(world["lm"]))
    summary = json.loads((trained["out"] / "speech" / "summary.json").read_text())
    assert summary["data_skips"]["skipped_by_reason"] == {"corrupt": 1, "silent": 1}
    faults.record("corrupt", 2, what="wav in a speech-stage run")
    ev = summary["eval"]["heldout_voices"]
    assert ev["n"] == 3 and len(ev["wer_per_voice"]) == 3
    # The reported WER is that of the saved bundle's transcripts of the same clips against their references.
    from mm.datasets.media import read_manifest
    from mm.models.speech import transcribe_features

    model, tok, features, bundle_meta = load_speech_bundle(final)
    recs = read_manifest(world["held"], "audio")
    hyps = transcribe_features(
        model, tok, [features.load(r.media) for r in recs], prompt=bundle_meta["prompt"]
    )
    refs = [r.text for r in recs]
    assert [e["hyp"] for e in ev["examples"]] == hyps and [e["ref"] for e in ev["examples"]] == refs
    assert ev["wer"] == word_error_rate(refs, hyps)
    for voice, wer in ev["wer_per_voice"].items():
        idx = [i for i, r in enumerate(recs) if r.meta.get("voice") == voice]
        assert len(idx) == 1 and wer == word_error_rate([refs[i] for i in idx], [hyps[i] for i in idx])


@pytest.mark.slow
def test_verify_frozen_passes_then_fails_on_one_altered_value(world, trained, tmp_path, capsys):
    final = trained["out"] / "speech" / "final"
    r = mm("verify-frozen", final)
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr
    lm2 = tmp_path / "lm2"
    shutil.copytree(world["lm"], lm2)
    sd = load_file(str(lm2 / "model.safetensors"))
    sd["model.layers.0.mlp.down_proj.weight"][0, 0] += 1e-3
    save_file(sd, str(lm2 / "model.safetensors"), metadata={"format": "pt"})
    b2 = tmp_path / "bundle"
    shutil.copytree(final, b2)
    meta = json.loads((b2 / "mm_config.json").read_text())
    meta["lm_path"] = str(lm2)
    (b2 / "mm_config.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert mm_main(["verify-frozen", str(b2)]) == 1
    assert "CHANGED" in capsys.readouterr().out
    with pytest.raises(FrozenLMChanged, match="refusing"):
        load_speech_bundle(b2)


@pytest.mark.slow
def test_transcribe_cli_one_line_per_file_and_matches_the_bundle(world, trained, tmp_path, capsys):
    final = trained["out"] / "speech" / "final"
    clips = sorted((world["root"] / "speech" / "heldout_voices").glob("*.wav"))
    r = mm("transcribe", "--checkpoint", final, *clips, clips[0])
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 4 and lines[0] == lines[3]
    from mm.models.speech import transcribe_features

    model, tok, features, meta = load_speech_bundle(final)
    assert (
        transcribe_features(model, tok, [features.load(c) for c in clips], prompt=meta["prompt"]) == lines[:3]
    )
    # The other commands in this process (each subprocess costs seconds of imports): the same `main`.
    from mm.app.cli import main

    capsys.readouterr()
    assert (
        main(
            [
                "transcribe",
                "--checkpoint",
                str(final),
                str(clips[0]),
                str(world["root"] / "speech" / "bad.wav"),
            ]
        )
        == 2
    )
    out = capsys.readouterr()
    assert out.out == "" and "bad.wav" in out.err
    assert (
        main(["chat", "--checkpoint", str(final), "--audio", str(clips[1])]) == 0
    )  # answered with the transcript
    assert capsys.readouterr().out.splitlines() == [lines[1]]
    assert main(["chat", "--checkpoint", str(final), "what colour is the circle?"]) == 2
    assert "give --audio FILE" in capsys.readouterr().err


def test_wer_normalisation():
    assert normalize_text("The Circle, is RED.") == "the circle is red"
    assert word_error_rate(["the circle is red."], ["The circle is red"]) == 0.0
    assert word_error_rate(["the circle is red."], ["the square is red"]) == 0.25


def test_ctc_head_scores_the_transcript_tokens_in_order(corpus):
    """The auxiliary CTC loss: low when the adapter outputs are the transcript's token embeddings in order (blanks
    between), high for the same vectors reversed; the collator's CTC targets are the transcript as the LM corpus
    starts a repeat line, and empty for a row with another prompt."""
    from mm.adapters.speech import SpeechAdapterConfig
    from mm.datasets.audio import SpeechCollator
    from mm.encoders.speech import SpeechEncoderConfig
    from mm.prompts import ASR_PROMPT
    from mm.stages.speech import SpeechStageConfig, build_speech_model

    tok = Tokenizer.from_file(corpus["tokenizer"])
    torch.manual_seed(0)
    lm = Transformer(preset("nano", vocab_size=tok.vocab_size))
    cfg = SpeechStageConfig(
        speech_encoder=SpeechEncoderConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64),
        adapter=SpeechAdapterConfig(dim=32, n_heads=2, ffn_dim=64, ctc_weight=0.5),
    )
    model = build_speech_model(cfg, lm)
    text = "the red circle is left of a blue square."
    ids = tok.encode(text)
    collator = SpeechCollator(tok, ASR_PROMPT, lambda n: 3)
    feats = torch.randn(20, 80)
    batch = collator(
        [{"features": feats, "text": text}, {"features": feats, "text": "x", "prompt": "Say it:"}]
    )
    assert batch["ctc_lengths"].tolist() == [len(ids), 0]
    assert batch["ctc_targets"][0, : len(ids)].tolist() == ids
    emb = lm.tok_embeddings.weight.detach()
    blank = model.speech_adapter.ctc_blank.detach()

    def frames(seq: list[int]) -> torch.Tensor:
        rows = []
        for i in seq:
            rows += [emb[i], blank]
        return torch.stack(rows)[None]

    n = torch.tensor([2 * len(ids)])
    target, lengths = torch.tensor([ids]), torch.tensor([len(ids)])
    with torch.no_grad():
        model.speech_adapter.ctc_log_scale.fill_(3.0)
        good = model.ctc_loss(frames(ids), n, target, lengths)
        bad = model.ctc_loss(frames(ids[::-1]), n, target, lengths)
        none = model.ctc_loss(frames(ids), n, target, torch.tensor([0]))
        _, best, starts = model.ctc_greedy(frames(ids), n)
    assert float(good) < 0.5 * float(bad), (float(good), float(bad))
    assert float(none) == 0.0
    assert best[0][starts[0]].tolist() == ids  # greedy CTC decodes the transcript's tokens back


def test_ctc_compression_in_training_equals_leaving_the_frames_out(corpus):
    """Training hides the frames CTC compression drops (attention mask, closed position gaps): the text logits
    equal those of the row built with only the kept frames, as transcription builds it."""
    from mm.adapters.speech import SpeechAdapterConfig
    from mm.datasets.audio import SpeechCollator
    from mm.encoders.speech import SpeechEncoderConfig
    from mm.prompts import ASR_PROMPT
    from mm.stages.speech import SpeechStageConfig, build_speech_model

    tok = Tokenizer.from_file(corpus["tokenizer"])
    torch.manual_seed(0)
    lm = Transformer(preset("nano", vocab_size=tok.vocab_size))
    cfg = SpeechStageConfig(
        speech_encoder=SpeechEncoderConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64),
        adapter=SpeechAdapterConfig(dim=32, n_heads=2, ffn_dim=64, ctc_weight=0.5, ctc_compress=True),
    )
    model = build_speech_model(cfg, lm).eval()
    with torch.no_grad():  # make the blank win on about half the frames
        model.speech_adapter.ctc_blank.copy_(lm.tok_embeddings.weight[5])
    collator = SpeechCollator(tok, ASR_PROMPT, model.n_slots)
    samples = [
        {"features": torch.randn(n, 80), "text": t} for n, t in ((160, "the circle is red."), (96, "i see."))
    ]
    batch = collator(samples)
    with torch.no_grad():
        logits, sp, counts = model(
            batch["tokens"],
            features=batch["features"],
            feature_lengths=batch["feature_lengths"],
            speech_mask=batch["speech_mask"],
            return_speech=True,
        )
        keep = model.kept_frames(sp, counts)
        assert 0 < int(keep[0].sum()) < int(counts[0]), (keep[0].sum(), counts[0])
        for b, s in enumerate(samples):
            kept = sp[b, : int(counts[b])][keep[b, : int(counts[b])]]
            ids, flags = collator.prefix(None, kept.shape[0])
            row = ids + collator.text_ids(None, s["text"]) + [tok.eos_id]
            h = lm.embed(torch.tensor([row]))
            h[0, torch.tensor(flags + [False] * (len(row) - len(flags)))] = kept
            alone = lm(input_embeds=h)[0, len(ids) - 1 :]  # from the last prompt token on
            text_pos = (batch["labels"][b] != -100).nonzero().flatten()  # the same positions in the batch row
            torch.testing.assert_close(logits[b, text_pos], alone[: len(text_pos)], rtol=1e-5, atol=1e-5)


def test_a_speech_context_of_another_length_than_the_prompt_is_refused(corpus):
    """The first forward (cache empty) splices the speech context into the prompt; a context whose mask covers
    another length would otherwise be dropped silently and the model would answer without the speech."""
    from mm.adapters.speech import SpeechAdapterConfig
    from mm.encoders.speech import SpeechEncoderConfig
    from mm.lm import KVCache, generate
    from mm.models.speech import SpeechContext
    from mm.stages.speech import SpeechStageConfig, build_speech_model

    tok = Tokenizer.from_file(corpus["tokenizer"])
    torch.manual_seed(0)
    lm = Transformer(preset("nano", vocab_size=tok.vocab_size))
    cfg = SpeechStageConfig(
        speech_encoder=SpeechEncoderConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64),
        adapter=SpeechAdapterConfig(dim=32, n_heads=2, ffn_dim=64),
    )
    model = build_speech_model(cfg, lm).eval()
    tokens = torch.randint(3, tok.vocab_size, (2, 10))
    embeds = torch.randn(2, 10, lm.cfg.dim)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, 2:6] = True
    with torch.no_grad():
        plain = model(tokens)
        spliced = model(tokens, speech=SpeechContext(embeds, mask))
        assert (spliced - plain).abs().max() > 1e-3  # the matching context is used
        for short in (SpeechContext(embeds[:, :8], mask[:, :8]), SpeechContext(embeds[:1], mask[:1])):
            found = (
                f"shape {tuple(short.mask.shape)} (length {short.mask.shape[1]}) but the tokens have shape "
            )
            with pytest.raises(ValueError, match=re.escape(found + "(2, 10) (length 10)")):
                model(tokens, speech=short)
            cache = KVCache.for_model(model, 2, 16)
            with pytest.raises(ValueError, match="expected the same"):
                model(tokens, speech=short, cache=cache)  # the first forward of generation, cache empty
        # Later one-token forwards (cache filled) take the context unchanged and ignore it, as generation does.
        ctx = SpeechContext(embeds, mask)
        new = generate(model, tokens.tolist(), 3, model_kwargs={"speech": ctx})
        static = generate(model, tokens.tolist(), 3, model_kwargs={"speech": ctx}, decode="static")
    assert [len(row) for row in new] == [3, 3]
    assert static == new  # the static cache's one-token steps ignore the context too
