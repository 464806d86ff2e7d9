"""Llama 3.2 Vision checkpoints (mm.formats.hf_mllama): tiny random `MllamaForConditionalGeneration` models built and saved
by transformers load into `MultimodalLM` with float32 logits parity (all-ones masks, and processor-built masks
with `hf_row_compat`), the default differs only through rows that see no image, greedy generation equals
transformers', `save_hf_mllama` round-trips, bad checkpoints are refused with the key named, and `mm train`
keeps training such a checkpoint with the LM bit-identical."""

import json
import shutil
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
    load_hf_mllama_lm,
    load_hf_mllama_transform,
    mllama_image_inputs,
    xattn_layers_from_mllama,
    xattn_layers_to_mllama,
)
from mm.lm import generate
from mm.models.media import MediaInput
from mm.training.freeze import fingerprint

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


def bad_copy(ckpt, tmp_path, edit_config=None, edit_tensors=None, edit_preprocessor=None) -> Path:
    path = tmp_path / "bad"
    shutil.copytree(ckpt["path"], path)
    for name, edit in (("config.json", edit_config), ("preprocessor_config.json", edit_preprocessor)):
        if edit is not None:
            d = json.loads((path / name).read_text())
            edit(d)
            (path / name).write_text(json.dumps(d))
    if edit_tensors is not None:
        sd = load_file(str(path / "model.safetensors"))
        edit_tensors(sd)
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


XK = "language_model.model.layers.4.cross_attn.k_norm.weight"
FC1 = "vision_model.transformer.layers.1.mlp.fc1.weight"
BAD_INPUTS = {
    "missing tensor": (
        dict(edit_tensors=lambda sd: sd.pop(XK)),
        rf"tensor '{XK}' is missing; expected shape \(16,\)",
    ),
    "mis-shaped tensor": (
        dict(edit_tensors=lambda sd: sd.__setitem__(FC1, torch.zeros(65, 32))),
        rf"tensor '{FC1}' has shape \(65, 32\), expected \(64, 32\)",
    ),
    "unexpected tensor": (
        dict(edit_tensors=lambda sd: sd.__setitem__("vision_model.extra.weight", torch.zeros(2))),
        r"unexpected tensor 'vision_model\.extra\.weight'",
    ),
    "aspect-ratio list": (
        dict(
            edit_config=lambda d: d["vision_config"].__setitem__(
                "supported_aspect_ratios", [[1, 1], [2, 1], [1, 2]]
            )
        ),
        r"supported_aspect_ratios: found \[\[1, 1\], \[2, 1\], \[1, 2\]\], expected \[\[1, 1\], \[1, 2\], \[1, 3\]",
    ),
    "max_num_tiles 0": (
        dict(edit_config=lambda d: d["vision_config"].__setitem__("max_num_tiles", 0)),
        r"vision_config\.max_num_tiles: found 0, expected an int >= 1",
    ),
    "max_num_tiles with another grid list": (
        dict(edit_config=lambda d: d["vision_config"].__setitem__("max_num_tiles", 2)),
        r"supported_aspect_ratios: found \[\[1, 1\], .*\[4, 1\]\], expected \[\[1, 1\], \[1, 2\], \[2, 1\]\] .*max_num_tiles=2",
    ),
    "vision output vs projector": (
        dict(edit_config=lambda d: d["vision_config"].__setitem__("vision_output_dim", 64)),
        r"vision_config\.vision_output_dim: found 64, expected 96",
    ),
    "text width vs projector": (
        dict(edit_config=lambda d: d["text_config"].__setitem__("hidden_size", 32)),
        r"tensor '.*' has shape \(\d+, 64\), expected \(\d+, 32\)",
    ),
    "image token outside the vocabulary": (
        dict(edit_config=lambda d: d.__setitem__("image_token_index", VOCAB + 8)),
        rf"image_token_index: found {VOCAB + 8}, expected an id in \[0, {VOCAB + 8}\)",
    ),
    "adjacent cross-attention layers": (
        dict(edit_config=lambda d: d["text_config"].__setitem__("cross_attention_layers", [1, 2])),
        r"text_config\.cross_attention_layers: found \[1, 2\], expected",
    ),
    "processor tiles vs vision tiles": (
        dict(edit_preprocessor=lambda d: d.__setitem__("max_image_tiles", 2)),
        r"max_image_tiles: found 2, expected 4",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_checkpoints_are_refused_naming_key_found_and_expected(ckpt, tmp_path, case):
    edits, message = BAD_INPUTS[case]
    path = bad_copy(ckpt, tmp_path, **edits)
    with pytest.raises(MllamaCheckpointError, match=message) as e:
        load_hf_mllama(path)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda sd: sd.pop("norm.weight"), r"no tensor maps to model key 'lm\.norm\.weight' \(1 such keys\)"),
        (
            lambda sd: sd.__setitem__("layers.0.extra.weight", torch.zeros(2)),
            r"tensor mapped to 'lm\.layers\.0\.extra\.weight' \(1 such tensors\) has no place",
        ),
    ],
    ids=["tensor the model needs", "tensor the model lacks"],
)
def test_weights_that_do_not_fill_the_model_are_refused_with_a_message(ckpt, monkeypatch, edit, message):
    """The last check of `load_hf_mllama` (mapped weights vs the model's keys) is a ValueError naming the weights
    file, the key and config.json, never a bare assert (which `python -O` would also skip)."""
    import mm.formats.hf_mllama.load as mllama

    real = mllama._lm_state_from_mllama

    def mapped_wrongly(hf, spec):
        sd = real(hf, spec)
        edit(sd)
        return sd

    monkeypatch.setattr(mllama, "_lm_state_from_mllama", mapped_wrongly)
    with pytest.raises(MllamaCheckpointError, match=message) as e:
        load_hf_mllama(ckpt["path"])
    text = str(e.value)
    assert text.startswith(str(ckpt["path"] / "model.safetensors") + ":")
    assert str(ckpt["path"] / "config.json") in text and isinstance(e.value, ValueError)


