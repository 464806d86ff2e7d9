"""Parity with Meta's reference Llama 3.2 Vision model (`llama-models`' `CrossAttentionTransformer`, run with
fairscale at model-parallel size 1 on a gloo group of one): a tiny random model built by Meta's code, every gate
non-zero, saved as Meta saves it (params.json + consolidated.NN.pth, 1 or 2 model-parallel shards), loads with
`load_meta_vision` and gives Meta's vision features, logits and greedy tokens; read as transformers 5.x reads the
intermediate indices (block outputs), the logits move far beyond the bound."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mm import load_hf_mllama
from mm.datasets.collate import cross_attention_mask_from_tokens
from mm.datasets.tiling import supported_aspect_ratios
from mm.formats.meta_vision import VISION_SPLIT_DIM, fusion_schedule, load_meta_vision
from mm.lm import generate
from mm.models.media import MediaInput

meta_mm = pytest.importorskip("llama_models.llama3.multimodal.model")
meta_args = pytest.importorskip("llama_models.llama3.args")
fs_layers = pytest.importorskip("fairscale.nn.model_parallel.layers")
chat_format = pytest.importorskip("llama_models.llama3.chat_format")

PARAMS = {
    "dim": 64,
    "n_layers": 5,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 96,
    "multiple_of": 32,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
    "vision_chunk_size": 28,
    "vision_max_num_chunks": 4,
    "vision_num_cross_attention_layers": 2,
}
VISION = dict(width=32, layers=5, heads=2, n_global_layers=2, patch_size=14)
INTERMEDIATE = (1, 3, 4)  # block inputs, as Meta's (3, 7, 15, 23, 30) of 32; one is the last block's input
IMG = PARAMS["vocab_size"]  # Meta's model input: <|image|> is the first learnable embedding
ATOL = 1e-4


class TinyVision(nn.Module):
    """Meta's `CrossAttentionTransformerVision` (same forward, same tensor names) at a tiny width: Meta's own
    class fixes ViT-H/14, 32 blocks and intermediate layers 3, 7, 15, 23, 30."""

    forward = meta_mm.CrossAttentionTransformerVision.forward

    def __init__(self, args) -> None:
        super().__init__()
        self.image_res, self.patch_size = args.vision_chunk_size, VISION["patch_size"]
        self.max_num_chunks = args.vision_max_num_chunks
        self.vision_encoder = meta_mm.VisionEncoder(
            max_num_tiles=args.vision_max_num_chunks,
            image_size=args.vision_chunk_size,
            global_model=True,
            return_intermediate=list(INTERMEDIATE),
            **VISION,
        )
        self.vision_input_dim = (1 + len(INTERMEDIATE)) * VISION["width"]
        self.vision_projection = fs_layers.ColumnParallelLinear(
            self.vision_input_dim, args.dim, bias=True, init_method=lambda x: x
        )


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@torch.no_grad()
def _randomize(model: nn.Module) -> None:
    """Every weight drawn (Meta leaves many uninitialised), every gate open, norms away from 1."""
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "gate" in name:
            p.uniform_(0.3, 1.0)
        elif name.endswith("norm.weight") or ".ln_" in name or "_norm." in name:
            p.copy_(1 + 0.1 * torch.randn_like(p))
        elif "vision_encoder.transformer" in name and "c_proj" in name:
            p.copy_(0.5 * torch.randn_like(p))  # each vision block changes its input: the indices matter
        else:
            p.copy_(0.1 * torch.randn_like(p))


@pytest.fixture(scope="module")
def reference(meta_parallel, monkeypatch_module):
    """Meta's tiny model, its state, and its outputs on two rows (1 and 2 images of several aspect ratios)."""
    monkeypatch_module.setattr(meta_mm, "CrossAttentionTransformerVision", TinyVision)
    args = meta_args.ModelArgs(max_seq_len=64, max_batch_size=2, **PARAMS)
    model = meta_mm.CrossAttentionTransformer(args).eval()
    _randomize(model)
    model.setup_cache(2, torch.device("cpu"), torch.float32)
    images = [[random_image(60, 20, 1)], [random_image(25, 25, 2), random_image(30, 70, 3)]]
    rng = torch.Generator().manual_seed(0)
    text = torch.randint(0, PARAMS["vocab_size"], (2, 14), generator=rng)
    text[0, 2] = IMG  # row 0: two tokens before its image (they see none)
    text[1, 0] = text[1, 6] = IMG
    T = text.shape[1]
    masks = [chat_format.create_vision_mask(row.tolist(), IMG) for row in text]
    with torch.no_grad():
        caches, cam, full = model.compute_vision_tokens_masks(images, masks, T, torch.device("cpu"))
        logits = model(torch.arange(T), text, cam, full, caches)
        tiles = [[model.image_transform(im) for im in row] for row in images]
        stacked, _ = meta_mm._stack_images(
            [[t for t, _ in row] for row in tiles], args.vision_max_num_chunks, args.vision_chunk_size, 2
        )
        ar = torch.ones(2, 2, 2, dtype=torch.long)
        for b, row in enumerate(tiles):
            for n, (_, a) in enumerate(row):
                ar[b, n] = torch.tensor(a)
        features = model.vision_model.vision_encoder(stacked, ar)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    yield {
        "model": model,
        "state": state,
        "images": images,
        "tiles": tiles,
        "pixels": stacked,
        "ar": ar,
        "text": text,
        "logits": logits,
        "features": features,
        "caches": caches,
    }


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def write_meta(path, state, shards=1):
    """Save `state` as Meta does: params.json + one consolidated.NN.pth per model-parallel rank."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(PARAMS))
    for r in range(shards):
        part = {}
        for k, v in state.items():
            dim = next((d for s, d in VISION_SPLIT_DIM.items() if k.endswith("." + s)), None)
            part[k] = v.chunk(shards, dim=dim)[r].clone() if dim is not None else v.clone()
        torch.save(part, path / f"consolidated.{r:02d}.pth")
    return path


def mm_media(ref) -> dict[str, torch.Tensor]:
    """Meta's transformed tiles as mm's inputs: (h, w) grid -> aspect-ratio id, real tiles -> mask."""
    B, N, T = ref["pixels"].shape[:3]
    grids = supported_aspect_ratios(T)
    ids = torch.zeros(B, N, dtype=torch.long)
    mask = torch.zeros(B, N, T, dtype=torch.long)
    mask[:, :, 0] = 1
    for b, row in enumerate(ref["tiles"]):
        for n, (tiles, (h, w)) in enumerate(row):
            ids[b, n] = grids.index((h, w)) + 1
            mask[b, n, : tiles.shape[0]] = 1
    return {"pixel_values": ref["pixels"], "aspect_ratio_ids": ids, "aspect_ratio_mask": mask}


def n_tiles(ref) -> list[list[int]]:
    return [[t.shape[0] for t, _ in row] for row in ref["tiles"]]


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_vision_checkpoint_gives_the_reference_features_and_logits(reference, tmp_path, shards):
    ckpt = write_meta(tmp_path / "meta", reference["state"], shards)
    if shards == 2:
        part = torch.load(ckpt / "consolidated.01.pth")
        assert part["vision_model.vision_encoder.transformer.resblocks.0.attn.wo.weight"].shape == (32, 16)
    model = load_meta_vision(ckpt, heads=VISION["heads"], intermediate_layers=INTERMEDIATE)
    assert model.xattn_layers == fusion_schedule(5, 2) == [1, 4]
    media = mm_media(reference)
    # no image (row 0 has one), grids 1x1, 1x3 and 3x1
    assert sorted(set(media["aspect_ratio_ids"].flatten().tolist())) == [0, 1, 3, 7]
    with torch.no_grad():
        feats = model.image_encoder.forward_features(**media)
        cam = cross_attention_mask_from_tokens(reference["text"], IMG, n_tiles(reference), 4)
        logits = model.forward_hf(reference["text"], **media, cross_attention_mask=cam)
    ref = reference["features"]  # (B, N, T, n, (1 + K) D): Meta's final ++ intermediates, same layout
    # real tiles of real images (Meta encodes a batch's missing image as a 1x1 one; no text attends to it)
    real = media["aspect_ratio_mask"].bool() & (media["aspect_ratio_ids"] > 0)[..., None]
    assert (feats[real] - ref[real]).abs().max().item() <= ATOL
    diff = (logits - reference["logits"]).abs().max().item()
    assert diff <= ATOL, diff
    assert reference["logits"].abs().max().item() > 0.5
    with torch.no_grad():  # the images matter: text-only logits are far from these
        bare = model.lm(reference["text"].clamp(max=IMG - 1))
    assert (bare - reference["logits"]).abs().max().item() > 100 * ATOL


def test_transformers5_reading_of_the_indices_is_caught(reference, tmp_path):
    ckpt = write_meta(tmp_path / "meta", reference["state"])
    model = load_meta_vision(
        ckpt, heads=VISION["heads"], intermediate_layers=INTERMEDIATE, intermediate_from="block_output"
    )
    media = mm_media(reference)
    cam = cross_attention_mask_from_tokens(reference["text"], IMG, n_tiles(reference), 4)
    with torch.no_grad():
        logits = model.forward_hf(reference["text"], **media, cross_attention_mask=cam)
    off_by_one = (logits - reference["logits"]).abs().max().item()
    assert off_by_one > 100 * ATOL, off_by_one  # the parity test above fails if the off-by-one comes back


def meta_greedy(reference, n_new: int, last_to_end: bool) -> list[list[int]]:
    """Meta's model decoding greedily with its KV cache, as its generator does: the prompt, then one position
    at a time, the image spans from `create_vision_mask` on the prompt (`last_to_end`: the last span to -1)."""
    meta, text = reference["model"], reference["text"]
    T = text.shape[1]
    total = T + n_new
    masks = [chat_format.create_vision_mask(row.tolist(), IMG) for row in text]
    if last_to_end:
        for row in masks:
            row[-1][1] = -1
    caches, cam, full = meta.compute_vision_tokens_masks(
        reference["images"], masks, total, torch.device("cpu")
    )
    tokens = torch.cat([text, torch.zeros(2, n_new, dtype=torch.long)], dim=1)
    prev = 0
    for cur in range(T, total):
        logits = meta(torch.arange(prev, cur), tokens, cam, full, caches)
        tokens[:, cur] = logits[:, -1].argmax(-1)
        prev = cur
    return tokens[:, T:].tolist()


@torch.no_grad()
def test_greedy_generation_equals_meta(reference, tmp_path):
    """mm's `generate` writes Meta's greedy tokens. One difference, in Meta's generator and not its model: for a
    prompt with several images `create_vision_mask` ends the last image's span at the prompt's end, so the new
    tokens see no image (row 1); with one image (row 0) the span runs to the end (-1). mm lets new tokens see
    the last image in both cases, as training does and as transformers' generate does."""
    n_new = 10
    model = load_meta_vision(
        write_meta(tmp_path / "meta", reference["state"]),
        heads=VISION["heads"],
        intermediate_layers=INTERMEDIATE,
    )
    media = model.encode_media(**mm_media(reference))
    ours = generate(
        model, reference["text"], n_new, stop_tokens=[], model_kwargs={"media": {"image": MediaInput(media)}}
    )
    assert ours == meta_greedy(reference, n_new, last_to_end=True)
    assert len({t for row in ours for t in row}) >= 3  # not one token repeated
    as_generator = meta_greedy(reference, n_new, last_to_end=False)
    assert as_generator[0] == ours[0] and as_generator[1] != ours[1]


