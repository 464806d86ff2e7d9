"""Contrastive (CLIP) pretraining of the image encoder with a small text tower.

Llama 3 paper section 7.2.1: the image encoder is "contrastively pretrained on 2.5B image-text pairs"
(`paper-notes.md` section 3). The objective is CLIP's (Radford et al. 2021): L2-normalised image and text
embeddings, logits = scale * image @ text.T with a learnable temperature (init 1/0.07, scale clamped at
100), symmetric cross-entropy over the batch (open_clip's `ClipLoss` is the reference).

- `TextTower`: a small causal Llama-style Transformer (`mm.lm.Transformer` blocks: RMSNorm, RoPE, SwiGLU)
  pooled at the last real token (the EOS of a right-padded caption), then a linear projection.
- `CLIPModel`: `ImageEncoder` pre-projection features pooled over the real tiles' tokens (mean, or the class
  token) -> linear projection; `forward` returns (image_emb, text_emb, scale) for `clip_loss`.

Across processes (torchrun, data parallel): with `gather=True`, `clip_loss` contrasts this process's images
with every process's texts and its texts with every process's images (`gather_rows`, autograd-aware), and
`same_caption(..., gather=True)` marks identical captions over the whole global batch. With
`reduction="sum"` each process returns the sum of the loss terms of its own rows; the sum over processes is
the one-process summed loss, and a trainer that backpropagates `loss * world_size / global_rows` on each
process and averages the gradients gets the one-process gradient of the mean loss.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mm.lm import LMConfig, Transformer
from mm.lm.checks import check_on_host_or_async

from .image import ImageEncoder

IMAGE_POOLS = ("mean", "cls", "max")
MAX_LOGIT_SCALE = 100.0
REDUCTIONS = ("mean", "sum")


def _process_group_active() -> bool:
    return dist.is_available() and dist.is_initialized()


class _AllGatherRows(torch.autograd.Function):
    """Every process's block (same shape everywhere) concatenated in rank order; the backward sums the gathered
    tensor's gradient over processes (each process's loss reads every block) and keeps this rank's block."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        """Gather (world * rows, ...)."""
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.block = (dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        """Sum over processes, this rank's rows."""
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        lo, hi = ctx.block
        return grad[lo:hi]


def _gather_rows_at(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows of every process concatenated in rank order, index of this process's first row there).

    Processes may hold different row counts (each is padded to the largest for the collective and cut
    back); the other dimensions must agree. Gradients flow back to every process's rows when `x` needs them.
    """
    if not _process_group_active():
        return x, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    shapes = torch.zeros(world, x.ndim, dtype=torch.long, device=x.device)
    shapes[rank] = torch.tensor(x.shape, dtype=torch.long)
    dist.all_reduce(shapes, op=dist.ReduceOp.SUM)  # every process's shape, in rank order
    if not bool((shapes[:, 1:] == shapes[rank, 1:]).all()):
        raise ValueError(
            f"gather_rows: processes hold rows of different shapes {[tuple(r) for r in shapes.tolist()]}; "
            "only the row count (dimension 0) may differ"
        )
    rows = shapes[:, 0].tolist()
    most = max(rows)
    if most == 0:
        return x, 0
    if x.shape[0] < most:
        x = torch.cat([x, x.new_zeros(most - x.shape[0], *x.shape[1:])])
    blocks = _AllGatherRows.apply(x).split(most)  # world blocks of `most` rows; padding rows cut below
    return torch.cat([block[:n] for block, n in zip(blocks, rows, strict=True)]), sum(rows[:rank])


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every process's rows of `x` concatenated in rank order, autograd-aware; `x` itself without a process group."""
    return _gather_rows_at(x)[0]


def _right_padded_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """Lengths (B,) of a right-padded mask (B, T) of 1s then 0s; anything else is an error (on CUDA a device-side
    assertion: no host sync)."""
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    ok = (mask == (positions[None, :] < lengths[:, None])).all() & (lengths >= 1).all()
    check_on_host_or_async(
        ok, "attention_mask must be right-padded (1s then 0s) with at least one real token per row"
    )
    return lengths


class TextTower(nn.Module):
    """Causal Transformer over token ids (B, T) -> text embedding (B, embed_dim), pooled at the last real token."""

    def __init__(self, cfg: LMConfig, embed_dim: int) -> None:
        super().__init__()
        # The vocabulary head is never used; tying it to the embedding makes it cost no parameters.
        self.cfg = dataclasses.replace(cfg, tie_embeddings=True)
        self.embed_dim = embed_dim
        self.transformer = Transformer(self.cfg)
        self.proj = nn.Linear(cfg.dim, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=cfg.dim**-0.5)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T), right-padded; attention_mask (B, T) 1 = real (None: all real) -> (B, embed_dim)."""
        B, T = input_ids.shape
        tf = self.transformer
        h = tf.embed(input_ids)  # (B, T, D)
        ctx = tf.context(B, T, device=h.device)  # plain causal: right padding never reaches real tokens
        for layer in tf.layers:
            h = layer(h, ctx)
        if attention_mask is None:
            last = torch.full((B,), T - 1, device=h.device)
        else:
            last = _right_padded_lengths(attention_mask) - 1
        pooled = tf.norm(h[torch.arange(B, device=h.device), last])  # (B, D)
        return self.proj(pooled)


class CLIPModel(nn.Module):
    """Image encoder + text tower with a shared embedding space and a learnable temperature."""

    def __init__(
        self,
        image_encoder: ImageEncoder,
        text_tower: TextTower,
        image_pool: str = "mean",
        bag_of_words: int = 0,
    ) -> None:
        super().__init__()
        if image_pool not in IMAGE_POOLS:
            raise ValueError(f"image_pool={image_pool!r}; expected one of {IMAGE_POOLS}")
        if image_pool == "cls" and not image_encoder.vit.has_class_token:
            raise ValueError(
                f"image_pool='cls' but timm model {image_encoder.cfg.timm_name!r} has no class token"
            )
        self.image_encoder = image_encoder
        self.text_tower = text_tower
        self.image_pool = image_pool
        self.embed_dim = text_tower.embed_dim
        self.image_proj = nn.Linear(image_encoder.features_dim, self.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=image_encoder.features_dim**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # log of the inverse temperature
        # optional caption bag-of-words head (vocabulary size; 0 = none): pooled image features -> which token
        # ids the caption holds (`bag_of_words_loss`)
        self.bow_head = nn.Linear(image_encoder.features_dim, bag_of_words) if bag_of_words else None

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped at 100 (CLIP's cap on the inverse temperature)."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def encode_image(
        self,
        pixel_values: torch.Tensor,
        aspect_ratio_ids: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Unit image embeddings (B, E) for one image per sample: (B, 3, S, S) or tiles (B, T, 3, S, S)."""
        return F.normalize(
            self.image_proj(self.pool_image(pixel_values, aspect_ratio_ids, aspect_ratio_mask)), dim=-1
        )

    def pool_image(
        self,
        pixel_values: torch.Tensor,
        aspect_ratio_ids: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled encoder features (B, F) (before `image_proj`) of one image per sample.

        aspect_ratio_ids (B,) may be omitted for single tiles (id 1 = 1x1); aspect_ratio_mask (B, T)
        defaults to all tiles real. Pooling (`image_pool`) reads only real tiles: "mean" averages every token,
        "cls" averages the class tokens, "max" takes each channel's largest value over all tokens (a feature
        that fires on one small object anywhere in the image is not diluted by the background around it).
        """
        if pixel_values.ndim == 4:
            pixel_values = pixel_values[:, None]  # (B, 1, 3, S, S)
        if pixel_values.ndim != 5:
            raise ValueError(
                f"pixel_values must be (B, 3, S, S) or (B, T, 3, S, S), got {tuple(pixel_values.shape)}"
            )
        B, T = pixel_values.shape[:2]
        device = pixel_values.device
        if aspect_ratio_ids is None:
            if T != 1:
                raise ValueError(f"aspect_ratio_ids are needed for {T} tiles per image")
            aspect_ratio_ids = torch.ones(B, dtype=torch.long, device=device)
        if aspect_ratio_mask is None:
            aspect_ratio_mask = torch.ones(B, T, dtype=torch.long, device=device)
        feats = self.image_encoder.forward_features(
            pixel_values[:, None], aspect_ratio_ids[:, None], aspect_ratio_mask[:, None]
        )[:, 0]  # (B, T, n, F)
        w = aspect_ratio_mask.to(feats.dtype)[..., None]  # (B, T, 1)
        if self.image_pool == "max":  # each channel's largest value over the real tiles' tokens
            real = aspect_ratio_mask.bool()[:, :, None, None]  # (B, T, 1, 1)
            pooled = feats.masked_fill(~real, torch.finfo(feats.dtype).min).amax(dim=(1, 2))  # (B, F)
        else:
            per_tile = feats.mean(2) if self.image_pool == "mean" else feats[:, :, 0]  # (B, T, F)
            pooled = (per_tile * w).sum(1) / w.sum(1).clamp(min=1)  # (B, F)
        return pooled

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Unit text embeddings (B, E) for right-padded token ids (B, T)."""
        return F.normalize(self.text_tower(input_ids, attention_mask), dim=-1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        aspect_ratio_ids: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image_emb (B, E), text_emb (B, E), scale ()) ready for `clip_loss`."""
        image_emb = self.encode_image(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        text_emb = self.encode_text(input_ids, attention_mask)
        return image_emb, text_emb, self.scale()


def clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    positives: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    gather: bool = False,
) -> torch.Tensor:
    """Symmetric cross-entropy of scale * img @ txt.T with pairs on the diagonal (inputs L2-normalised here).

    `logit_scale` is the multiplier itself (CLIPModel.scale(), i.e. exp of the parameter), not its log.
    `positives` (B, B) bool, diagonal set: every marked pair counts as a match (multi-positive loss,
    -log of the softmax mass on the positives), so identical captions in a batch are not pushed apart.

    The loss is (image->text term + text->image term) / 2 per pair, averaged over this call's pairs
    (reduction="mean") or summed (reduction="sum"). gather=True (data parallel; identity without a process
    group): image i of this process is contrasted with the texts of every process and text j with every
    process's images (`gather_rows`, gradients reach the other processes' embeddings); `positives` is then
    (N, N) over the gathered batch in rank order (`same_caption(..., gather=True)`), and the result covers
    this process's pairs only: summed over processes, reduction="sum" gives the one-process summed loss.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"clip_loss: reduction={reduction!r}; expected one of {REDUCTIONS}")
    n = image_emb.shape[0]
    if text_emb.shape[0] != n:
        raise ValueError(f"clip_loss: {n} images but {text_emb.shape[0]} texts")
    image_emb, text_emb = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    if gather and _process_group_active() and dist.get_world_size() > 1:
        # one collective for both: (N, 2E) -> every process's images and texts
        both, start = _gather_rows_at(torch.cat([image_emb, text_emb], dim=-1))
        all_images, all_texts = both.split([image_emb.shape[-1], text_emb.shape[-1]], dim=-1)
    else:
        all_images, all_texts, start = image_emb, text_emb, 0
    total = all_texts.shape[0]
    logits = logit_scale * image_emb @ all_texts.T  # (B, N): row i = image i against every text

    def text_logits() -> torch.Tensor:  # (B, N): row j = this process's text j against every image
        # built after the image -> text term, as before, so one process keeps its exact gradients
        return logits.T if total == n else logit_scale * text_emb @ all_images.T

    if positives is None:
        labels = torch.arange(start, start + n, device=logits.device)
        i2t = F.cross_entropy(logits, labels, reduction=reduction)
        return (i2t + F.cross_entropy(text_logits(), labels, reduction=reduction)) / 2
    if positives.shape != (total, total):
        raise ValueError(
            f"clip_loss: positives must be ({total}, {total}) (the gathered batch), got {tuple(positives.shape)}"
        )
    positives = positives.to(logits.device)
    check_on_host_or_async(
        positives.diagonal().all(), "clip_loss: positives must include every pair on the diagonal"
    )

    def multi(lg: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        per_row = lg.logsumexp(-1) - lg.masked_fill(~pos, float("-inf")).logsumexp(-1)
        return per_row.mean() if reduction == "mean" else per_row.sum()

    rows = slice(start, start + n)
    i2t = multi(logits, positives[rows])
    return (i2t + multi(text_logits(), positives[:, rows].T)) / 2


def bag_of_words_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, keep: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of logits (B, V) against each caption's token ids spread evenly (a soft target): the mean
    over rows, their sum with reduction="sum", or per row (B,) with reduction="none".

    `keep` (B, T) bool marks the ids that count (caption tokens: not bos, eos or padding). An image-level
    objective: which words the caption holds, in any order (shape, colour and size detectors learn from it fast).
    """
    if reduction not in (*REDUCTIONS, "none"):
        raise ValueError(f"bag_of_words_loss: reduction={reduction!r}; expected mean, sum or none")
    B, V = logits.shape
    target = torch.zeros(B, V, device=logits.device, dtype=logits.dtype)
    target.scatter_add_(1, input_ids.clamp(0, V - 1), keep.to(logits.dtype))
    target = (target > 0).to(logits.dtype)
    target = target / target.sum(-1, keepdim=True).clamp(min=1)
    per_row = -(target * logits.log_softmax(-1)).sum(-1)
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.mean()


def same_caption(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *, gather: bool = False
) -> torch.Tensor:
    """(B, B) bool: captions i and j are the same token sequence (padding ignored); (N, N) over every process's
    captions in rank order with gather=True (processes may pad to different lengths)."""
    ids = input_ids if attention_mask is None else input_ids.masked_fill(~attention_mask.bool(), -1)
    if gather and _process_group_active():
        length = torch.tensor([ids.shape[1]], dtype=torch.long, device=ids.device)
        dist.all_reduce(length, op=dist.ReduceOp.MAX)
        ids = gather_rows(F.pad(ids, (0, int(length) - ids.shape[1]), value=-1))
    return (ids[:, None, :] == ids[None, :, :]).all(-1)


@torch.no_grad()
def zero_shot_retrieval_accuracy(
    model: CLIPModel,
    images: torch.Tensor,
    texts: torch.Tensor,
    *,
    aspect_ratio_ids: torch.Tensor | None = None,
    aspect_ratio_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """Top-1 retrieval accuracy within the given pairs (image i belongs with text i).

    images -> texts: image i is right if its most similar text is text i or an identical caption;
    texts -> images: text j is right if its most similar image's caption equals text j. (Identical captions,
    frequent in a small synthetic world, would otherwise make a perfect model look wrong.)
    Returns {"image_to_text": float, "text_to_image": float}; the model is run in eval mode.
    """
    was_training = model.training
    model.eval()
    try:
        image_emb = model.encode_image(images, aspect_ratio_ids, aspect_ratio_mask)  # (B, E)
        text_emb = model.encode_text(texts, attention_mask)  # (B, E)
    finally:
        model.train(was_training)
    sim = image_emb @ text_emb.T  # (B, B)
    same = same_caption(texts, attention_mask).to(sim.device)  # (B, B)
    idx = torch.arange(sim.shape[0], device=sim.device)
    i2t = same[idx, sim.argmax(1)].float().mean()
    t2i = same[sim.argmax(0), idx].float().mean()
    return {"image_to_text": float(i2t), "text_to_image": float(t2i)}