def test_mm_train_continues_a_mllama_checkpoint_with_the_lm_frozen(corpus, tmp_path, capsys):
    from mm.app.cli import main
    from mm.formats.bundle import verify_frozen
    from mm.lm import Tokenizer
    from mm.stages.image_model import load_image_bundle
    from mm.training.checkpoint import list_checkpoints, load_checkpoint
    from mm.world import synth_shapes

    tok = Tokenizer.from_file(corpus["tokenizer"])
    vocab = tok.vocab_size - 8  # as Llama 3.2: <|image|> is one of the 8 ids after the LM's vocabulary
    assert tok.image_id >= vocab and max(tok.bos_id, tok.eos_id, tok.pad_id) < vocab
    ckpt = tmp_path / "llama-3.2-vision-tiny"
    save_tiny_mllama(
        ckpt, vocab=vocab, image_token=tok.image_id, token_ids=(tok.bos_id, tok.eos_id, tok.pad_id)
    )
    tok.save(ckpt)
    files = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    fp = fingerprint(load_hf_mllama_lm(ckpt))
    before = load_hf_mllama(ckpt).adapter_state()
    train = synth_shapes(tmp_path, n=8, seed=0, split="train")
    heldout = synth_shapes(tmp_path, n=2, seed=0, split="heldout")
    yaml = tmp_path / "continue.yaml"
    yaml.write_text(
        "stage: image-pretrain\n"
        f"init_from_hf_mllama: {ckpt}\n"
        "data: {tile_size: 32, max_tiles: 2}\n"
        "optim: {lr: 1.0e-2, warmup_steps: 1}\n"
        "train: {batch_size: 2, save_every: 3, peak_flops: 1.0e9}\n"
        "eval_samples: 2\n"
    )
    out = tmp_path / "run"
    argv = ["train", "--config", str(yaml), "--data", str(train), "--out", str(out), "--max-steps", "3"]
    assert main([*argv, f"data.heldout=[{heldout}]"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 3 and "eval" in summary

    # The LM is bit-identical: its fingerprint at start, at end and now; the checkpoint directory is untouched.
    s = json.loads((out / "summary.json").read_text())
    assert s["lm_fingerprint_start"] == s["lm_fingerprint_end"] == fp == fingerprint(load_hf_mllama_lm(ckpt))
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == files
    assert verify_frozen(out / "final")[0]
    # Vision, cross-attention and the extra token embeddings trained; no LM tensor in any checkpoint.
    ck = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])["model"]
    assert {k.split(".")[0] for k in ck} == {"image_encoder", "image_xattn", "extra_tok_embeddings"}
    for part in (
        "image_encoder.project.weight",
        "image_xattn.1.attention.wq.weight",
        "extra_tok_embeddings.weight",
    ):
        assert not torch.equal(ck[part], before[part]), part

    # The trained bundle reloads and exports to a directory transformers loads with equal logits.
    model, _, transform, meta = load_image_bundle(out / "final")
    assert meta["lm_format"] == "hf_mllama" and model.xattn_layers == [1, 3]
    assert transform.max_tiles == 2 and transform.id_grids == load_hf_mllama_transform(ckpt).grids
    _assert_hf_mllama_export_equals(out / "final", ckpt, tmp_path / "export", tok, model, meta)


