"""Llama 3.2 Vision checkpoints (mm.formats.hf_mllama): tiny random `MllamaForConditionalGeneration` models built and saved
by transformers load into `MultimodalLM` with float32 logits parity (all-ones masks, and processor-built masks
with `hf_row_compat`), the default differs only through rows that see no image, greedy generation equals
transformers', `save_hf_mllama` round-trips, bad checkpoints are refused with the key named, and `mm train`
keeps training such a checkpoint with the LM bit-identical."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mm import load_hf_mllama, save_hf_mllama
from mm.datasets.collate import cross_attention_mask_from_tokens
from mm.datasets.tiling import CLIP_MEAN, CLIP_STD
from mm.formats.hf_mllama import (
    MllamaCheckpointError,
    load_hf_mllama_transform,
    mllama_image_inputs,
    xattn_layers_from_mllama,
    xattn_layers_to_mllama,
)
from mm.lm import generate
from mm.models.media import MediaInput

VOCAB = 120
IMG = VOCAB  # <|image|>: the first of the 8 extra tokens, as in Llama 3.2 Vision (128256 = vocab_size)
BOS, EOS, PAD = 1, 2, 0
TILE = 32
ATOL = 1e-4
HF5 = {"intermediate_from": "block_output"}  # transformers 5.x's reading of the vision indices


def tiny_config(
    vocab: int = VOCAB, image_token: int = IMG, token_ids: tuple[int, int, int] = (BOS, EOS, PAD)
):
    from transformers import MllamaConfig

    bos, eos, pad = token_ids
    return MllamaConfig(
        vision_config=dict(
            hidden_size=32, num_hidden_layers=3, num_global_layers=2, attention_heads=2, intermediate_size=64,
            image_size=TILE, patch_size=8, max_num_tiles=4, intermediate_layers_indices=[2, 1],
            vision_output_dim=96,
        ),
        text_config=dict(
            vocab_size=vocab, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, cross_attention_layers=[1, 4], max_position_embeddings=128, rms_norm_eps=1e-5,
            rope_parameters=dict(
                rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
            bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        ),
        image_token_index=image_token,
    )  # fmt: skip


@torch.no_grad()
def save_tiny_mllama(path: Path, seed: int = 0, **kw) -> torch.nn.Module:
    """A random tiny Mllama with every gate and norm moved off its init, saved by transformers (+ processor)."""
    from transformers import MllamaForConditionalGeneration
    from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor

    torch.manual_seed(seed)
    hf = MllamaForConditionalGeneration(tiny_config(**kw)).eval()
    for name, p in hf.named_parameters():
        if "gate" in name:  # cross-attention gates start at 0 in transformers: open them so they matter
            p.uniform_(-1.0, 1.0)
        elif "norm" in name:
            p.add_(0.1 * torch.randn_like(p))
        elif "cross_attn.o_proj" in name or "multi_modal_projector" in name:
            p.mul_(5.0)  # images move the logits well above the tolerance
        elif "vision_model.transformer.layers" in name and name.endswith("fc2.weight"):
            p.mul_(20.0)  # each vision block changes its input well beyond the tolerance (the indices matter)
    hf.save_pretrained(path)
    MllamaImageProcessor(
        size={"height": TILE, "width": TILE},
        max_image_tiles=4,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    ).save_pretrained(path)
    return hf


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest on a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("mllama") / "tiny"
    hf = save_tiny_mllama(path)
    return {"path": path, "hf": hf}


@pytest.fixture(scope="module")
def batch(ckpt):
    """Three rows with 2, 1 and 3 images of several aspect ratios; row 1 has text before its image."""
    from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    sizes = [[(64, 32), (32, 96)], [(50, 50)], [(20, 20), (120, 30), (32, 64)]]  # (width, height)
    images = [
        [random_image(w, h, seed=10 * r + k) for k, (w, h) in enumerate(row)] for r, row in enumerate(sizes)
    ]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 14), generator=g)
    # As MllamaProcessor: a prompt starting with <|image|> keeps it before <|begin_of_text|>.
    ids[0, :2], ids[0, 6] = torch.tensor([IMG, BOS]), IMG  # every token of row 0 sees an image
    ids[1, 0], ids[1, 4] = BOS, IMG  # tokens 0..3 of row 1 see no image
    ids[2, :3], ids[2, 8] = torch.tensor([IMG, IMG, BOS]), IMG  # consecutive images share their range
    proc = MllamaImageProcessor.from_pretrained(ckpt["path"])(images=images, return_tensors="pt")
    sparse = [get_cross_attention_token_mask(row.tolist(), IMG) for row in ids]
    cam = convert_sparse_cross_attention_mask_to_dense(sparse, proc["num_tiles"], 4, ids.shape[1])
    media = {k: proc[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    return {
        "images": images,
        "ids": ids,
        "media": media,
        "num_tiles": proc["num_tiles"],
        "cam": torch.tensor(cam),
    }


@torch.no_grad()
def hf_logits(hf, batch, cam):
    return hf(input_ids=batch["ids"], **batch["media"], cross_attention_mask=cam).logits


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def test_layer_placement_maps_mllama_text_layers_to_lm_layers():
    # Llama 3.2 11B Vision: 40 text layers, cross-attention at [3, 8, ..., 38] = before LM layers 3, 7, ..., 31.
    assert xattn_layers_from_mllama([3, 8, 13, 18, 23, 28, 33, 38], 40) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert xattn_layers_to_mllama([3, 7, 11, 15, 19, 23, 27, 31]) == [3, 8, 13, 18, 23, 28, 33, 38]
    assert xattn_layers_from_mllama([1, 4], 6) == [1, 3]
    for bad in ([1, 2], [5], [4, 1], [-1]):
        with pytest.raises(MllamaCheckpointError, match=r"cross_attention_layers: found .* expected"):
            xattn_layers_from_mllama(bad, 6)


def test_extra_token_embeddings_and_explicit_placement():
    from mm.lm import Transformer, preset
    from mm.models.multimodal import MultimodalLM

    lm = Transformer(preset("nano", n_layers=4)).eval()
    V = lm.cfg.vocab_size
    m = MultimodalLM(lm, None, xattn_layers=[3, 0], extra_tokens=8, trainable=("extra_tok_embeddings",))
    assert m.xattn_layers == [0, 3] and sorted(m.image_xattn) == ["0", "3"] and m.input_vocab_size == V + 8
    tokens = torch.tensor([[5, V, V + 7, 6]])
    h = m.embed(tokens)
    assert torch.equal(h[0, 0], lm.tok_embeddings.weight[5]) and torch.equal(
        h[0, 2], m.extra_tok_embeddings.weight[7]
    )
    assert m(tokens).shape == (1, 4, V)  # logits over the LM's vocabulary only
    assert [n for n, _ in m.trainable_named_parameters()] == ["extra_tok_embeddings.weight"]
    with pytest.raises(ValueError, match=rf"token id {V + 8} is outside \[0, {V + 8}\)"):
        m.embed(torch.tensor([[V + 8]]))
    with pytest.raises(ValueError, match=r"expected distinct LM layer indices in \[0, 4\)"):
        MultimodalLM(lm, None, xattn_layers=[1, 4])


def test_transform_from_preprocessor_config_equals_mllama_image_processor(ckpt, batch):
    transform = load_hf_mllama_transform(ckpt["path"])
    ours = mllama_image_inputs(transform, batch["images"])
    assert ours["num_tiles"] == batch["num_tiles"] == [[2, 3], [4], [1, 4, 2]]
    assert torch.equal(ours["aspect_ratio_ids"], batch["media"]["aspect_ratio_ids"])
    assert len(set(ours["aspect_ratio_ids"].flatten().tolist()) - {0}) >= 4  # several aspect ratios
    assert torch.equal(ours["aspect_ratio_mask"], batch["media"]["aspect_ratio_mask"])
    torch.testing.assert_close(ours["pixel_values"], batch["media"]["pixel_values"], rtol=0, atol=1e-6)
    # The processor's cross-attention mask rule equals ours (datasets.collate).
    ours_cam = cross_attention_mask_from_tokens(batch["ids"], IMG, batch["num_tiles"], 4)
    assert torch.equal(ours_cam[:, :, : batch["cam"].shape[2]], batch["cam"])


def test_logits_equal_transformers_with_all_ones_mask(ckpt, batch):
    ones = torch.ones_like(batch["cam"])
    ref = hf_logits(ckpt["hf"], batch, ones)
    assert ref.shape == (3, 14, VOCAB)
    for compat in (False, True):  # no row is masked out: both row treatments agree with transformers
        model = load_hf_mllama(ckpt["path"], hf_row_compat=compat, **HF5)
        with torch.no_grad():
            out = model.forward_hf(batch["ids"], **batch["media"], cross_attention_mask=ones)
        torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    assert max_diff(out, ref) < ATOL


def test_logits_equal_transformers_with_processor_masks_and_hf_row_compat(ckpt, batch):
    ref = hf_logits(ckpt["hf"], batch, batch["cam"])
    model = load_hf_mllama(ckpt["path"], hf_row_compat=True, **HF5)
    with torch.no_grad():
        out = model.forward_hf(batch["ids"], **batch["media"], cross_attention_mask=batch["cam"])
        derived = model.forward_hf(batch["ids"], **batch["media"])  # mask from the <|image|> tokens
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    assert torch.equal(derived, out)
    # The images matter: text-only logits are far from these.
    with torch.no_grad():
        text_only = model.forward_hf(batch["ids"])
    assert max_diff(text_only, ref) > 0.1


def test_default_reads_the_vision_indices_as_meta_block_inputs(ckpt, batch, tmp_path):
    """mm reads [2, 1] as the inputs of blocks 2 and 1 (Meta's reference); transformers 5.x computes that only
    with [1, 0], the outputs of the blocks before them."""
    from transformers import MllamaForConditionalGeneration

    model = load_hf_mllama(ckpt["path"], hf_row_compat=True)
    assert model.image_encoder.cfg.intermediate_from == "block_input"
    cam = batch["cam"]
    with torch.no_grad():
        ours = model.forward_hf(batch["ids"], **batch["media"], cross_attention_mask=cam)
    ckpt["hf"].save_pretrained(tmp_path / "shifted")
    config = json.loads((tmp_path / "shifted" / "config.json").read_text())
    config["vision_config"]["intermediate_layers_indices"] = [1, 0]
    (tmp_path / "shifted" / "config.json").write_text(json.dumps(config))
    shifted = MllamaForConditionalGeneration.from_pretrained(tmp_path / "shifted").eval()
    torch.testing.assert_close(ours, hf_logits(shifted, batch, cam), rtol=0, atol=ATOL)
    off_by_one = max_diff(ours, hf_logits(ckpt["hf"], batch, cam))  # transformers 5.x, released indices
    assert off_by_one > 100 * ATOL, off_by_one


def test_default_differs_from_transformers_only_through_rows_that_see_no_image(ckpt, batch):
    ref = hf_logits(ckpt["hf"], batch, batch["cam"])
    model = load_hf_mllama(ckpt["path"], **HF5)  # Meta's row rule: no cross-attention output for those rows
    with torch.no_grad():
        out = model.forward_hf(batch["ids"], **batch["media"], cross_attention_mask=batch["cam"])
        bare = model.lm(batch["ids"][1:2, :4])  # row 1's tokens before its image, text only
    sees = batch["cam"].flatten(2).any(-1)  # (B, T)
    assert sees[[0, 2]].all() and not sees[1, :4].any() and sees[1, 4:].all()
    torch.testing.assert_close(out[[0, 2]], ref[[0, 2]], rtol=0, atol=ATOL)  # rows that all see an image
    # Rows that see no image equal the text-only LM (zero cross-attention output); transformers' do not.
    torch.testing.assert_close(out[1, :4], bare[0], rtol=0, atol=1e-5)
    assert max_diff(out[1, :4], ref[1, :4]) > 10 * ATOL
    assert max_diff(ref[1, :4], bare[0]) > 10 * ATOL


def test_greedy_generation_equals_transformers_generate(ckpt, batch):
    n_new = 8
    with torch.no_grad():
        ref = ckpt["hf"].generate(
            input_ids=batch["ids"], **batch["media"], cross_attention_mask=batch["cam"], max_new_tokens=n_new,
            do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
        )[:, batch["ids"].shape[1] :].tolist()  # fmt: skip
    ref = [row[: row.index(EOS)] if EOS in row else row for row in ref]
    model = load_hf_mllama(ckpt["path"], hf_row_compat=True, **HF5)
    media = model.encode_media(**batch["media"])  # K/V computed once; masks from the <|image|> tokens
    ours = generate(
        model, batch["ids"], n_new, stop_tokens=[EOS], model_kwargs={"media": {"image": MediaInput(media)}}
    )
    assert ours == ref
    assert sum(len(r) for r in ref) >= 2 * n_new and len({t for r in ref for t in r}) > 2


def test_save_hf_mllama_round_trip_loads_in_transformers(ckpt, batch, tmp_path):
    from transformers import MllamaForConditionalGeneration
    from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor

    model = load_hf_mllama(ckpt["path"], hf_row_compat=True, **HF5)
    transform = load_hf_mllama_transform(ckpt["path"])
    ids = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}
    save_hf_mllama(model, tmp_path / "same", token_ids=ids, transform=transform)
    same = MllamaForConditionalGeneration.from_pretrained(tmp_path / "same").eval()
    original = ckpt["hf"].state_dict()
    assert same.state_dict().keys() == original.keys()
    for k, v in same.state_dict().items():  # every tensor back bit for bit (q/k permutation undone exactly)
        assert torch.equal(v, original[k]), k
    assert same.config.text_config.cross_attention_layers == [1, 4]
    assert same.config.text_config.rope_parameters["rope_type"] == "llama3"
    hf_proc = MllamaImageProcessor.from_pretrained(tmp_path / "same")(
        images=batch["images"], return_tensors="pt"
    )
    assert torch.equal(hf_proc["pixel_values"], batch["media"]["pixel_values"])

    with torch.no_grad():  # as after training: every non-LM tensor changed
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    save_hf_mllama(model, tmp_path / "trained", token_ids=ids)
    hf = MllamaForConditionalGeneration.from_pretrained(tmp_path / "trained").eval()
    for cam in (torch.ones_like(batch["cam"]), batch["cam"]):
        with torch.no_grad():
            out = model.forward_hf(batch["ids"], **batch["media"], cross_attention_mask=cam)
        ref = hf_logits(hf, batch, cam)
        torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
        assert max_diff(ref, hf_logits(ckpt["hf"], batch, cam)) > 1e-2  # the change did reach transformers
    again = load_hf_mllama(tmp_path / "trained", hf_row_compat=True)
    for k, v in again.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    # Shards + index (as the released checkpoints), and transformers' in-memory names, load the same.
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    renamed = {
        k.replace("language_model.model.", "model.language_model.").replace(
            "language_model.lm_head.", "lm_head."
        ): v
        for k, v in load_file(str(tmp_path / "trained" / "model.safetensors")).items()
    }
    save_file(renamed, str(tmp_path / "trained" / "model.safetensors"))
    for path in (tmp_path / "sharded", tmp_path / "trained"):
        for k, v in load_hf_mllama(path).state_dict().items():
            assert torch.equal(v, model.state_dict()[k]), (path.name, k)
