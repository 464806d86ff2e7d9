"""CLIP pretraining: the loss against a hand computation, the text tower's pooling, image pooling over real
tiles, retrieval accuracy on known embeddings, and a few optimisation steps on synthetic coloured squares.
(Two processes: `test_clip_distributed.py`.)"""

import math

import pytest
import torch
from torch import nn

from mm.encoders import (
    CLIPModel,
    ImageEncoder,
    ImageEncoderConfig,
    TextTower,
    clip_loss,
    zero_shot_retrieval_accuracy,
)
from mm.encoders.clip import bag_of_words_loss, gather_rows, same_caption
from mm.lm import LMConfig

PAD, SQUARE, EOS, LARGE = 0, 5, 6, 7  # colour tokens are 1..4
COLOURS = torch.tensor([[0.86, 0.12, 0.12], [0.12, 0.63, 0.24], [0.12, 0.27, 0.86], [0.9, 0.78, 0.08]])


def tiny_clip(max_tiles: int = 1, image_pool: str = "mean") -> CLIPModel:
    enc = ImageEncoder(
        ImageEncoderConfig(
            tile_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, intermediate_layers=(0,),
            n_global_layers=1, max_tiles=max_tiles, out_dim=8,
        )
    )  # fmt: skip
    text = LMConfig(
        dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=8, ffn_dim=64, max_seq_len=8, rope_theta=1e4
    )
    return CLIPModel(enc, TextTower(text, embed_dim=16), image_pool=image_pool)