def _assert_hf_mllama_export_equals(final, ckpt, export_dir, tok, model, meta):
    """`mm export --format hf-mllama` of the trained bundle `final`: transformers loads the directory, its image
    processor and tokenizer, and gives the logits of the reloaded bundle `model`."""
    from transformers import MllamaForConditionalGeneration, MllamaImageProcessor, PreTrainedTokenizerFast

    from mm.app.cli import main

    # `mm export --format hf-mllama`: the directory, its image processor and tokenizer load in transformers
    export = [
        "export",
        "--checkpoint",
        str(final),
        "--format",
        "hf-mllama",
        "--out",
        str(export_dir),
    ]
    assert main(export) == 0
    hf = MllamaForConditionalGeneration.from_pretrained(export_dir).eval()
    assert MllamaImageProcessor.from_pretrained(export_dir).max_image_tiles == 4  # the encoder's
    assert PreTrainedTokenizerFast(tokenizer_file=str(export_dir / "tokenizer.json")).encode(
        "a red circle", add_special_tokens=False
    ) == tok.encode("a red circle")
    assert hf.config.text_config.eos_token_id == tok.eos_id
    inputs = mllama_image_inputs(load_hf_mllama_transform(ckpt), [[random_image(70, 40, seed=0)]])
    ids = torch.tensor([[tok.image_id, tok.bos_id, *tok.encode("a red circle")]])  # every token sees it
    cam = cross_attention_mask_from_tokens(ids, tok.image_id, inputs.pop("num_tiles"), 4)
    with torch.no_grad():
        ref = hf(input_ids=ids, **inputs, cross_attention_mask=torch.ones_like(cam)).logits
        out_logits = model.forward_hf(ids, **inputs, cross_attention_mask=torch.ones_like(cam))
        ref_cam = hf(input_ids=ids, **inputs, cross_attention_mask=cam).logits
        out_cam = model.forward_hf(ids, **inputs, cross_attention_mask=cam)
    torch.testing.assert_close(out_logits, ref, rtol=0, atol=ATOL)
    assert not meta["xattn"]["hf_row_compat"]  # mm's default row rule: equal when every row sees the image
    torch.testing.assert_close(out_cam, ref_cam, rtol=0, atol=ATOL)


