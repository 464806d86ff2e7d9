"""`mm export --checkpoint DIR --format hf-llama|hf-mllama --out OUT`: trained checkpoints as directories that
transformers loads.

- `hf-llama`: an LM checkpoint (an HF Llama directory such as `runs/demo/lm-pretrain/final`, or a Meta-format
  directory with params.json + consolidated.NN.pth) -> a `LlamaForCausalLM` directory with its tokenizer.
- `hf-mllama`: an image-stage bundle whose encoder is Mllama-shaped (patch stem, no canvas position, Mllama's
  masks and norms; e.g. a stage that continued a Llama 3.2 Vision checkpoint) -> a
  `MllamaForConditionalGeneration` directory with `preprocessor_config.json` and the tokenizer. Any other
  encoder is refused with a message naming what differs. The training-only caption head is not exported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMATS = ("hf-llama", "hf-mllama")


def export_llama(checkpoint: Path, out: Path) -> Path:
    """An LM checkpoint (HF Llama or Meta format) -> an HF Llama directory with the tokenizer."""
    from mm.lm import Tokenizer, load_hf, load_meta, save_hf

    if (checkpoint / "params.json").is_file():
        model, tok_src = load_meta(checkpoint), checkpoint / "tokenizer.model"
    elif (checkpoint / "config.json").is_file():
        model, tok_src = load_hf(checkpoint), checkpoint
    elif (checkpoint / "mm_config.json").is_file():
        raise ValueError(
            f"{checkpoint} is a stage bundle, not an LM checkpoint: export image stages as hf-mllama"
        )
    else:
        raise FileNotFoundError(f"{checkpoint}: neither config.json (HF Llama) nor params.json (Meta format)")
    save_hf(model, out)
    if tok_src.exists():
        Tokenizer.from_file(tok_src).save(out)
    return out


def check_mllama_shaped(encoder_cfg: object) -> None:
    """Refuse an image encoder with parts Mllama's vision model does not have, naming each."""
    differs = []
    if getattr(encoder_cfg, "stem", "patch") != "patch":
        differs.append(f"image_encoder.stem={encoder_cfg.stem!r} (Mllama: a patch projection, 'patch')")
    if getattr(encoder_cfg, "canvas_position", False):
        differs.append("image_encoder.canvas_position=true (Mllama has no canvas position embedding)")
    if differs:
        raise ValueError("the image encoder is not Mllama-shaped: " + "; ".join(differs))


def export_mllama(checkpoint: Path, out: Path) -> Path:
    """An image-stage bundle with a Mllama-shaped encoder -> a transformers Mllama directory + tokenizer."""
    from mm.models.loading import load_image_bundle
    from mm.models.mllama import save_hf_mllama

    model, tok, transform, meta = load_image_bundle(checkpoint)
    enc = model.image_encoder.cfg
    check_mllama_shaped(enc)
    # the image processor of the export tiles up to the encoder's capacity (the stage may have used fewer tiles)
    if meta.get("lm_format") == "hf_mllama":
        from mm.models.mllama import load_hf_mllama_transform
        from mm.training.bundle import resolve_lm_path

        transform = load_hf_mllama_transform(resolve_lm_path(checkpoint, meta))
    else:
        from mm.datasets.tiling import TileTransform

        transform = TileTransform(enc.tile_size, enc.max_tiles, id_max_tiles=enc.max_tiles)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    save_hf_mllama(model, out, token_ids=ids, transform=transform)
    tok.save(out)
    return out


def cmd_export(args: argparse.Namespace) -> int:
    """`mm export`: write the directory; exit 2 with a one-line reason when the checkpoint cannot be exported."""
    checkpoint, out = Path(args.checkpoint), Path(args.out)
    run = export_llama if args.format == "hf-llama" else export_mllama
    try:
        run(checkpoint, out)
    except (ValueError, FileNotFoundError) as e:
        print(f"mm export: {checkpoint}: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
