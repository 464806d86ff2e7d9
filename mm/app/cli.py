"""The `mm` command line (see `mm --help`). Results go to stdout, logs and progress to stderr.

The commands live in `infer_commands` (generate, caption, describe, transcribe, translate), `train_commands`
(train, pretrain-lm, pretrain-encoder) and `tool_commands` (probe, verify-frozen, tokenizer, data, demo, bench); this
module builds the parser, one function per group, and dispatches."""

from __future__ import annotations

import argparse
import re
import sys

from mm.app import infer_commands, tool_commands, train_commands
from mm.app.infer_commands import refuse_other_stage as _refuse_other_stage  # noqa: F401  (tests read it here)
from mm.app.infer_commands import stage_of_checkpoint as _stage_of_checkpoint  # noqa: F401


def _add_generate(sub: argparse._SubParsersAction) -> None:
    """`mm generate`."""
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
    g.set_defaults(func=infer_commands.cmd_generate)


def _add_run_args(p: argparse.ArgumentParser, config_help: str, data_help: str) -> None:
    """The arguments every training command shares."""
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--data", nargs="+", help=data_help)
    p.add_argument("--out", help="output folder (checkpoints, metrics.jsonl, final/)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")


def _add_training(sub: argparse._SubParsersAction) -> None:
    """`mm pretrain-lm`, `mm pretrain-encoder` and `mm train`."""
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


def _add_inference(sub: argparse._SubParsersAction) -> None:
    """`mm caption`, `mm describe`, `mm transcribe` and `mm translate`."""
    c = sub.add_parser("caption", help="caption images with an image-stage checkpoint; one line per image")
    c.add_argument("--checkpoint", required=True, help="a stage folder such as runs/demo/image-anneal/final")
    c.add_argument("images", nargs="+")
    c.add_argument("--batch-size", type=int, default=32)
    c.set_defaults(func=infer_commands.cmd_caption)

    de = sub.add_parser("describe", help="describe videos with a video-stage checkpoint; one line per video")
    de.add_argument("--checkpoint", required=True, help="a video-stage folder such as runs/demo/video/final")
    de.add_argument("videos", nargs="+")
    de.add_argument("--batch-size", type=int, default=32)
    de.set_defaults(func=infer_commands.cmd_describe)

    tc = sub.add_parser(
        "transcribe", help="transcribe audio with a speech-stage checkpoint; one line per file"
    )
    tc.add_argument("--checkpoint", required=True, help="a stage folder such as runs/demo/speech/final")
    tc.add_argument("audio", nargs="+", help="audio files (.wav, .flac, .ogg; any rate and channel count)")
    tc.add_argument(
        "--prompt", default=None, help="instruction before the speech (default: the stage's ASR prompt)"
    )
    tc.add_argument("--batch-size", type=int, default=64)
    tc.set_defaults(func=infer_commands.cmd_transcribe)

    tl = sub.add_parser(
        "translate",
        help="translate speech with a speech-stage checkpoint trained with AST; one line per file",
    )
    tl.add_argument("--checkpoint", required=True, help="a stage folder such as runs/demo/speech/final")
    tl.add_argument("--to", required=True, help="the target language: es (Spanish)")
    tl.add_argument(
        "audio", nargs="+", help="audio files (.wav, .flac, .ogg, .mp3; any rate and channel count)"
    )
    tl.add_argument("--batch-size", type=int, default=64)
    tl.set_defaults(func=infer_commands.cmd_translate)

    ch = sub.add_parser(
        "chat",
        help="ask a chat (vision-sft) checkpoint about images or a video; the answer on one line",
        description="One chat turn. Images go into the user turn in the given order, before the message.",
    )
    ch.add_argument(
        "--checkpoint", required=True, help="a vision-sft folder such as runs/demo/vision-sft/final"
    )
    ch.add_argument("--image", action="append", help="an image file (repeat for several, in order)")
    ch.add_argument("--video", help="a video file")
    ch.add_argument(
        "--audio",
        help="an audio file for a speech checkpoint: trained with spoken questions it answers the question the "
        'audio asks, the message being the conversation before it (e.g. a scene: "a large red circle."); '
        "otherwise it gives the transcript",
    )
    ch.add_argument("message", nargs="?", default="", help='the question, e.g. "what colour is the circle?"')
    ch.set_defaults(func=infer_commands.cmd_chat)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    """`mm serve` (its module, which loads torch, is imported when the command runs)."""
    sv = sub.add_parser(
        "serve",
        help="a local web page (127.0.0.1 only) that captions images, describes videos, transcribes audio",
        description="Serve a page on 127.0.0.1 where an uploaded image is captioned (an image-stage folder), a "
        "video described (a video-stage folder) and audio transcribed (a speech-stage folder). POST /api/ask "
        "(multipart: file, optional question) answers JSON {answer} or {error}. Ctrl-C stops it.",
    )
    sv.add_argument(
        "--checkpoint",
        required=True,
        action="append",
        metavar="DIR",
        help="a stage final folder (runs/demo/image-anneal/final, runs/demo/video/final, runs/demo/speech/final); "
        "repeat for several kinds, at most one per kind",
    )
    sv.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    sv.add_argument(
        "--max-upload-mb",
        type=float,
        default=None,
        metavar="M",
        help="largest request accepted, in MB (default 64); a larger one is refused (413) before it is read",
    )
    sv.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default) or localhost; nothing else")
    sv.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    """Run `mm.app.serve.cmd_serve`."""
    from mm.app.serve import cmd_serve

    return cmd_serve(args)