def test_an_exported_image_stage_captions_in_transformers_as_mm_caption(corpus, tmp_path, capsys):
    """A stage trained with transformers' row rule (`xattn.hf_row_compat: true`) and exported with `mm export`:
    transformers' greedy `generate` writes the captions `mm caption` writes, token for token."""
    from transformers import MllamaForConditionalGeneration, MllamaImageProcessor
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    from mm.app.cli import main
    from mm.datasets.collate import ImageCaptionCollator
    from mm.formats.bundle import read_config
    from mm.lm import Tokenizer
    from mm.models.caption import load_rgb
    from mm.world import synth_shapes

    tok = Tokenizer.from_file(corpus["tokenizer"])
    ckpt = tmp_path / "mllama"
    save_tiny_mllama(
        ckpt,
        vocab=tok.vocab_size - 8,
        image_token=tok.image_id,
        token_ids=(tok.bos_id, tok.eos_id, tok.pad_id),
    )
    tok.save(ckpt)
    (tmp_path / "c.yaml").write_text(
        f"stage: image-pretrain\ninit_from_hf_mllama: {ckpt}\ndata: {{tile_size: 32, max_tiles: 4}}\n"
        "optim: {lr: 3.0e-3, warmup_steps: 2}\ntrain: {batch_size: 4, save_every: 100, peak_flops: 1.0e9}\neval_samples: 0\n"
        # transformers' rule for the <|begin_of_text|> row before the image; the encoder's whole tile budget
        # (Mllama's vision attention depends on how many padding tiles a batch carries: the stage's transform
        # and the export's image processor must pad to the same count)
        "xattn: {hf_row_compat: true}\n"
    )
    train = synth_shapes(tmp_path, n=32, seed=0, split="train")
    run = [
        "train",
        "--config",
        str(tmp_path / "c.yaml"),
        "--data",
        str(train),
        "--out",
        str(tmp_path / "run"),
    ]
    assert main([*run, "--max-steps", "40"]) == 0  # confident enough that float noise flips no argmax
    final, export = tmp_path / "run" / "final", tmp_path / "export"
    assert main(["export", "--checkpoint", str(final), "--format", "hf-mllama", "--out", str(export)]) == 0
    paths = []
    for s in range(4):
        paths.append(tmp_path / f"im{s}.png")
        random_image((30, 60, 90, 45)[s], (30, 30, 40, 100)[s], seed=s).save(paths[-1])
    capsys.readouterr()
    assert main(["caption", "--checkpoint", str(final), *map(str, paths)]) == 0
    ours = capsys.readouterr().out.splitlines()

    hf = MllamaForConditionalGeneration.from_pretrained(export).eval()
    proc = MllamaImageProcessor.from_pretrained(export)
    meta = read_config(final)
    prefix = ImageCaptionCollator(tok, meta["prompt"], max_tiles=meta["max_tiles"]).prefix
    stops = [tok.eos_id, tok.eot_id]
    theirs = []
    for p in paths:
        px = proc(images=[[load_rgb(p)]], return_tensors="pt")
        ids = torch.tensor([prefix])
        sparse = [get_cross_attention_token_mask(prefix, tok.image_id)]
        cam = convert_sparse_cross_attention_mask_to_dense(
            sparse, px["num_tiles"], proc.max_image_tiles, len(prefix)
        )
        media = {k: px[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
        with torch.no_grad():
            new = hf.generate(
                input_ids=ids, **media, cross_attention_mask=torch.tensor(cam), max_new_tokens=24,
                do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_id,
            )[0, len(prefix) :].tolist()  # fmt: skip
        cut = next((i for i, t in enumerate(new) if t in stops), len(new))
        theirs.append(" ".join(tok.decode(new[:cut]).strip().splitlines()))
    assert ours == theirs
    # whole captions (several tokens, then the end token in both), images of 1 and 2 tiles
    assert len(ours) == 4 and all(len(c.split()) >= 3 for c in ours), ours
