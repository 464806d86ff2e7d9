"""Image-caption batches (mm.datasets.collate): tokens, caption-only labels, media tensors, cross-attention masks."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from mm.datasets.collate import ImageCaptionCollator, cross_attention_mask_from_tokens
from mm.datasets.text import IGNORE_INDEX
from mm.datasets.tiling import CLIP_MEAN, CLIP_STD, TileTransform
from mm.lm import Tokenizer
from mm.prompts import IMAGE_PROMPT
from mm.world import synth_text

IMG = 9  # image token id in the mask-rule tests
S = 8  # tile size


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = synth_text(tmp_path_factory.mktemp("text"), n=500, seed=0).read_text().splitlines()
    return Tokenizer.train(corpus, vocab_size=400)


def sample(n_tiles: int, text: str, value: float = 1.0, ar_id: int = 1) -> dict:
    return {"tiles": torch.full((n_tiles, 3, S, S), value), "aspect_ratio_id": ar_id, "text": text}


def hf_mask(rows: list[list[int]], n_tiles: list[list[int]], max_tiles: int) -> torch.Tensor:
    sparse = [get_cross_attention_token_mask(r, IMG) for r in rows]
    dense = convert_sparse_cross_attention_mask_to_dense(sparse, n_tiles, max_tiles, len(rows[0]))
    return torch.from_numpy(dense)


@pytest.mark.parametrize(
    "rows, n_tiles",
    [
        ([[1, IMG, 5, 6, 7, 8, 0, 0]], [[3]]),  # one image
        ([[1, IMG, 5, 6, 7, IMG, 8, 2]], [[1, 4]]),  # two images far apart
        ([[1, IMG, IMG, 5, 6, 7, 8, 2]], [[2, 3]]),  # two consecutive images share the rest
        ([[1, 5, IMG, IMG, 6, IMG, 7, IMG]], [[1, 2, 3, 4]]),  # a group, a single, one at the very end
        ([[IMG, IMG, IMG, 4, 5, 6, 7, 8]], [[4, 4, 1]]),  # three consecutive at the start
        (
            [[1, IMG, 5, 6, 7, 8, 2, 0], [1, 5, 6, IMG, 7, IMG, 8, 2]],
            [[2], [1, 3]],
        ),  # rows with 1 and 2 images
    ],
)
def test_cross_attention_mask_matches_transformers(rows, n_tiles):
    tokens = torch.tensor(rows)
    ours = cross_attention_mask_from_tokens(tokens, IMG, n_tiles, max_tiles=4)
    assert ours.dtype == torch.long
    assert torch.equal(ours, hf_mask(rows, n_tiles, 4))


def test_cross_attention_mask_rule_values():
    tokens = torch.tensor([[1, 5, IMG, 6, 7, IMG, IMG, 8]])
    mask = cross_attention_mask_from_tokens(tokens, IMG, [[2, 1, 3]], max_tiles=4)
    assert mask.shape == (1, 8, 3, 4)
    assert mask[0, :2].sum() == 0  # before the first image: nothing
    assert mask[0, 2:5, 0].tolist() == [[1, 1, 0, 0]] * 3 and mask[0, 5:, 0].sum() == 0
    assert mask[0, 5:, 1].tolist() == [[1, 0, 0, 0]] * 3  # the group runs to the end
    assert mask[0, :6, 2].sum() == 0 and mask[0, 6:, 2].tolist() == [[1, 1, 1, 0]] * 2
    # No image anywhere: an empty image axis, as transformers builds it.
    none = cross_attention_mask_from_tokens(torch.tensor([[1, 5, 6]]), IMG, [[]], max_tiles=4)
    assert none.shape == (1, 3, 0, 4)
    assert torch.equal(none, hf_mask([[1, 5, 6]], [[]], 4))
    with pytest.raises(ValueError, match="row 0 has 1 image tokens"):
        cross_attention_mask_from_tokens(torch.tensor([[1, IMG]]), IMG, [[1, 1]], max_tiles=4)
    with pytest.raises(ValueError, match="5 tiles"):
        cross_attention_mask_from_tokens(torch.tensor([[1, IMG]]), IMG, [[5]], max_tiles=4)


def test_training_batch_tokens_labels_and_masks(tok):
    collate = ImageCaptionCollator(tok, IMAGE_PROMPT, max_tiles=4)
    batch = collate(
        [
            sample(1, "a large red circle", 0.5, 1),
            sample(3, "a small blue square and a large red circle", -1, 3),
        ]
    )
    head = tok.encode("Caption:")
    cap0, cap1 = tok.encode(" a large red circle"), tok.encode(" a small blue square and a large red circle")
    row0 = [tok.bos_id, tok.image_id, *head, *cap0, tok.eos_id]
    row1 = [tok.bos_id, tok.image_id, *head, *cap1, tok.eos_id]
    # The rows are the tokens of the joined text, as the LM saw them in its corpus ("Caption: a large ...").
    assert row0[2:-1] == tok.encode(IMAGE_PROMPT + "a large red circle")
    length = len(row1)
    assert len(row0) < length
    assert batch["tokens"].tolist() == [row0 + [tok.pad_id] * (length - len(row0)), row1]
    p = 2 + len(head)  # index of the first caption token
    labels0 = [IGNORE_INDEX] * (p - 1) + cap0 + [tok.eos_id] + [IGNORE_INDEX] * (length - len(row0) + 1)
    assert batch["labels"][0].tolist() == labels0
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * (p - 1) + cap1 + [tok.eos_id, IGNORE_INDEX]
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"].sum(1).tolist() == [len(row0), length]
    # Media tensors in Mllama's layout.
    pv = batch["pixel_values"]
    assert pv.shape == (2, 1, 4, 3, S, S) and pv.dtype == torch.float32
    assert (pv[0, 0, 0] == 0.5).all() and (pv[0, 0, 1:] == 0).all()
    assert (pv[1, 0, :3] == -1).all() and (pv[1, 0, 3] == 0).all()
    assert batch["aspect_ratio_ids"].tolist() == [[1], [3]]
    assert batch["aspect_ratio_mask"].tolist() == [[[1, 0, 0, 0]], [[1, 1, 1, 0]]]
    cam = batch["cross_attention_mask"]
    assert cam.shape == (2, length, 1, 4)
    assert cam[:, 0].sum() == 0  # bos sees no image
    assert cam[0, 1:, 0].tolist() == [[1, 0, 0, 0]] * (length - 1)  # up to the end, padding included
    assert cam[1, 1:, 0].tolist() == [[1, 1, 1, 0]] * (length - 1)


def test_image_token_in_caption_is_plain_text(tok):
    collate = ImageCaptionCollator(tok, IMAGE_PROMPT, max_tiles=4)
    batch = collate([sample(2, "a red <|image|> circle <|image|>")])
    assert (batch["tokens"] == tok.image_id).sum().item() == 1
    assert batch["tokens"][0, 1].item() == tok.image_id
    assert batch["cross_attention_mask"].shape[2] == 1
    text = tok.decode(batch["tokens"][0, 2:-1].tolist())
    assert text == "Caption: a red <|image|> circle <|image|>"


def test_max_len_truncates_the_caption_and_none_samples_are_dropped(tok):
    collate = ImageCaptionCollator(tok, IMAGE_PROMPT, max_tiles=4, max_len=7)
    batch = collate([None, sample(1, "a large red circle and a small blue square"), None])
    full = [tok.bos_id, tok.image_id, *tok.encode("Caption: a large red circle and a small blue square")]
    assert batch["tokens"].tolist() == [full[:7]]
    p = 2 + len(tok.encode("Caption:"))
    assert batch["labels"].tolist() == [[IGNORE_INDEX] * (p - 1) + full[p:7] + [IGNORE_INDEX]]
    with pytest.raises(ValueError, match="empty batch"):
        collate([None])
    with pytest.raises(ValueError, match="max_len=3"):
        ImageCaptionCollator(tok, IMAGE_PROMPT, max_len=3)
    with pytest.raises(ValueError, match="tiles of shape"):
        ImageCaptionCollator(tok, IMAGE_PROMPT, max_tiles=2)([sample(3, "a red circle")])


def test_prompt_only_matches_training_prefix(tok):
    collate = ImageCaptionCollator(tok, IMAGE_PROMPT, max_tiles=4)
    samples = [sample(1, "a large red circle"), sample(2, "a small blue square", ar_id=2)]
    gen = collate.prompt_only(samples)
    train = collate(samples)
    prefix = [tok.bos_id, tok.image_id, *tok.encode("Caption:")]
    assert gen["prompt_tokens"] == [prefix, prefix]
    assert train["tokens"][:, : len(prefix)].tolist() == [prefix, prefix]
    for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.equal(gen[key], train[key])
    assert gen["n_tiles"] == [[1], [2]]


def test_media_tensors_match_mllama_image_processor(tok):
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(40, 10), (12, 30)]
    ]
    transform = TileTransform(S, 4)
    samples = []
    for image in images:
        t = transform(image)
        samples.append({"tiles": t.tiles, "aspect_ratio_id": t.aspect_ratio_id, "text": "a red circle"})
    batch = ImageCaptionCollator(tok, IMAGE_PROMPT, max_tiles=4)(samples)
    hf = MllamaImageProcessor(
        size={"height": S, "width": S},
        max_image_tiles=4,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    ref = hf(images=[[im] for im in images], return_tensors="pt")
    torch.testing.assert_close(batch["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)
    assert torch.equal(batch["aspect_ratio_ids"], ref["aspect_ratio_ids"])
    assert torch.equal(batch["aspect_ratio_mask"], ref["aspect_ratio_mask"])