def _add_probe(sub: argparse._SubParsersAction) -> None:
    """`mm probe`."""
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
    pr.set_defaults(func=tool_commands.cmd_probe)


def _add_tools(sub: argparse._SubParsersAction) -> None:
    """`mm verify-frozen`, `mm export`, `mm tokenizer train` and `mm data synth`."""
    v = sub.add_parser(
        "verify-frozen", help="exit 0 if the LM of a stage checkpoint is untouched, 1 otherwise"
    )
    v.add_argument("checkpoint")
    v.set_defaults(func=tool_commands.cmd_verify_frozen)

    from mm.app import export

    ex = sub.add_parser("export", help="write a checkpoint as a directory transformers loads")
    ex.add_argument(
        "--checkpoint",
        required=True,
        help="an LM directory, an image-stage bundle or a Meta-format directory",
    )
    ex.add_argument("--format", required=True, choices=export.FORMATS)
    ex.add_argument("--out", required=True)
    ex.add_argument(
        "--vision-heads", type=int, help="Meta-format vision checkpoints: attention heads (default Meta's 16)"
    )
    ex.add_argument(
        "--intermediate-layers",
        help="Meta-format vision checkpoints: block-input indices, comma-separated (default 3,7,15,23,30)",
    )
    ex.set_defaults(func=export.cmd_export)

    tok = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    tt = tsub.add_parser("train", help="train a byte-level BPE tokenizer on text files")
    tt.add_argument("--data", nargs="+", required=True)
    tt.add_argument("--vocab-size", type=int, required=True)
    tt.add_argument("--out", required=True, help="folder for tokenizer.json")
    tt.add_argument("--doc-split", choices=["paragraph", "line"], default="paragraph")
    tt.set_defaults(func=tool_commands.cmd_tokenizer_train)

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    ds = dsub.add_parser("synth", help="write the embedded shapes world")
    ds.add_argument(
        "--kind",
        required=True,
        choices=["text", "shapes", "motion", "speech", "chat"],
        help="chat: question-answer conversations (text dialogues, image/video QA, evaluation files) in "
        "OUT/chat/; --n is then the number of image QA training rows (the other counts scale), no --split",
    )
    ds.add_argument("--out", required=True)
    ds.add_argument(
        "--n", type=int, default=0, help="number of items (0 = the default for the kind and split)"
    )
    ds.add_argument(
        "--split",
        default="train",
        help="text: train, heldout; shapes, motion: train, heldout (new samples of the training pairs), "
        "heldout_pairs (the held-out colour-shape pairs); speech: the splits of mm.world.speech (train, "
        "heldout_sentences, questions_train, ...); an unknown split is refused, naming the allowed ones",
    )
    ds.add_argument("--seed", type=int, default=0)
    ds.set_defaults(func=tool_commands.cmd_data_synth)
    dt = dsub.add_parser(
        "tokenize",
        help="tokenize text files into memory-mapped token shards (train on the folder: --data DIR)",
    )
    dt.add_argument(
        "--tokenizer", required=True, help="tokenizer.json / tokenizer.model, or a folder with one"
    )
    dt.add_argument("--out", required=True, help="folder for index.json, tokens-NNNNN.bin and the tokenizer")
    dt.add_argument("files", nargs="+", help="text, JSONL(.gz) files or folders (as `--data` reads them)")
    dt.add_argument("--doc-split", choices=["paragraph", "line"], default="paragraph")
    dt.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard (default 2^28)")
    dt.set_defaults(func=tool_commands.cmd_data_tokenize)