def coloured_squares(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n images (n, 3, 16, 16) of a small or large coloured square at a random place, captions right-padded."""
    g = torch.Generator().manual_seed(seed)
    images = torch.full((n, 3, 16, 16), 0.9)
    ids = torch.full((n, 4), PAD)
    mask = torch.zeros(n, 4, dtype=torch.long)
    for i in range(n):
        colour, large = i % 4, (i // 4) % 2 == 1
        side = 10 if large else 5
        y, x = torch.randint(0, 16 - side + 1, (2,), generator=g).tolist()
        images[i, :, y : y + side, x : x + side] = COLOURS[colour][:, None, None]
        caption = [LARGE] * large + [1 + colour, SQUARE, EOS]  # "large red square" / "red square"
        ids[i, : len(caption)] = torch.tensor(caption)
        mask[i, : len(caption)] = 1
    return (images - 0.5) / 0.25, ids, mask


def test_clip_loss_equals_hand_computation():
    img, txt, scale = torch.randn(3, 4), torch.randn(3, 4), 7.0

    def unit(v: list[float]) -> list[float]:
        return [x / math.sqrt(sum(y * y for y in v)) for x in v]

    ims, txs = [unit(r) for r in img.tolist()], [unit(r) for r in txt.tolist()]
    logits = [[scale * sum(a * b for a, b in zip(ims[i], txs[j])) for j in range(3)] for i in range(3)]
    i2t = sum(-logits[i][i] + math.log(sum(math.exp(v) for v in logits[i])) for i in range(3)) / 3
    t2i = sum(-logits[j][j] + math.log(sum(math.exp(logits[i][j]) for i in range(3))) for j in range(3)) / 3
    assert clip_loss(img, txt, scale).item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)


def test_aligned_embeddings_give_near_zero_loss_at_high_scale():
    emb = torch.eye(4)
    assert clip_loss(emb, emb, torch.tensor(100.0)).item() < 1e-6
    assert clip_loss(emb, emb, 1.0).item() == pytest.approx(math.log(1 + 3 * math.exp(-1)), rel=1e-5)
    model = tiny_clip()
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == 100.0


class FixedEmbeddings(nn.Module):
    """Stands in for a CLIPModel whose embeddings are known."""

    def __init__(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> None:
        super().__init__()
        self.image_emb, self.text_emb = image_emb, text_emb

    def encode_image(self, images, aspect_ratio_ids=None, aspect_ratio_mask=None):
        return self.image_emb

    def encode_text(self, texts, attention_mask=None):
        return self.text_emb


def test_retrieval_accuracy_on_known_embeddings():
    # similarity[i, j] = text_emb[j, i]: images 0 and 3 find their text; image 1 -> text 0, image 2 -> text 1.
    # texts 0, 2, 3 find their image; text 1 -> image 2.
    text_emb = torch.tensor([[1.0, 0.2, 0, 0], [0, 0, 1, 0], [0, 0, 0.5, 0], [0, 0, 0, 1]])
    model = FixedEmbeddings(torch.eye(4), text_emb)
    acc = zero_shot_retrieval_accuracy(model, torch.zeros(4, 3, 16, 16), torch.tensor([[1], [2], [3], [4]]))
    assert acc == {"image_to_text": 0.5, "text_to_image": 0.75}
    # Texts 1 and 2 are the same caption: retrieving either one is right.
    acc = zero_shot_retrieval_accuracy(model, torch.zeros(4, 3, 16, 16), torch.tensor([[1], [2], [2], [4]]))
    assert acc == {"image_to_text": 0.75, "text_to_image": 1.0}


@torch.no_grad()
def test_text_tower_pools_at_the_last_real_token():
    tower = tiny_clip().text_tower.eval()
    short = tower(torch.tensor([[3, 5, 6]]))
    padded = tower(
        torch.tensor([[3, 5, 6, 0, 0], [3, 5, 6, 2, 1]]), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    )
    torch.testing.assert_close(padded, short.expand(2, -1))
    assert not torch.allclose(tower(torch.tensor([[3, 5, 6, 2]])), short)
    with pytest.raises(ValueError, match="right-padded"):
        tower(torch.tensor([[0, 3, 5]]), torch.tensor([[0, 1, 1]]))


@torch.no_grad()
@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_image_embedding_pools_over_real_tiles_only(pool):
    model = tiny_clip(max_tiles=2, image_pool=pool).eval()
    pix = torch.randn(2, 2, 3, 16, 16)
    ids, mask = torch.tensor([2, 1]), torch.tensor([[1, 1], [1, 0]])  # 1x2 image, 1x1 image + padding tile
    emb = model.encode_image(pix, ids, mask)
    assert emb.shape == (2, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    pix[1, 1] = torch.randn(3, 16, 16)
    torch.testing.assert_close(model.encode_image(pix, ids, mask)[1], emb[1], rtol=0, atol=1e-6)


def test_a_few_steps_on_coloured_squares_lower_the_loss_and_align_pairs():
    torch.manual_seed(0)
    model = tiny_clip()
    images, ids, mask = coloured_squares(16, seed=0)
    before = zero_shot_retrieval_accuracy(model, images, ids, attention_mask=mask)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(40):
        loss = clip_loss(*model(images, ids, attention_mask=mask))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # 8 captions, two images each: the loss cannot go below log 2 (two equally right texts per image).
    assert losses[0] > 3.0 and losses[-1] < 0.6 * losses[0] and losses[-1] > math.log(2) - 1e-3
    after = zero_shot_retrieval_accuracy(model, images, ids, attention_mask=mask)
    assert before["image_to_text"] < 0.5
    assert after == {"image_to_text": 1.0, "text_to_image": 1.0}


def test_multi_positive_loss_equals_clip_without_duplicates_and_keeps_duplicates_together():
    torch.manual_seed(0)
    img, txt = torch.randn(6, 8), torch.randn(6, 8)
    eye = torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(clip_loss(img, txt, 10.0, eye), clip_loss(img, txt, 10.0))
    # images 0 and 1 share a caption: text 1 is as right for image 0 as text 0 is
    txt[1] = txt[0]
    pos = eye.clone()
    pos[0, 1] = pos[1, 0] = True
    assert clip_loss(img, txt, 10.0, pos) < clip_loss(img, txt, 10.0)
    # the one-positive loss pushes image 0 away from its duplicate caption; the multi-positive one does not
    a = img.clone().requires_grad_(True)
    clip_loss(a, txt, 10.0).backward()
    b = img.clone().requires_grad_(True)
    clip_loss(b, txt, 10.0, pos).backward()
    t1 = torch.nn.functional.normalize(txt[1], dim=-1)
    assert float(a.grad[0] @ t1) > float(b.grad[0] @ t1)
    with pytest.raises(ValueError, match="diagonal"):
        clip_loss(img, txt, 10.0, torch.zeros(6, 6, dtype=torch.bool))


def test_max_pooling_reads_the_largest_value_of_real_tiles_only():
    torch.manual_seed(0)
    model = tiny_clip(max_tiles=2, image_pool="max").eval()
    enc = model.image_encoder
    pix = torch.randn(2, 2, 3, 16, 16)
    ids = torch.tensor([2, 2])
    mask = torch.tensor([[1, 1], [1, 0]])
    with torch.no_grad():
        emb = model.encode_image(pix, ids, mask)
        feats = enc.forward_features(pix[:, None], ids[:, None], mask[:, None])[:, 0]  # (B, T, n, F)
        want0 = feats[0].amax(dim=(0, 1))
        want1 = feats[1, :1].amax(dim=(0, 1))  # the padding tile is never read
        want = torch.nn.functional.normalize(model.image_proj(torch.stack([want0, want1])), dim=-1)
    torch.testing.assert_close(emb, want)


def test_bag_of_words_loss_targets_the_caption_words_only():
    ids = torch.tensor([[0, 3, 4, 4, 9], [0, 5, 9, 1, 1]])  # bos=0, eos=9, pad=1
    keep = (ids != 0) & (ids != 9) & (ids != 1)
    want = torch.zeros(2, 10)
    want[0, [3, 4]] = 10.0  # caption 0 holds words 3 and 4 (4 twice: still one word)
    want[1, 5] = 10.0
    good = bag_of_words_loss(want, ids, keep)
    assert float(good) == pytest.approx(float(-torch.log_softmax(want[0], -1)[3]) / 2 + 0.0, abs=0.05)
    wrong = bag_of_words_loss(want.roll(1, dims=-1), ids, keep)
    assert float(wrong) > float(good) + 5
    summed = bag_of_words_loss(want.roll(1, dims=-1), ids, keep, reduction="sum")  # for the caller to divide
    assert float(summed) == pytest.approx(2 * float(wrong), rel=1e-6)


def hand_clip_sum(
    img: list[list[float]], txt: list[list[float]], scale: float, pos: list[list[bool]]
) -> float:
    """(sum over images of -log softmax mass on their matching texts + the same over texts) / 2, by hand."""
    n = len(img)

    def unit(v: list[float]) -> list[float]:
        return [x / math.sqrt(sum(y * y for y in v)) for x in v]

    ims, txs = [unit(r) for r in img], [unit(r) for r in txt]
    lg = [[scale * sum(a * b for a, b in zip(ims[i], txs[j])) for j in range(n)] for i in range(n)]
    i2t = sum(
        -math.log(sum(math.exp(lg[i][j]) for j in range(n) if pos[i][j]) / sum(math.exp(v) for v in lg[i]))
        for i in range(n)
    )
    t2i = sum(
        -math.log(
            sum(math.exp(lg[i][j]) for i in range(n) if pos[i][j]) / sum(math.exp(lg[i][j]) for i in range(n))
        )
        for j in range(n)
    )
    return (i2t + t2i) / 2


@pytest.mark.parametrize("positives", ["diagonal", "duplicates", "one-way"])
def test_summed_loss_equals_hand_computation_with_or_without_gather(positives):
    torch.manual_seed(0)
    img, txt = torch.randn(4, 3), torch.randn(4, 3)
    ids = torch.tensor(
        [[1, 9], [2, 9], [3, 9], [4, 9]] if positives == "diagonal" else [[1, 9], [2, 9], [1, 9], [3, 9]]
    )
    pos = same_caption(ids, None)
    assert int(pos.sum()) == (4 if positives == "diagonal" else 6)
    if positives == "one-way":  # image 1 also matches text 3, but image 3 does not match text 1
        pos[1, 3] = True
    want = hand_clip_sum(img.tolist(), txt.tolist(), 5.0, pos.tolist())
    positives = None if positives == "diagonal" else pos
    # the default stays the mean over the pairs
    assert clip_loss(img, txt, 5.0, positives).item() == pytest.approx(want / 4, rel=1e-5)
    for gather in (False, True):  # no process group: gathering changes nothing
        got = clip_loss(img, txt, torch.tensor(5.0), positives, reduction="sum", gather=gather)
        assert got.item() == pytest.approx(want, rel=1e-5)
        assert torch.equal(same_caption(ids, None, gather=gather), same_caption(ids, None))
    assert torch.equal(gather_rows(img), img)
    with pytest.raises(ValueError, match="reduction"):
        clip_loss(img, txt, 5.0, reduction="none")
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        clip_loss(img, txt, 5.0, pos[:2])
