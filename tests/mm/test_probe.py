"""`mm probe`: the attention-pooling probe reads a label that some token carries (and only the real tokens),
stays at chance on noise; the cross-attention contribution is exactly zero with the gates at zero; the word
positions and labels of teacher-forced captions are right; the CLI writes its table and JSON, deterministically."""

import json

import pytest
import torch

from mm.app.probe import (
    IGNORE,
    N_CLASSES,
    TARGETS,
    XAttnTap,
    caption_accuracies,
    caption_targets,
    collect,
    pooled_probe_accuracy,
    score,
    word_spans,
    xattn_probe_accuracy,
)
from mm.encoders.image import ImageEncoder, ImageEncoderConfig
from mm.formats.bundle import dataclass_dict, save_bundle
from mm.lm import Tokenizer, Transformer, load_hf, preset, save_hf
from mm.models.caption import load_rgb
from mm.models.multimodal import MediaInput, MultimodalLM
from mm.prompts import IMAGE_PROMPT
from mm.training.freeze import fingerprint, freeze
from mm.world import synth_shapes


def test_caption_targets_and_order_scoring():
    y = caption_targets("a large red circle and a small blue square")
    # size large=1, red=0, circle=0 | small=0, blue=2, square=1 | two objects | order scored
    assert y == [1, 0, 0, 0, 2, 1, 1, 1]
    assert caption_targets("a small purple triangle") == [0, 4, 2, IGNORE, IGNORE, IGNORE, 0, IGNORE]
    assert caption_targets("a small red circle and a large red square")[7] == IGNORE  # one colour: no order
    with pytest.raises(ValueError, match="not a caption"):
        caption_targets("there is a red circle.")
    labels = torch.tensor([y, y, y, caption_targets("a small purple triangle")])
    pred = labels.clone()
    pred[1, [1, 4]] = torch.tensor([2, 0])  # colours swapped: the set is right, the order wrong
    pred[2, 4] = 5  # colour 2 wrong: order not scored
    acc, n = score(pred, labels)
    assert n["order"] == 2 and acc["order"] == 0.5
    assert n["colour_2"] == 3 and acc["colour_2"] == pytest.approx(1 / 3) and acc["size_1"] == 1.0


def _token_sets(n: int, gen: torch.Generator, carry: bool):
    """n sets of 12 tokens (some padding). With `carry`, one marked real token holds colour_1 one-hot;
    unmarked distractors hold random one-hots (mean pooling alone is unreliable) and the padding tokens
    carry a marked wrong label (a probe that looked at padding would fail)."""
    M, Fdim = 12, 16
    y = torch.stack([torch.randint(0, c, (n,), generator=gen) for c in N_CLASSES], dim=1)
    y = torch.cat([y, torch.ones(n, len(TARGETS) - y.shape[1], dtype=torch.long)], dim=1)  # order scored
    x = torch.randn(n, M, Fdim, generator=gen) * 0.5
    lengths = torch.randint(4, M + 1, (n,), generator=gen)
    mask = torch.arange(M)[None, :] < lengths[:, None]
    if carry:
        for i in range(n):
            L = int(lengths[i])
            pos = int(torch.randint(0, L, (1,), generator=gen))
            for j in range(M):
                if j >= L:  # padding: marked, wrong class
                    x[i, j, 0] += 4.0
                    x[i, j, 1 + (int(y[i, 1]) + 1) % 6] += 3.0
                elif j == pos:
                    x[i, j, 0] += 4.0
                    x[i, j, 1 + int(y[i, 1])] += 3.0
                else:
                    x[i, j, 1 + int(torch.randint(0, 6, (1,), generator=gen))] += 3.0
    return x, mask, y


