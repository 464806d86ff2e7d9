"""`mm train` keeps training a Llama 3.2 Vision checkpoint (the tiny random Mllama models of `test_mllama.py`)
with the LM bit-identical, `mm export --format hf-mllama` gives a directory transformers loads with the same
logits, and transformers' greedy generation on an exported image stage writes the captions `mm caption` writes."""

import json

import torch

from mm import load_hf_mllama
from mm.datasets.collate import cross_attention_mask_from_tokens
from mm.formats.hf_mllama import load_hf_mllama_lm, load_hf_mllama_transform, mllama_image_inputs
from mm.training.freeze import fingerprint
from tests.mm.test_mllama import ATOL, random_image, save_tiny_mllama


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
