"""The `mm` command line (see `mm --help`). Results go to stdout, logs and progress to stderr."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from mm.app import train_commands


def _cmd_generate(args: argparse.Namespace) -> int:
    """Greedy (or sampled) completion of a prompt with an HF Llama checkpoint directory and its tokenizer."""
    import torch

    from mm.lm import Tokenizer, generate, load_hf

    ckpt = Path(args.checkpoint)
    model = load_hf(ckpt).eval()
    tok = Tokenizer.from_file(ckpt)
    stops = [tok.eos_id, tok.eot_id]
    gen = torch.Generator().manual_seed(args.seed)
    for prompt in args.prompt:
        ids = tok.encode(prompt, bos=True)
        new = generate(
            model, [ids], args.max_new_tokens, args.temperature, args.top_p, stop_tokens=stops, generator=gen
        )[0]
        print(prompt + tok.decode(new), flush=True)
    return 0


def _setup_logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)


# Which command reads the checkpoint folder of each stage (an HF Llama directory holds the lm-pretrain stage).
_STAGE_READER = {
    "lm-pretrain": "generate",
    "image-pretrain": "caption",
    "image-anneal": "caption",
    "video": "describe",
    "speech": "transcribe",
}


def _stage_of_checkpoint(folder: Path) -> str | None:
    """The stage a checkpoint folder holds: the `stage` of its bundle config (mm_config.json, else config.json);
    "lm-pretrain" for an HF Llama directory (a config.json of model_type llama, no stage); None if unknown."""
    for name in ("mm_config.json", "config.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            cfg = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None  # the loader reports an unreadable config with its own message
        if not isinstance(cfg, dict):
            return None
        if isinstance(cfg.get("stage"), str):
            return cfg["stage"]
        if name == "config.json" and cfg.get("model_type") == "llama":
            return "lm-pretrain"
    return None


def _refuse_other_stage(command: str, checkpoint: str) -> bool:
    """True (after a one-line message on stderr) when `checkpoint` holds a stage `mm <command>` does not read."""
    folder = Path(checkpoint)
    stage = _stage_of_checkpoint(folder)
    if stage is None or _STAGE_READER.get(stage) == command:
        return False  # ours, or unknown: the loader checks the folder in full
    reads = " or ".join(s for s, c in _STAGE_READER.items() if c == command)
    reader = _STAGE_READER.get(stage)
    hint = f"read it with `mm {reader} --checkpoint {folder}`" if reader else "no inference command reads it"
    print(
        f"mm {command}: {folder} holds a {stage!r} checkpoint, not {reads}; {hint}",
        file=sys.stderr,
    )
    return True


def _cmd_transcribe(args: argparse.Namespace) -> int:
    """Transcribe audio files with a speech-stage bundle; one transcript per line, in input order."""
    if _refuse_other_stage("transcribe", args.checkpoint):
        return 2
    from mm.datasets.images import BadSample
    from mm.models.loading import load_speech_bundle
    from mm.models.speech import transcribe_features

    model, tok, features, meta = load_speech_bundle(Path(args.checkpoint))
    feats, bad = [], []
    for path in args.audio:  # check every input first: stdout holds one line per input or nothing
        try:
            feats.append(features.load(path))
        except BadSample as e:
            bad.append(path)
            print(f"mm transcribe: cannot use {path}: {e}", file=sys.stderr)
    if bad:
        return 2
    prompt = args.prompt if args.prompt is not None else meta["prompt"]
    for t in transcribe_features(model, tok, feats, prompt=prompt, batch_size=args.batch_size):
        print(" ".join(t.splitlines()), flush=True)
    return 0


def _cmd_describe(args: argparse.Namespace) -> int:
    """Describe videos with a video-stage bundle; one caption per line, in input order."""
    if _refuse_other_stage("describe", args.checkpoint):
        return 2
    from mm.datasets.images import BadSample
    from mm.datasets.video import decode_clip
    from mm.models.loading import load_video_bundle
    from mm.models.video import describe_videos

    model, tok, transform, meta = load_video_bundle(Path(args.checkpoint))
    bad = []
    for path in args.videos:  # check every input first: stdout holds one line per input or nothing
        try:
            decode_clip(path, 1)
        except BadSample as e:
            bad.append(path)
            print(f"mm describe: cannot read {path}: {e}", file=sys.stderr)
    if bad:
        return 2
    caps = describe_videos(model, tok, transform, meta, list(args.videos), batch_size=args.batch_size)
    for c in caps:  # one line per input
        print(" ".join(c.splitlines()), flush=True)
    return 0


def _cmd_caption(args: argparse.Namespace) -> int:
    """Caption images with an image-stage bundle; one caption per line, in input order."""
    if _refuse_other_stage("caption", args.checkpoint):
        return 2
    from mm.models.caption import caption_images, load_rgb
    from mm.models.loading import load_image_bundle

    model, tok, transform, meta = load_image_bundle(Path(args.checkpoint))
    images, bad = [], []
    for path in args.images:
        try:
            images.append(load_rgb(path))
        except (OSError, ValueError) as e:
            bad.append(path)
            print(f"mm caption: cannot read {path}: {e}", file=sys.stderr)
    if bad:
        return 2
    caps = caption_images(
        model,
        tok,
        transform,
        images,
        prompt=meta["prompt"],
        max_tiles=meta["max_tiles"],
        batch_size=args.batch_size,
    )
    for c in caps:  # one line per input: any line-breaking character inside a caption becomes a space
        print(" ".join(c.splitlines()), flush=True)
    return 0


def _cmd_verify_frozen(args: argparse.Namespace) -> int:
    """Exit 0 when the LM a stage checkpoint names is bit-identical to the one it was trained against."""
    from mm.training.bundle import verify_frozen

    ok, msg = verify_frozen(Path(args.checkpoint))
    print(("OK: " if ok else "CHANGED: ") + msg)
    return 0 if ok else 1


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
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


def _cmd_data_synth(args: argparse.Namespace) -> int:
    """Write a part of the embedded shapes world."""
    from mm.datasets import shapes

    if args.kind == "text":
        if args.split not in shapes.SPLITS:
            raise ValueError(f"--split {args.split} is not a text split; allowed: {list(shapes.SPLITS)}")
        path = shapes.synth_text(args.out, n=args.n or None, seed=args.seed, split=args.split)
    elif args.kind == "shapes":
        path = shapes.synth_shapes(args.out, n=args.n or None, seed=args.seed, split=args.split)
    elif args.kind == "motion":
        path = shapes.synth_motion(args.out, n=args.n or None, seed=args.seed, split=args.split)
    elif args.kind == "speech":
        from mm.datasets.spoken_shapes import SPEECH_SPLITS, synth_speech

        if args.split not in SPEECH_SPLITS:
            raise ValueError(f"--split {args.split} is not a speech split; allowed: {list(SPEECH_SPLITS)}")
        path = synth_speech(args.out, n=args.n or None, seed=args.seed, split=args.split)
    else:
        raise ValueError(f"--kind {args.kind} is not available yet; available: text, shapes, motion")
    print(path)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """The embedded end-to-end demo."""
    from mm.app.demo import run_demo

    _setup_logging()
    report = run_demo(Path(args.out), modality=args.modality)
    lm = report["lm"]
    print(f"lm-pretrain: {lm['params']:,} parameters, {lm['steps']} steps, {lm['wall_time_s']:.0f} s")
    curve = " -> ".join(f"{c['value']:.3f}" for c in lm["heldout_ppl_curve"] if c["value"])
    print(f"held-out perplexity: {curve}")
    for completion in lm["completions"].values():
        print(f"  greedy: {completion}")
    if "image" in report:
        im = report["image"]
        for name, st in im["stages"].items():
            print(
                f"{name}: {st.get('step')} steps, {st['wall_time_s']:.0f} s"
                + (" (reused)" if st["reused"] else "")
            )
        print(
            f"image captions: exact match {im['caption_exact_match']:.3f} (new images), "
            f"{im['heldout_pair_exact_match']:.3f} (held-out pairs); attribute accuracy {im['attribute_accuracy']:.3f}"
        )
        print(f"LM frozen: {im['lm_frozen']} ({im['lm_frozen_detail']})")
    if "video" in report:
        vd = report["video"]
        st = vd["stage"]
        print(
            f"video: {st.get('step')} steps, {st['wall_time_s']:.0f} s"
            + (" (reused)" if st["reused"] else "")
        )
        print(
            f"video captions: exact match {vd['caption_exact_match']:.3f} (new clips), "
            f"{vd['heldout_pair_exact_match']:.3f} (held-out pairs); direction accuracy {vd['direction_accuracy']:.3f}"
        )
        print(f"LM and image path frozen: {vd['frozen']} ({vd['frozen_detail']})")
    if "speech" in report:
        sp = report["speech"]
        for name, st in sp["stages"].items():
            print(
                f"{name}: {st.get('step')} steps, {st['wall_time_s']:.0f} s"
                + (" (reused)" if st["reused"] else "")
            )
        print(
            f"speech WER: {sp['wer_heldout_sentences']:.3f} (held-out sentences), "
            f"{sp['wer_heldout_voices']:.3f} (held-out voices)"
        )
        print(f"LM frozen: {sp['lm_frozen']} ({sp['lm_frozen_detail']})")
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    """Stage-by-stage probe of an image-stage bundle: a table on stdout, the full record to --json."""
    import torch

    from mm.app.probe import format_table, run_probe

    _setup_logging()
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


def _cmd_bench(args: argparse.Namespace) -> int:
    """Benchmarks side by side with transformers (table on stdout, JSON to --json)."""
    from mm.app.bench import main as bench_main

    return bench_main(args.json, quick=args.quick)


def _add_run_args(p: argparse.ArgumentParser, config_help: str, data_help: str) -> None:
    """The arguments every training command shares."""
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--data", nargs="+", help=data_help)
    p.add_argument("--out", help="output folder (checkpoints, metrics.jsonl, final/)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `mm` subcommand."""
    from mm import __version__

    p = argparse.ArgumentParser(
        prog="mm", description="Extend a frozen Llama 3-style LM with image, video, speech."
    )
    p.add_argument("--version", action="version", version=f"mm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser(
        "generate", help="complete prompts with an LM checkpoint (HF Llama directory + tokenizer)"
    )
    g.add_argument(
        "--checkpoint", required=True, help="folder with config.json, model.safetensors, tokenizer.json"
    )
    g.add_argument("prompt", nargs="+", help="one or more prompts; one completion per line on stdout")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_cmd_generate)

    t = sub.add_parser(
        "pretrain-lm",
        help="pretrain the language model (Llama 3 recipe)",
        description="Pretrain the LM. Extra KEY=VALUE arguments override config keys, e.g. optim.lr=1e-3.",
    )
    _add_run_args(
        t, "YAML config (e.g. configs/lm/tiny.yaml)", "text files or folders (.txt, .md, .jsonl, .jsonl.gz)"
    )
    t.set_defaults(func=train_commands.cmd_pretrain_lm)

    pe = sub.add_parser(
        "pretrain-encoder",
        help="contrastively (CLIP) pretrain the image encoder with a small text tower",
        description="Pretrain the image encoder. Extra KEY=VALUE arguments override config keys, "
        "e.g. tokenizer=runs/demo/lm-pretrain/final.",
    )
    _add_run_args(
        pe,
        "YAML config (e.g. configs/encoders/clip_tiny.yaml)",
        "image-text pairs: a JSONL manifest or WebDataset shards (.tar)",
    )
    pe.set_defaults(func=train_commands.cmd_pretrain_encoder)

    tr = sub.add_parser(
        "train",
        help="train any stage from its config (lm-pretrain, clip-pretrain, bestrq-pretrain, image-pretrain, "
        "image-anneal, video, speech; the config's `stage:` key)",
        description="Train a stage. Extra KEY=VALUE arguments override config keys, e.g. optim.lr=1e-4.",
    )
    _add_run_args(
        tr,
        "YAML stage config (e.g. configs/stages/image_pretrain_tiny.yaml)",
        "training pairs: a JSONL manifest (.jsonl) or WebDataset shards (.tar)",
    )
    tr.set_defaults(func=train_commands.cmd_train)

    c = sub.add_parser("caption", help="caption images with an image-stage checkpoint; one line per image")
    c.add_argument("--checkpoint", required=True, help="a stage folder such as runs/demo/image-anneal/final")
    c.add_argument("images", nargs="+")
    c.add_argument("--batch-size", type=int, default=32)
    c.set_defaults(func=_cmd_caption)

    de = sub.add_parser("describe", help="describe videos with a video-stage checkpoint; one line per video")
    de.add_argument("--checkpoint", required=True, help="a video-stage folder such as runs/demo/video/final")
    de.add_argument("videos", nargs="+")
    de.add_argument("--batch-size", type=int, default=32)
    de.set_defaults(func=_cmd_describe)

    tc = sub.add_parser(
        "transcribe", help="transcribe audio with a speech-stage checkpoint; one line per file"
    )
    tc.add_argument("--checkpoint", required=True, help="a stage folder such as runs/demo/speech/final")
    tc.add_argument("audio", nargs="+", help="audio files (.wav, .flac, .ogg; any rate and channel count)")
    tc.add_argument(
        "--prompt", default=None, help="instruction before the speech (default: the stage's ASR prompt)"
    )
    tc.add_argument("--batch-size", type=int, default=64)
    tc.set_defaults(func=_cmd_transcribe)

    pr = sub.add_parser(
        "probe",
        help="probe where image information is lost: encoder, projection, cross-attention, captions, LM",
    )
    pr.add_argument(
        "--checkpoint", required=True, help="an image-stage folder such as runs/demo/image-anneal/final"
    )
    pr.add_argument(
        "--train", required=True, help="JSONL manifest of shapes-world images the probes train on"
    )
    pr.add_argument(
        "--heldout", required=True, help="JSONL manifest of the held-out images they are scored on"
    )
    pr.add_argument("--n-train", type=int, default=1500)
    pr.add_argument("--n-heldout", type=int, default=300)
    pr.add_argument("--steps", type=int, default=400, help="AdamW steps of each probe")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--threads", type=int, default=2, help="torch threads (0 = torch's default)")
    pr.add_argument("--json", default=None, help="write the full record here")
    pr.set_defaults(func=_cmd_probe)

    v = sub.add_parser(
        "verify-frozen", help="exit 0 if the LM of a stage checkpoint is untouched, 1 otherwise"
    )
    v.add_argument("checkpoint")
    v.set_defaults(func=_cmd_verify_frozen)

    tok = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    tt = tsub.add_parser("train", help="train a byte-level BPE tokenizer on text files")
    tt.add_argument("--data", nargs="+", required=True)
    tt.add_argument("--vocab-size", type=int, required=True)
    tt.add_argument("--out", required=True, help="folder for tokenizer.json")
    tt.add_argument("--doc-split", choices=["paragraph", "line"], default="paragraph")
    tt.set_defaults(func=_cmd_tokenizer_train)

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    ds = dsub.add_parser("synth", help="write the embedded shapes world")
    ds.add_argument("--kind", required=True, choices=["text", "shapes", "motion", "speech"])
    ds.add_argument("--out", required=True)
    ds.add_argument(
        "--n", type=int, default=0, help="number of items (0 = the default for the kind and split)"
    )
    ds.add_argument(
        "--split",
        choices=["train", "heldout", "heldout_pairs", "heldout_sentences", "heldout_voices"],
        default="train",
        help="heldout: new samples of the training pairs; heldout_pairs: the held-out colour-shape pairs "
        "(shapes, motion)",
    )
    ds.add_argument("--seed", type=int, default=0)
    ds.set_defaults(func=_cmd_data_synth)

    dm = sub.add_parser("demo", help="run the embedded end-to-end demo (no downloads)")
    dm.add_argument("--modality", choices=["lm", "image", "video", "speech", "all"], default="all")
    dm.add_argument("--out", default="runs/demo")
    dm.set_defaults(func=_cmd_demo)
    b = sub.add_parser("bench", help="benchmark training, generation, memory and MFU against transformers")
    b.add_argument("--json", default=None, help="write the full record (ratios, repeats, machine) here")
    b.add_argument("--quick", action="store_true", help="fewer repeats (under 3 minutes on 2 cores)")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mm` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may stand anywhere among the options (argparse takes one positional run only,
    # and `--data A B key=value` would otherwise swallow the override as a path).
    if hasattr(args, "overrides") and getattr(args, "data", None):
        is_override = [bool(re.match(r"^[A-Za-z_][\w.]*=", d)) for d in args.data]
        args.overrides = list(args.overrides) + [d for d, o in zip(args.data, is_override) if o]
        args.data = [d for d, o in zip(args.data, is_override) if not o] or None
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"mm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