def test_attention_pool_probe_reads_a_carried_label_and_stays_at_chance_on_noise():
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    train, test = _token_sets(600, gen, True), _token_sets(200, gen, True)
    res = pooled_probe_accuracy(train, test, steps=300, seed=0)
    acc = res.accuracy
    assert acc["colour_1"] > 0.9 and res.train_accuracy["colour_1"] > 0.9, acc
    # Targets the features do not carry stay near chance (1/2, 1/3; 200 held-out sets).
    assert acc["size_1"] < 0.5 + 0.15 and acc["shape_1"] < 1 / 3 + 0.15, acc
    noise_train, noise_test = _token_sets(600, gen, False), _token_sets(200, gen, False)
    noise = pooled_probe_accuracy(noise_train, noise_test, steps=300, seed=0).accuracy
    assert noise["colour_1"] < 1 / 6 + 0.12, noise
    again = pooled_probe_accuracy(train, test, steps=300, seed=0).accuracy
    assert again == acc  # seeded: the same numbers


def test_xattn_linear_probe_reads_encoded_words_and_nothing_from_zeros():
    gen = torch.Generator().manual_seed(1)

    def words(n: int, encode: bool):
        y = torch.stack([torch.randint(0, c, (n,), generator=gen) for c in N_CLASSES], dim=1)
        y = torch.cat([y, torch.ones(n, 1, dtype=torch.long)], dim=1)
        x = torch.randn(n, len(TARGETS), 12, generator=gen) if encode else torch.zeros(n, len(TARGETS), 12)
        if encode:  # each word's vector carries its class along one of the first 6 axes
            for k in range(len(N_CLASSES)):
                x[torch.arange(n), k, y[:, k]] += 4.0
        return x, y

    res = xattn_probe_accuracy(words(400, True), words(200, True), steps=200, seed=0)
    assert all(res.accuracy[t] > 0.9 for t in TARGETS[:7]), res.accuracy
    assert res.n["order"] > 0 and res.accuracy["order"] > 0.9
    zero = xattn_probe_accuracy(words(400, False), words(200, False), steps=200, seed=0)
    assert zero.accuracy["colour_1"] < 1 / 6 + 0.1 and zero.accuracy["size_1"] < 0.5 + 0.1, zero.accuracy


def test_caption_accuracies_by_slot():
    r = caption_accuracies(
        ["a large red circle and a small blue square", "a small red square.", "nonsense"],
        ["a small blue square and a large red circle", "a small red circle", "a large red circle"],
    )
    acc = r["accuracy"]
    assert acc["colour_1"] == pytest.approx(1 / 3) and acc["size_1"] == pytest.approx(1 / 3)
    assert acc["shape_1"] == 0.0 and acc["count"] == pytest.approx(2 / 3)
    assert acc["order"] == 0.0 and r["n"]["order"] == 1 and r["exact_match"] == 0.0


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, corpus):
    """An untrained tiny image model saved as a bundle, and a few shapes-world images."""
    root = tmp_path_factory.mktemp("probe")
    tok = Tokenizer.from_file(corpus["tokenizer"])
    torch.manual_seed(0)
    save_hf(Transformer(preset("nano", vocab_size=tok.vocab_size)), root / "lm")
    tok.save(root / "lm")
    lm = load_hf(root / "lm")
    freeze(lm)
    enc = ImageEncoderConfig(
        tile_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        intermediate_layers=(0,),
        n_global_layers=1,
        max_tiles=2,
        out_dim=lm.cfg.dim,
    )
    model = MultimodalLM(lm, ImageEncoder(enc), xattn_every=1, image_token_id=tok.image_id)
    with torch.no_grad():  # open the gates: the image reaches the text
        for name, p in model.image_xattn.named_parameters():
            if "gate" in name:
                p.fill_(0.5)
    meta = {
        "stage": "image-anneal",
        "lm_path": str(root / "lm"),
        "lm_fingerprint": fingerprint(lm),
        "tokenizer": None,
        "image_encoder": {**dataclass_dict(enc), "weights": None},
        "xattn": {"every": 1, "hf_row_compat": False, "layers": None},
        "tile_size": 32,
        "max_tiles": 2,
        "prompt": IMAGE_PROMPT,
    }
    save_bundle(model.adapter_state(), root / "final", meta)
    train = synth_shapes(root, n=24, seed=0, split="train")
    heldout = synth_shapes(root, n=8, seed=0, split="heldout")
    return {"root": root, "final": root / "final", "train": train, "heldout": heldout}


