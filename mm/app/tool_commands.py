"""The tool commands of `mm`: `verify-frozen`, `tokenizer train`, `data synth`, `data tokenize`, `demo`, `probe` and
`bench`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def setup_logging() -> None:
    """Log records at INFO and above to stderr, with time and logger name."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)


def cmd_verify_frozen(args: argparse.Namespace) -> int:
    """Exit 0 when the LM a stage checkpoint names is bit-identical to the one it was trained against."""
    from mm.formats.bundle import verify_frozen

    ok, msg = verify_frozen(Path(args.checkpoint))
    print(("OK: " if ok else "CHANGED: ") + msg)
    return 0 if ok else 1


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    """Train a byte-level BPE tokenizer on text files."""
    from mm.datasets.text import read_documents
    from mm.lm import Tokenizer

    for p in args.data:
        if not Path(p).exists():
            raise FileNotFoundError(f"data path not found: {p}")
    texts = (d for p in args.data for d in read_documents(p, doc_split=args.doc_split))
    tok = Tokenizer.train(texts, args.vocab_size)
    path = tok.save(args.out)
    print(f"{path} ({tok.vocab_size} ids)")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    """Write a part of the embedded shapes world."""
    from mm import world

    if args.kind == "text":
        if args.split not in world.SPLITS:
            raise ValueError(f"--split {args.split} is not a text split; allowed: {list(world.SPLITS)}")
        path = world.synth_text(args.out, n=args.n or None, seed=args.seed, split=args.split)
    elif args.kind == "shapes":
        path = world.synth_shapes(args.out, n=args.n or None, seed=args.seed, split=args.split)
    elif args.kind == "motion":
        path = world.synth_motion(args.out, n=args.n or None, seed=args.seed, split=args.split)
    elif args.kind == "chat":
        path = world.synth_chat(args.out, n=args.n or None, seed=args.seed)
    elif args.kind == "speech":
        from mm.world.speech import SPEECH_SPLITS, synth_speech

        if args.split not in SPEECH_SPLITS:
            raise ValueError(f"--split {args.split} is not a speech split; allowed: {list(SPEECH_SPLITS)}")
        path = synth_speech(args.out, n=args.n or None, seed=args.seed, split=args.split)
    else:
        raise ValueError(
            f"--kind {args.kind} is not available yet; available: text, shapes, motion, speech, chat"
        )
    print(path)
    return 0


def cmd_data_tokenize(args: argparse.Namespace) -> int:
    """Tokenize text into memory-mapped token shards (`mm.datasets.tokens`); print the folder and its counts."""
    from mm.datasets.token_folders import tokenize_to_folder
    from mm.lm import Tokenizer

    tok = Tokenizer.from_file(args.tokenizer)
    index = tokenize_to_folder(
        args.files,
        tok,
        args.out,
        doc_split=args.doc_split,
        shard_tokens=args.shard_tokens,
        tokenizer_source=str(Path(args.tokenizer).resolve()),
    )
    print(
        f"{args.out}: {index['num_documents']} documents, {index['num_tokens']} tokens in "
        f"{len(index['shards'])} shards"
    )
    return 0


def _stage_line(name: str, st: dict[str, Any]) -> str:
    """A demo stage's steps and wall time, and whether it was reused."""
    return f"{name}: {st.get('step')} steps, {st['wall_time_s']:.0f} s" + (
        " (reused)" if st["reused"] else ""
    )


