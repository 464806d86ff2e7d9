"""Chat instruction data (mm.datasets.chat, mm.datasets.chat_collate): the Llama 3 layout, assistant-only labels,
the manifest's bad-input rules, media read through the media decoders, several images per row."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from mm.datasets.chat import ChatDataset, encode_chat, normalize_messages, read_chat_manifest
from mm.datasets.chat_collate import ChatCollator
from mm.datasets.images import image_decoder
from mm.datasets.text import IGNORE_INDEX
from mm.datasets.tiling import TileTransform
from mm.lm import Tokenizer
from mm.world import synth_text


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = synth_text(tmp_path_factory.mktemp("text"), n=300, seed=0).read_text().splitlines()
    return Tokenizer.train(corpus, vocab_size=400)


def png(path, colour=(200, 30, 30), size=(48, 32)):
    Image.fromarray(np.full((size[1], size[0], 3), colour, dtype=np.uint8)).save(path)
    return path


def test_encode_chat_is_the_llama3_layout_with_assistant_only_labels(tok):
    messages = [
        {"role": "system", "content": "answer in one word"},
        {"role": "user", "content": [{"type": "image"}, "what colour is the circle?"]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "is there a square?"},
        {"role": "assistant", "content": "no"},
    ]
    want = tok.encode_dialog(messages, add_generation_prompt=False)
    norm = normalize_messages(
        [
            {**m, "content": [{"type": "image", "path": "x.png"}, m["content"][1]]} if k == 1 else m
            for k, m in enumerate(messages)
        ]
    )
    ids, labels = encode_chat(tok, norm)
    assert ids == want
    assert ids.count(tok.image_id) == 1
    learned = [ids[t + 1] for t, y in enumerate(labels) if y != IGNORE_INDEX]
    assert learned == [*tok.encode("red"), tok.eot_id, *tok.encode("no"), tok.eot_id]
    assert all(y in (IGNORE_INDEX, ids[t + 1]) for t, y in enumerate(labels[:-1]))
    gen, _ = encode_chat(tok, norm[:2], add_generation_prompt=True)
    assert gen == tok.encode_dialog(messages[:2], add_generation_prompt=True)


def test_user_text_never_becomes_a_special_token(tok):
    ids, _ = encode_chat(
        tok,
        normalize_messages(
            [
                {"role": "user", "content": "<|image|><|eot_id|>"},
                {"role": "assistant", "content": "<|video|>"},
            ]
        ),
    )
    assert tok.image_id not in ids and tok.video_id not in ids
    assert ids.count(tok.eot_id) == 2


def test_bad_messages_are_refused_naming_what_is_wrong():
    with pytest.raises(ValueError, match="message 0: role 'bot'"):
        normalize_messages([{"role": "bot", "content": "x"}])
    with pytest.raises(ValueError, match="assistant turn holds text only"):
        normalize_messages([{"role": "assistant", "content": [{"type": "image", "path": "a.png"}]}])
    with pytest.raises(ValueError, match="content item type 'gif'"):
        normalize_messages([{"role": "user", "content": [{"type": "gif", "path": "a.gif"}]}])
    with pytest.raises(ValueError, match="2 videos"):
        v = {"type": "video", "path": "a.mp4"}
        normalize_messages([{"role": "user", "content": [v, v]}])


def test_manifest_skips_malformed_lines_and_missing_media(tmp_path, caplog, tok):
    png(tmp_path / "a.png")
    good = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "path": "a.png"}, "q?"]},
            {"role": "assistant", "content": "red"},
        ],
        "family": "colour",
    }
    missing = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "path": "gone.png"}, "q?"]},
            {"role": "assistant", "content": "red"},
        ]
    }
    no_answer = {"messages": [{"role": "user", "content": "q?"}]}
    lines = [json.dumps(good), "{not json", json.dumps([1]), json.dumps(missing), json.dumps(no_answer)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    recs = read_chat_manifest(tmp_path / "m.jsonl")
    assert len(recs) == 1 and recs[0].meta == {"family": "colour"} and recs[0].source.endswith("m.jsonl:1")
    assert recs[0].messages[0]["content"][0]["path"] == tmp_path / "a.png"
    text = caplog.text
    assert (
        "m.jsonl:2" in text and "m.jsonl:3" in text and "m.jsonl:5: skipped chat record: no assistant" in text
    )
    assert "gone.png" in text


def test_dataset_skips_and_counts_a_corrupt_image(tmp_path, tok):
    png(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "path": p}, "q?"]},
                {"role": "assistant", "content": "red"},
            ]
        }
        for p in ("a.png", "bad.png")
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = ChatDataset(
        tmp_path / "m.jsonl", tok, {"image": image_decoder(TileTransform(16, 2))}, max_bad_fraction=1
    )
    assert ds.load(0)["images"][0]["tiles"].shape[1:] == (3, 16, 16)
    assert ds.load(1) is None and ds.load(1) is None
    stats = ds.stats.as_dict()
    assert stats["tried"] == 2 and stats["skipped"] == 1 and stats["skipped_by_reason"] == {"corrupt": 1}
    assert stats["examples"]["corrupt"][0].endswith("m.jsonl:2")


def test_collator_places_several_images_by_the_mllama_rule(tok):
    def image(n, v):
        return {"tiles": torch.full((n, 3, 8, 8), float(v)), "aspect_ratio_id": n}

    img = {"type": "image", "path": "x"}
    convs = [
        [img, img, "which image has more shapes?"],  # two images first: a run, both seen by the question
        ["look:", img, "and", img, "?"],  # text before and between
        ["no image here"],
    ]
    samples = []
    for k, content in enumerate(convs):
        ids, labels = encode_chat(
            tok,
            normalize_messages(
                [{"role": "user", "content": content}, {"role": "assistant", "content": "the first"}]
            ),
        )
        n_img = sum(1 for c in content if c is img)
        samples.append({"ids": ids, "labels": labels, "images": [image(1 + j, k + j) for j in range(n_img)]})
    batch = ChatCollator(tok, max_tiles=2)(samples)
    assert batch["image_rows"].tolist() == [0, 1]
    assert batch["pixel_values"].shape == (2, 2, 2, 3, 8, 8)
    assert batch["aspect_ratio_ids"].tolist() == [[1, 2], [1, 2]]
    rows = [batch["tokens"][b].tolist() for b in range(3)]
    n_tiles = [[1, 2], [1, 2], [0]]
    sparse = [get_cross_attention_token_mask(r, tok.image_id) for r in rows]
    want = convert_sparse_cross_attention_mask_to_dense(sparse, n_tiles, 2, len(rows[0]))
    assert torch.equal(batch["cross_attention_mask"], torch.from_numpy(want))
    assert batch["cross_attention_mask"][2].sum() == 0  # the text-only row sees no image
    q = rows[0].index(tok.image_id) + 2  # first question token after the run of two images
    assert batch["cross_attention_mask"][0, q].tolist() == [[1, 0], [1, 1]]
    assert (batch["labels"] != IGNORE_INDEX).sum(1).tolist() == [len(tok.encode("the first")) + 1] * 3
    assert "video_frames" not in batch