def test_collect_positions_labels_and_zero_contribution_with_closed_gates(bundle):
    from mm.datasets.collate import ImageCaptionCollator
    from mm.datasets.media import read_manifest
    from mm.stages.image_model import load_image_bundle

    torch.set_num_threads(1)
    model, tok, transform, meta = load_image_bundle(bundle["final"])
    recs = read_manifest(bundle["heldout"], "image")
    col = ImageCaptionCollator(tok, meta["prompt"], max_tiles=meta["max_tiles"])
    for r in recs:  # each located word's tokens decode to that word
        spans = word_spans(tok, " ", r.text)  # the prompt's trailing space
        ids, words = col.caption_ids(r.text), r.text.split()
        assert spans is not None and {i: tok.decode(ids[a:e]).strip() for i, (a, e) in spans.items()} == {
            i: words[i] for i in spans
        }
    got = collect(model, tok, transform, meta, recs, batch_size=3)
    assert got.labels.tolist() == [caption_targets(r.text) for r in recs]
    tiled = [transform(load_rgb(r.media)) for r in recs]
    per_tile = model.image_encoder.num_tokens_per_tile
    assert got.mask.sum(1).tolist() == [t.n_tiles * per_tile for t in tiled]
    assert got.features.shape[-1] == model.image_encoder.features_dim
    assert got.projected.shape[-1] == model.cfg.dim
    defined = got.labels[:, :7] != IGNORE
    assert (got.next_token[:, :7][~defined] == IGNORE).all()
    assert got.words[:, :7][defined].abs().sum(-1).gt(0).all()  # open gates: the image contributes
    assert (got.words[:, 7] == 0).all()

    with torch.no_grad():
        for name, p in model.image_xattn.named_parameters():
            if "gate" in name:
                p.zero_()
    closed = collect(model, tok, transform, meta, recs, batch_size=8)
    assert torch.equal(closed.words, torch.zeros_like(closed.words))
    batch = col(
        [{"tiles": tiled[0].tiles, "aspect_ratio_id": tiled[0].aspect_ratio_id, "text": recs[0].text}]
    )
    with torch.no_grad(), XAttnTap(model) as tap:
        image = model.encode_media(
            batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"]
        )
        logits = model(batch["tokens"], {"image": MediaInput(image, batch["cross_attention_mask"])})
        assert len(tap.deltas) == len(model.image_xattn)
        assert torch.equal(tap.pop_sum(), torch.zeros(*batch["tokens"].shape, model.cfg.dim))
        assert torch.equal(logits, model.lm(batch["tokens"]))


def test_probe_cli_table_and_json(bundle, tmp_path, capsys):
    from mm.app.cli import main

    args = ["probe", "--checkpoint", str(bundle["final"]), "--train", str(bundle["train"])]
    args += ["--heldout", str(bundle["heldout"]), "--steps", "5", "--threads", "1"]
    assert main([*args, "--json", str(tmp_path / "a.json")]) == 0
    table = capsys.readouterr().out
    for point in ("chance", "encoder", "projected", "xattn", "next_token", "caption", "lm_text"):
        assert any(line.startswith(point) for line in table.splitlines()), table
    r = json.loads((tmp_path / "a.json").read_text())
    assert r["n_train"] == 24 and r["n_heldout"] == 8 and r["targets"] == list(TARGETS)
    for point in r["points"]:
        assert set(r["accuracy"][point]) == set(TARGETS)
    assert set(r["exact_match"]) == {"caption", "lm_text", "lm_text_no_period"}
    assert main([*args, "--json", str(tmp_path / "b.json")]) == 0
    again = json.loads((tmp_path / "b.json").read_text())
    assert again["accuracy"] == r["accuracy"]  # seeded and deterministic