def _print_section(stages: dict[str, dict[str, Any]], summary: str, frozen: str) -> None:
    """A demo section: a line per stage, the section's results, whether what must stay frozen did."""
    for name, st in stages.items():
        print(_stage_line(name, st))
    print(summary)
    print(frozen)


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded end-to-end demo."""
    from mm.app.demo import run_demo

    setup_logging()
    report = run_demo(Path(args.out), modality=args.modality)
    lm = report["lm"]
    print(f"lm-pretrain: {lm['params']:,} parameters, {lm['steps']} steps, {lm['wall_time_s']:.0f} s")
    curve = " -> ".join(f"{c['value']:.3f}" for c in lm["heldout_ppl_curve"] if c["value"])
    print(f"held-out perplexity: {curve}")
    for completion in lm["completions"].values():
        print(f"  greedy: {completion}")
    if "image" in report:
        im = report["image"]
        _print_section(
            im["stages"],
            f"image captions: exact match {im['caption_exact_match']:.3f} (new images), "
            f"{im['heldout_pair_exact_match']:.3f} (held-out pairs); attribute accuracy {im['attribute_accuracy']:.3f}",
            f"LM frozen: {im['lm_frozen']} ({im['lm_frozen_detail']})",
        )
    if "video" in report:
        vd = report["video"]
        _print_section(
            {"video": vd["stage"]},
            f"video captions: exact match {vd['caption_exact_match']:.3f} (new clips), "
            f"{vd['heldout_pair_exact_match']:.3f} (held-out pairs); direction accuracy {vd['direction_accuracy']:.3f}",
            f"LM and image path frozen: {vd['frozen']} ({vd['frozen_detail']})",
        )
    if "speech" in report:
        sp = report["speech"]
        _print_section(
            sp["stages"],
            f"speech WER: {sp['wer_heldout_sentences']:.3f} (held-out sentences), "
            f"{sp['wer_heldout_voices']:.3f} (held-out voices)" + _speech_extras(sp),
            f"LM frozen: {sp['lm_frozen']} ({sp['lm_frozen_detail']})",
        )
    if "chat" in report:
        ch = report["chat"]
        lm = ch.get("instruct_lm") or {}
        swap = {k: v.get("exact_match") for k, v in (ch.get("hot_swap") or {}).items()}
        _print_section(
            ch["stages"],
            f"instruct LM: perplexity ratio {lm.get('ppl_ratio')} (plain corpus, against the pretrained LM); "
            f"text questions {lm.get('text_qa_accuracy')}\n"
            f"questions about new images and clips: {ch.get('vqa_accuracy')} (canonical phrasings), "
            f"{ch.get('vqa_heldout_phrasings_accuracy')} (held-out phrasings); hot swap (captions): {swap}",
            f"instruct LM frozen: {ch.get('lm_frozen')} ({ch.get('lm_frozen_detail')})",
        )
    elif args.modality == "all":
        print(
            f"chat stages (instruct LM, questions about images and videos): mm demo --modality chat --out {args.out}"
        )
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    """Stage-by-stage probe of an image-stage bundle: a table on stdout, the full record to --json."""
    import torch

    from mm.app.probe import format_table, run_probe

    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_probe(
        args.checkpoint,
        args.train,
        args.heldout,
        n_train=args.n_train,
        n_heldout=args.n_heldout,
        steps=args.steps,
        seed=args.seed,
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result), flush=True)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmarks side by side with transformers (table on stdout, JSON to --json)."""
    from mm.app.bench import main as bench_main

    return bench_main(args.json, quick=args.quick)


def _speech_extras(sp: dict) -> str:
    """The speech section's further figures for the demo's closing lines (those the run has)."""
    parts = []
    if sp.get("wer_untrained_forms") is not None:
        parts.append(f"{sp['wer_untrained_forms']:.3f} (untrained sentence forms)")
    if sp.get("ast_bleu_heldout_sentences") is not None:
        parts.append(f"translation BLEU {sp['ast_bleu_heldout_sentences']:.1f}")
    if sp.get("question_accuracy") is not None:
        parts.append(f"spoken questions {sp['question_accuracy']:.3f}")
    if sp.get("long_recording_wer") is not None:
        parts.append(f"60-s recording WER {sp['long_recording_wer']:.3f}")
    return ("; " + "; ".join(parts)) if parts else ""
