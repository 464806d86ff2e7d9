"""`mm export --checkpoint DIR --format hf-llama|hf-mllama --out OUT`: trained checkpoints as directories that
transformers loads.

- `hf-llama`: an LM checkpoint (an HF Llama directory such as `runs/demo/lm-pretrain/final`, or a Meta-format
  directory with params.json + consolidated.NN.pth) -> a `LlamaForCausalLM` directory with its tokenizer.
- `hf-mllama`: an image-stage bundle whose encoder is Mllama-shaped (patch stem, no canvas position, Mllama's
  masks and norms; e.g. a stage that continued a Llama 3.2 Vision checkpoint) -> a
  `MllamaForConditionalGeneration` directory with `preprocessor_config.json` and the tokenizer. Any other
  encoder is refused with a message naming what differs. The training-only caption head is not exported.
  Also a Meta-format Llama 3.2 Vision directory (params.json with `vision_num_cross_attention_layers`, read by
  `load_meta_vision`; `--vision-heads` / `--intermediate-layers` when they are not Meta's 16 / 3,7,15,23,30).
  Its tokenizer is not written: Meta's tokenizer.model numbers `<|image|>` 128011, Mllama's processor 128256.

The vision indices are written as transformers 5.x reads them (block outputs: each of Meta's block-input
indices minus one) and marked `intermediate_from: block_output`, so transformers 5.x computes what mm and
Meta's reference compute.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMATS = ("hf-llama", "hf-mllama")


def export_llama(checkpoint: Path, out: Path) -> Path:
    """An LM checkpoint (HF Llama or Meta format) -> an HF Llama directory with the tokenizer."""
    from mm.formats.hf_llama import load_hf, save_hf
    from mm.formats.meta_llama import load_meta
    from mm.lm import Tokenizer

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


def export_meta_vision(
    checkpoint: Path, out: Path, heads: int | None = None, intermediate_layers: list[int] | None = None
) -> Path:
    """A Meta-format Llama 3.2 Vision directory -> a transformers Mllama directory (weights, config, processor)."""
    from mm.datasets.tiling import TileTransform
    from mm.formats.hf_mllama import save_hf_mllama
    from mm.formats.meta_vision import META_INTERMEDIATE_LAYERS, META_VISION_HEADS, load_meta_vision

    model = load_meta_vision(
        checkpoint,
        heads=heads or META_VISION_HEADS,
        intermediate_layers=intermediate_layers or META_INTERMEDIATE_LAYERS,
    )
    enc = model.image_encoder.cfg
    transform = TileTransform(enc.tile_size, enc.max_tiles)  # Meta's: CLIP mean/std, bilinear
    ids = {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "pad_token_id": 128004}
    if model.lm.cfg.vocab_size != 128256:  # not Llama 3's tokenizer: no token ids to name
        ids = {"bos_token_id": 0}
    save_hf_mllama(model, out, token_ids=ids, transform=transform)
    return out


def export_mllama(
    checkpoint: Path, out: Path, heads: int | None = None, intermediate_layers: list[int] | None = None
) -> Path:
    """An image-stage bundle with a Mllama-shaped encoder -> a transformers Mllama directory + tokenizer."""
    from mm.formats.hf_mllama import save_hf_mllama
    from mm.stages.image_model import load_image_bundle

    if (checkpoint / "params.json").is_file():
        return export_meta_vision(checkpoint, out, heads, intermediate_layers)

    model, tok, transform, meta = load_image_bundle(checkpoint)
    enc = model.image_encoder.cfg
    check_mllama_shaped(enc)
    # the image processor of the export tiles up to the encoder's capacity (the stage may have used fewer tiles)
    if meta.get("lm_format") == "hf_mllama":
        from mm.formats.bundle import resolve_lm_path
        from mm.formats.hf_mllama import load_hf_mllama_transform

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
    try:
        if args.format == "hf-llama":
            export_llama(checkpoint, out)
        else:
            layers = args.intermediate_layers
            export_mllama(checkpoint, out, args.vision_heads, layers and [int(i) for i in layers.split(",")])
    except (ValueError, FileNotFoundError) as e:
        print(f"mm export: {checkpoint}: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