def test_a_text_checkpoint_is_pointed_to_load_meta_and_back(reference, tmp_path):
    from mm.lm import load_meta

    ckpt = write_meta(tmp_path / "meta", reference["state"])
    with pytest.raises(ValueError, match="Llama 3.2 Vision checkpoint.*load_meta_vision"):
        load_meta(ckpt)
    params = {k: v for k, v in PARAMS.items() if not k.startswith("vision_")}
    (ckpt / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match="text-only checkpoint.*load_meta"):
        load_meta_vision(ckpt)


@torch.no_grad()
def test_export_of_a_meta_checkpoint_gives_meta_logits_in_transformers(reference, tmp_path):
    """`mm export --format hf-mllama` of a Meta-format directory: transformers 5.x's Mllama computes Meta's
    logits, because the indices are written as transformers 5.x reads them (block outputs: Meta's minus one)."""
    from transformers import MllamaForConditionalGeneration, MllamaImageProcessor

    from mm.app.cli import main

    ckpt = write_meta(tmp_path / "meta", reference["state"], shards=2)
    out = tmp_path / "hf"
    argv = ["export", "--checkpoint", str(ckpt), "--format", "hf-mllama", "--out", str(out)]
    assert main([*argv, "--vision-heads", "2", "--intermediate-layers", "1,3,4"]) == 0
    vision = json.loads((out / "config.json").read_text())["vision_config"]
    assert vision["intermediate_layers_indices"] == [0, 2, 3]
    assert vision["intermediate_from"] == "block_output"
    hf = MllamaForConditionalGeneration.from_pretrained(out).eval()
    media = mm_media(reference)
    cam = cross_attention_mask_from_tokens(reference["text"], IMG, n_tiles(reference), 4)
    logits = hf(input_ids=reference["text"], **media, cross_attention_mask=cam).logits
    # row 1 (its first token is an image; row 0's first tokens see none, where transformers departs from Meta)
    diff = (logits[1] - reference["logits"][1]).abs().max().item()
    assert diff <= ATOL, diff
    processor = MllamaImageProcessor.from_pretrained(out)
    assert processor.max_image_tiles == 4 and processor.size == {"height": 28, "width": 28}
    # mm reads its export back as the same model
    again = load_hf_mllama(out)
    assert again.image_encoder.cfg.intermediate_layers == (0, 2, 3)
    torch.testing.assert_close(
        again.forward_hf(reference["text"], **media, cross_attention_mask=cam)[1], logits[1]
    )
