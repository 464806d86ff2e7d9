"""The `mm` command line (see `mm --help`). Results go to stdout, logs and progress to stderr."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mm` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"mm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
