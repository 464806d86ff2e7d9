"""The inference commands of `mm`: `generate` (an LM checkpoint), `caption`, `describe`, `transcribe` and
`translate` (the image, video and speech stages). Each prints one line per input on stdout, in input order, or nothing: a
checkpoint of another stage, or any unreadable input, is refused with one line on stderr (exit 2). Which command
reads which stage's folder, and how the folder loads, is the stage's own (`Stage.reader`, `Stage.load_final`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any


def stage_of_checkpoint(folder: Path) -> str | None:
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


def refuse_other_stage(command: str, checkpoint: str) -> bool:
    """True (after a one-line message on stderr) when `checkpoint` holds a stage `mm <command>` does not read."""
    from mm.training.stage import stage_readers

    folder = Path(checkpoint)
    stage = stage_of_checkpoint(folder)
    readers = stage_readers()
    if stage is None or readers.get(stage) == command:
        return False  # ours, or unknown: the loader checks the folder in full
    reads = " or ".join(s for s, c in readers.items() if c == command)
    reader = readers.get(stage)
    hint = f"read it with `mm {reader} --checkpoint {folder}`" if reader else "no inference command reads it"
    print(
        f"mm {command}: {folder} holds a {stage!r} checkpoint, not {reads}; {hint}",
        file=sys.stderr,
    )
    return True


def load_inputs(
    command: str,
    verb: str,
    paths: Sequence[str],
    load: Callable[[str], Any],
    errors: tuple[type[Exception], ...],
) -> list[Any] | None:
    """Every input loaded before any output, so that stdout holds one line per input or nothing; None (after
    a line `mm <command>: cannot <verb> <path>: <error>` on stderr for each bad input) if any fails."""
    loaded, bad = [], []
    for path in paths:
        try:
            loaded.append(load(path))
        except errors as e:
            bad.append(path)
            print(f"mm {command}: cannot {verb} {path}: {e}", file=sys.stderr)
    return None if bad else loaded


def print_lines(texts: Iterable[str]) -> None:
    """One line per text on stdout: any line-breaking character inside a text becomes a space."""
    for t in texts:
        print(" ".join(t.splitlines()), flush=True)


def cmd_generate(args: argparse.Namespace) -> int:
    """Greedy (or sampled) completion of a prompt with an HF Llama checkpoint directory and its tokenizer."""
    import torch

    from mm.lm import generate
    from mm.training.stage import reader_stage

    lm, tok = reader_stage("generate").load_final(Path(args.checkpoint))
    model = lm.eval()
    stops = [tok.eos_id, tok.eot_id]
    gen = torch.Generator().manual_seed(args.seed)
    for prompt in args.prompt:
        ids = tok.encode(prompt, bos=True)
        new = generate(
            model, [ids], args.max_new_tokens, args.temperature, args.top_p, stop_tokens=stops, generator=gen
        )[0]
        print(prompt + tok.decode(new), flush=True)
    return 0


def load_recording(path: str, features: Any) -> Any:
    """A file's 16 kHz waveform, checked as `features` checks a clip (BadSample naming the problem); a recording
    longer than the features' window is only checked for sound (`transcribe_long` cuts it on silence)."""
    from mm.datasets.audio import SAMPLE_RATE, decode_audio
    from mm.datasets.skips import BadSample

    wave = decode_audio(path)
    if wave.numel() <= int(features.max_seconds * SAMPLE_RATE):
        features(wave)  # too short, silent: refused as before
    elif float(wave.abs().max()) < features.silence_peak:
        raise BadSample("silent", f"peak amplitude {float(wave.abs().max()):.2e} < {features.silence_peak}")
    return wave


def _speech_lines(command: str, args: argparse.Namespace, prompt_key: str, max_new_tokens: int) -> int:
    """Load a speech bundle and every input, then print one decoded line per recording (`transcribe_long`)."""
    from mm.datasets.skips import BadSample
    from mm.models.speech import transcribe_long
    from mm.training.stage import reader_stage

    model, tok, features, meta = reader_stage("transcribe").load_final(Path(args.checkpoint))
    given = getattr(args, "prompt", None)
    prompt = given if given is not None else meta.get(prompt_key)
    if not prompt:
        print(
            f"mm {command}: {args.checkpoint} was not trained to translate (its mm_config.json has no "
            f"{prompt_key}; train the speech stage with data.ast_fraction > 0)",
            file=sys.stderr,
        )
        return 2
    waves = load_inputs(command, "use", args.audio, lambda p: load_recording(p, features), (BadSample,))
    if waves is None:
        return 2
    texts = transcribe_long(
        model, tok, waves, features, prompt=prompt, batch_size=args.batch_size, max_new_tokens=max_new_tokens
    )
    print_lines(texts)
    return 0