def _add_demo_and_bench(sub: argparse._SubParsersAction) -> None:
    """`mm demo` and `mm bench`."""
    dm = sub.add_parser("demo", help="run the embedded end-to-end demo (no downloads)")
    dm.add_argument(
        "--modality",
        choices=["lm", "image", "video", "speech", "chat", "all"],
        default="all",
        help="the sections to run (default all: lm, image, video, speech; chat runs on top of them on request)",
    )
    dm.add_argument("--out", default="runs/demo")
    dm.set_defaults(func=tool_commands.cmd_demo)
    b = sub.add_parser("bench", help="benchmark training, generation, memory and MFU against transformers")
    b.add_argument("--json", default=None, help="write the full record (ratios, repeats, machine) here")
    b.add_argument("--quick", action="store_true", help="fewer repeats (under 3 minutes on 2 cores)")
    b.set_defaults(func=tool_commands.cmd_bench)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    """`mm plan`."""
    from mm.app import plan

    pl = sub.add_parser(
        "plan",
        help="per-GPU memory of a training config under FSDP2 (meta device) and the largest micro-batch",
    )
    pl.add_argument("--config", required=True, help="any stage config `mm train` accepts")
    pl.add_argument("--gpus", type=int, required=True, help="GPUs the model is sharded over (FSDP2)")
    pl.add_argument("--gpu-memory", type=float, required=True, metavar="GIB", help="memory per GPU in GiB")
    pl.add_argument("--seq-len", type=int, help="tokens per sample (default: train.seq_len)")
    pl.add_argument("--batch", type=int, help="micro-batch per GPU (default: train.micro_batch_size)")
    pl.add_argument(
        "--activation-checkpointing", choices=plan.AC_MODES, help="default: the config's train section"
    )
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    pl.set_defaults(func=plan.cmd_plan)


def _add_profile(sub: argparse._SubParsersAction) -> None:
    """`mm profile`."""
    from mm.app import profile_step

    pf = sub.add_parser(
        "profile",
        help="where a stage's training step spends its time: phases, operators, FLOP/s, evaluation, checkpoints",
    )
    pf.add_argument("--config", help="any stage config `mm train` accepts (its data paths must exist)")
    pf.add_argument("--demo", metavar="OUT", help="profile the stages of `mm demo --out OUT` (run it first)")
    pf.add_argument("--data", nargs="+", help="with --config: the training data (as `mm train --data`)")
    pf.add_argument("--stage", nargs="+", help="with --demo: only these stages (default: all)")
    pf.add_argument("--steps", type=int, default=20, help="timed steps after the warm-up (default 20)")
    pf.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    pf.add_argument("--json", default=None, help="write the records (one per stage) here")
    pf.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (with --config)")
    pf.set_defaults(func=profile_step.cmd_profile)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `mm` subcommand."""
    from mm import __version__

    p = argparse.ArgumentParser(
        prog="mm", description="Extend a frozen Llama 3-style LM with image, video, speech."
    )
    p.add_argument("--version", action="version", version=f"mm {__version__}")
    p.add_argument(
        "--decode",
        choices=("auto", "dynamic", "static", "compiled"),
        help="how every command's generation runs its one-token steps (mm.lm.decode): auto (default: the "
        "compiled static-cache step for LMs of >= 8M parameters, else the dynamic cache), dynamic, static, or "
        "compiled (Inductor compiles once per model, batch size and cache length); also MM_DECODE",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_generate,
        _add_training,
        _add_inference,
        _add_serve,
        _add_probe,
        _add_tools,
        _add_demo_and_bench,
    ):
        add(sub)  # in this order in `mm --help`
    _add_plan(sub)
    _add_profile(sub)
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
    if args.decode:
        from mm.lm.decode import set_default_decode_mode

        set_default_decode_mode(args.decode)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"mm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