def cmd_transcribe(args: argparse.Namespace) -> int:
    """Transcribe audio files with a speech-stage bundle; one transcript per line, in input order (a recording
    longer than the encoder's window is cut on silence and its pieces' transcripts joined in order)."""
    if refuse_other_stage("transcribe", args.checkpoint):
        return 2
    return _speech_lines("transcribe", args, "prompt", 32)


TRANSLATION_TARGETS = ("es",)  # the languages a speech bundle translates into (its AST prompt's)


def cmd_translate(args: argparse.Namespace) -> int:
    """Translate speech into Spanish with a speech-stage bundle trained with AST; one translation per line."""
    if args.to not in TRANSLATION_TARGETS:
        print(
            f"mm translate: --to {args.to!r} is not available; the speech stage translates into: "
            f"{', '.join(TRANSLATION_TARGETS)} (Spanish)",
            file=sys.stderr,
        )
        return 2
    stage = stage_of_checkpoint(Path(args.checkpoint))
    if stage not in (None, "speech"):
        from mm.training.stage import stage_readers

        reader = stage_readers().get(stage)
        hint = (
            f"read it with `mm {reader} --checkpoint {args.checkpoint}`"
            if reader
            else "no command translates it"
        )
        print(
            f"mm translate: {args.checkpoint} holds a {stage!r} checkpoint, not speech; {hint}",
            file=sys.stderr,
        )
        return 2
    return _speech_lines("translate", args, "ast_prompt", 48)


def cmd_describe(args: argparse.Namespace) -> int:
    """Describe videos with a video-stage bundle; one caption per line, in input order."""
    if refuse_other_stage("describe", args.checkpoint):
        return 2
    from mm.datasets.skips import BadSample
    from mm.datasets.video import decode_clip
    from mm.models.video import describe_videos
    from mm.training.stage import reader_stage

    model, tok, transform, meta = reader_stage("describe").load_final(Path(args.checkpoint))
    if load_inputs("describe", "read", args.videos, lambda p: decode_clip(p, 1), (BadSample,)) is None:
        return 2
    print_lines(describe_videos(model, tok, transform, meta, list(args.videos), batch_size=args.batch_size))
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    """Caption images with an image-stage bundle; one caption per line, in input order."""
    if refuse_other_stage("caption", args.checkpoint):
        return 2
    from mm.models.caption import caption_images, load_rgb
    from mm.training.stage import reader_stage

    model, tok, transform, meta = reader_stage("caption").load_final(Path(args.checkpoint))
    images = load_inputs("caption", "read", args.images, load_rgb, (OSError, ValueError))
    if images is None:
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
    print_lines(caps)
    return 0


def _speech_chat(args: argparse.Namespace) -> int:
    """`mm chat --audio` with a speech checkpoint: trained with spoken questions, it answers the question the
    audio asks, after `message` as the conversation so far (e.g. a scene); else the audio's transcript (the
    message, if any, is then the instruction after the speech)."""
    from mm.datasets.skips import BadSample
    from mm.models.speech import answer_features
    from mm.training.stage import reader_stage

    if not args.audio:
        print(f"mm chat: {args.checkpoint} is a speech checkpoint: give --audio FILE", file=sys.stderr)
        return 2
    model, tok, features, meta = reader_stage("transcribe").load_final(Path(args.checkpoint))
    if meta.get("dialogue_prompt") is None:
        args.prompt = args.message or None
        return cmd_transcribe(argparse.Namespace(**{**vars(args), "audio": [args.audio], "batch_size": 1}))
    feats = load_inputs("chat", "use", [args.audio], lambda p: features.load(p), (BadSample,))
    if feats is None:
        return 2
    print_lines(answer_features(model, tok, feats, [args.message or ""]))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """One chat turn: the answer to `message` about the given images (in order) and video, on one line. A speech
    checkpoint trained with spoken questions answers the question an `--audio` file asks (the message is the
    conversation before it, e.g. a scene in words); other speech checkpoints give the audio's transcript."""
    stage = stage_of_checkpoint(Path(args.checkpoint))
    if stage == "speech":
        return _speech_chat(args)
    if refuse_other_stage("chat", args.checkpoint):
        return 2
    if args.audio:
        print(
            f"mm chat: {args.checkpoint} reads images and video; audio needs a speech checkpoint",
            file=sys.stderr,
        )
        return 2
    if not args.message:
        print('mm chat: give a message (e.g. "what colour is the circle?")', file=sys.stderr)
        return 2
    from mm.models.chat import Chat

    chat = Chat.load(Path(args.checkpoint))
    try:
        answer = chat.ask(args.message, images=list(args.image or []), video=args.video)
    except (OSError, ValueError) as e:
        print(f"mm chat: {e}", file=sys.stderr)
        return 2
    print_lines([answer])
    return 0
