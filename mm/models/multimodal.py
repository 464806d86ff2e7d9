"""`MultimodalLM`: the frozen LM composed with media encoders and gated cross-attention adapters
(Llama 3 paper §7; torchtune's `DeepFusionModel` states in one line what trains).

The LM's own layers run unchanged; before every k-th LM layer (k=4 by default: before layers 3, 7, 11, ...),
or before the LM layers listed in `xattn_layers`, a `CrossAttentionBlock` lets the text attend to the media
tokens. With every gate at 0 the text logits equal the bare LM's exactly, with or without media. During
generation the media's K/V for every cross-attention layer are computed once per prompt (`encode_media`) and
passed to each step in a `MediaContext`, the media counterpart of the KV cache. `forward_hf` takes the tensors
of transformers' `MllamaProcessor` (Llama 3.2 Vision checkpoints load through `mm.formats.hf_mllama`).

Media are keyed by modality (`mm.models.media.MODALITIES`): `forward(tokens, media={"image": MediaInput(...),
"video": ...})`; each entry names its parts, its cross-attention blocks, its placeholder token and the method
that builds its context, so a new modality adds an entry (and its modules), not forward arguments.

Video (paper §7.5, `paper-notes.md` §4): with a `video_aggregator`, each frame goes through the image encoder,
a `TemporalAggregator` merges every M consecutive frames into one effective frame, and video cross-attention
blocks (the same gated block, their own `<|video|>` token and mask) sit before the image cross-attention block
of the LM layers in `video_xattn_layers` (by default every 4th image cross-attention layer). With the video
gates at 0 the model's outputs equal the image model's exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mm.lm import KVCache, Transformer
from mm.lm.checks import check_on_host_or_async
from mm.lm.config import LMConfig
from mm.models.media import MODALITIES, MediaContext, MediaInput, Modality, media_mask, scatter_kv
from mm.models.placement import (
    check_xattn_layers,
    video_xattn_layer_ids,
    xattn_blocks,
    xattn_layer_ids,
)

__all__ = [
    "MediaContext",
    "MediaInput",
    "MultimodalLM",
    "check_xattn_layers",
    "video_xattn_layer_ids",
    "xattn_layer_ids",
]

# Everything that maps an image (or a video frame) to the LM: frozen in the video stage.
IMAGE_PATH_PARTS = MODALITIES["image"].parts
VIDEO_PARTS = MODALITIES["video"].parts
PARTS = ("lm", *IMAGE_PATH_PARTS, *VIDEO_PARTS)


class MultimodalLM(nn.Module):
    """Frozen LM + image encoder + gated cross-attention blocks; `trainable` names the parts that train.

    `xattn_layers` (LM layer indices) overrides the every-k-th placement. `extra_tokens` > 0 adds that many
    token embeddings after the LM's vocabulary (ids V .. V+extra_tokens-1; Llama 3.2 Vision has 8, `<|image|>`
    among them: Meta's `learnable_embedding`); they are outside the frozen LM and train when
    "extra_tok_embeddings" is in `trainable`. Logits stay over the LM's V ids. A `video_aggregator` adds the
    video path (module docstring): "video_aggregator" and "video_xattn" are its trainable parts.
    """

    def __init__(
        self,
        lm: Transformer,
        image_encoder: nn.Module | None = None,
        *,
        xattn_every: int = 4,
        xattn_layers: Sequence[int] | None = None,
        hf_row_compat: bool = False,
        trainable: tuple[str, ...] = ("image_encoder", "image_xattn"),
        image_token_id: int | None = None,
        extra_tokens: int = 0,
        video_aggregator: nn.Module | None = None,
        video_xattn_layers: Sequence[int] | None = None,
        video_token_id: int | None = None,
        image_aux: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if "lm" in trainable:
            raise ValueError("the LM is never trainable in a multimodal stage (remove 'lm' from trainable)")
        unknown = sorted(set(trainable) - set(PARTS))
        if unknown:
            raise ValueError(f"unknown trainable parts {unknown}; allowed: {list(PARTS[1:])}")
        self.lm = lm
        self.image_encoder = image_encoder
        self.image_token_id = image_token_id
        c: LMConfig = lm.cfg
        self.xattn_every = xattn_every
        if xattn_layers is None:
            self.xattn_layers = xattn_layer_ids(c.n_layers, xattn_every)
        else:
            self.xattn_layers = check_xattn_layers(xattn_layers, c.n_layers)
        self.image_xattn = xattn_blocks(c, self.xattn_layers, hf_row_compat)
        if extra_tokens < 0:
            raise ValueError(f"extra_tokens must be >= 0, got {extra_tokens}")
        self.extra_tok_embeddings = nn.Embedding(extra_tokens, c.dim) if extra_tokens else None
        if self.extra_tok_embeddings is not None:
            nn.init.normal_(self.extra_tok_embeddings.weight, std=c.init_std)
        self.image_aux = image_aux  # training-only head on the media tokens (adapters.CaptionSlotHead)
        self.image_index: nn.Embedding | None = None  # which image of a row a media token belongs to
        self.video_aggregator = video_aggregator
        self.video_token_id = video_token_id
        self.video_xattn: nn.ModuleDict | None = None
        self.video_xattn_layers: list[int] = []
        if video_aggregator is not None:
            if video_xattn_layers is None:
                self.video_xattn_layers = video_xattn_layer_ids(self.xattn_layers, 4)
            else:
                self.video_xattn_layers = check_xattn_layers(video_xattn_layers, c.n_layers)
            self.video_xattn = xattn_blocks(c, self.video_xattn_layers, hf_row_compat)
        elif video_xattn_layers is not None:
            raise ValueError("video_xattn_layers given without a video_aggregator")
        self.set_trainable(trainable)

    @property
    def cfg(self) -> LMConfig:
        """The LM's config (so LM utilities such as `generate` and `KVCache.for_model` apply)."""
        return self.lm.cfg

    @property
    def input_vocab_size(self) -> int:
        """Number of token ids the model embeds: the LM's vocabulary plus the extra tokens."""
        n_extra = 0 if self.extra_tok_embeddings is None else self.extra_tok_embeddings.num_embeddings
        return self.lm.cfg.vocab_size + n_extra

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> (B, T, D): ids below V from the LM's table, V.. from the extra embeddings."""
        if self.extra_tok_embeddings is None:
            return self.lm.embed(tokens)
        V, n = self.lm.cfg.vocab_size, self.input_vocab_size
        if tokens.numel():
            what = f"[0, {n}) (LM vocabulary {V} + extra tokens)"

            def detail() -> str:
                return f"token id {int(tokens[(tokens < 0) | (tokens >= n)][0])} is outside {what}"

            check_on_host_or_async(
                ((tokens >= 0) & (tokens < n)).all(), f"a token id is outside {what}", detail
            )
        extra = tokens >= V
        h = self.lm.tok_embeddings(tokens.masked_fill(extra, 0))  # (B, T, D)
        return torch.where(extra[..., None], self.extra_tok_embeddings((tokens - V).clamp(min=0)), h)

    def set_trainable(self, trainable: tuple[str, ...]) -> None:
        """Name the parts that train (the LM never does), or a module inside one (`image_encoder.project`: the
        encoder's projection only); the trainer sets `requires_grad` from `trainable_named_parameters`."""
        if any(t.split(".")[0] == "lm" for t in trainable):
            raise ValueError("the LM is never trainable in a multimodal stage (remove 'lm' from trainable)")
        unknown = sorted(t for t in trainable if t.split(".")[0] not in PARTS)
        if unknown:
            raise ValueError(
                f"unknown trainable parts {unknown}; allowed: {list(PARTS[1:])} or modules inside them"
            )
        self.trainable = tuple(trainable)
        self.lm.eval()

    def train(self, mode: bool = True) -> MultimodalLM:
        """Train mode for the trainable parts; the frozen LM and every other frozen part stay in eval mode."""
        super().train(mode)
        self.lm.eval()
        for name in PARTS[1:]:
            part = getattr(self, name)
            if part is not None and name not in self.trainable:
                part.eval()
        return self

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the trainable parts only."""
        return [
            (n, p)
            for n, p in self.named_parameters()
            if any(n == t or n.startswith(f"{t}.") for t in self.trainable)
        ]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Every non-LM tensor (what an adapter checkpoint holds)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("lm.")}

    def add_image_index(self, slots: int) -> None:
        """Give each of up to `slots` images of a row a learned vector added to its media tokens, so that the
        text can tell the first image from the second (cross-attention itself is blind to order). Zero at the
        start: the model's outputs are unchanged until it trains (part "image_index")."""
        if slots < 1:
            raise ValueError(f"image slots must be >= 1, got {slots}")
        self.image_index = nn.Embedding(slots, self.lm.cfg.dim)
        nn.init.zeros_(self.image_index.weight)

    # ---- media --------------------------------------------------------------------------------------
    def encode_media(
        self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor
    ) -> MediaContext:
        """Run the image encoder once and compute each cross-attention layer's K/V."""
        if self.image_encoder is None:
            raise ValueError("this model has no image encoder")
        media = self.image_encoder(pixel_values, aspect_ratio_ids, aspect_ratio_mask)  # (B, N, tiles*P, D)
        if self.image_index is not None:
            n, slots = media.shape[1], self.image_index.num_embeddings
            if n > slots:
                raise ValueError(f"{n} images in a row; this model tells apart at most {slots} (image_index)")
            media = media + self.image_index.weight[:n, None, :].to(media.dtype)
        B = media.shape[0]
        media = media.reshape(B, -1, media.shape[-1])
        kv = {int(i): blk.media_kv(media) for i, blk in self.image_xattn.items()}
        extra = {"tile_mask": aspect_ratio_mask, "aspect_ratio_ids": aspect_ratio_ids}
        if self.image_aux is not None and self.training:  # the auxiliary head reads the media tokens
            extra["media"] = media
        return MediaContext(
            kv=kv,
            n_media_tokens=media.shape[1],
            tokens_per_tile=self.image_encoder.num_tokens_per_tile,
            extra=extra,
        )

    def video_frame_features(
        self,
        video_frames: torch.Tensor,
        video_aspect_ratio_ids: torch.Tensor,
        video_aspect_ratio_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The image encoder on every frame: (B, F, T, 3, S, S), (B, F), (B, F, T) -> (B, F, T * P, D)."""
        if self.image_encoder is None:
            raise ValueError("this model has no image encoder")
        return self.image_encoder(video_frames, video_aspect_ratio_ids, video_aspect_ratio_mask)

    def encode_video(
        self,
        video_frames: torch.Tensor | None = None,
        video_aspect_ratio_ids: torch.Tensor | None = None,
        video_aspect_ratio_mask: torch.Tensor | None = None,
        *,
        frame_features: torch.Tensor | None = None,
        tile_mask: torch.Tensor | None = None,
    ) -> MediaContext:
        """Frames (or their image-encoder features (B, F, T*P, D) with tile_mask (B, T)) -> aggregated video K/V."""
        if self.video_aggregator is None or self.video_xattn is None:
            raise ValueError("this model has no video path (build it with a video_aggregator)")
        if frame_features is None:
            if video_frames is None or video_aspect_ratio_ids is None or video_aspect_ratio_mask is None:
                raise ValueError("encode_video needs video_frames with their aspect-ratio ids and mask")
            frame_features = self.video_frame_features(
                video_frames, video_aspect_ratio_ids, video_aspect_ratio_mask
            )
            tile_mask = video_aspect_ratio_mask[:, 0]  # every frame of a clip has the same grid
        token_mask = None
        if tile_mask is not None:
            per_tile = frame_features.shape[2] // tile_mask.shape[1]
            token_mask = tile_mask.bool().repeat_interleave(per_tile, dim=1)  # (B, T*P)
        agg = self.video_aggregator(frame_features, token_mask)  # (B, G, L, D)
        B, G, L, D = agg.shape
        media = agg.reshape(B, G * L, D)
        kv = {int(i): blk.media_kv(media) for i, blk in self.video_xattn.items()}
        tiles = torch.ones(
            B, 1, G, dtype=torch.long, device=media.device
        )  # one "image" of G effective frames
        return MediaContext(
            kv=kv, n_media_tokens=G * L, tokens_per_tile=L, extra={"tile_mask": tiles, "aggregated": agg}
        )

    def modalities(self) -> list[str]:
        """The modalities this model has (those with cross-attention blocks), in the order their blocks run."""
        return [name for name, m in MODALITIES.items() if getattr(self, m.xattn) is not None]

    def modality(self, name: str) -> Modality:
        """The `MODALITIES` entry of one of this model's modalities (ValueError for any other name)."""
        if name not in self.modalities():
            raise ValueError(f"{name} given to a model without a {name} path (it has {self.modalities()})")
        return MODALITIES[name]

    def encode(self, modality: str, *inputs: torch.Tensor | None, **kw: torch.Tensor) -> MediaContext:
        """A modality's context from its encoder inputs (its `MODALITIES` entry names the method)."""
        return getattr(self, self.modality(modality).encode)(*inputs, **kw)

    # ---- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        media: Mapping[str, MediaInput] | None = None,
        *,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        labels: torch.Tensor | None = None,
        loss_chunk: int = 0,
    ) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) of the last position with `last_only`; with `labels` (B, T) the summed
        cross-entropy instead (`Transformer.head_loss`, `loss_chunk` tokens at a time). `media` maps a modality
        ("image", "video") to its `MediaInput`: a precomputed context (`encode`) and optionally its mask."""
        h = self.embed(tokens)
        B, T, _ = h.shape
        ctx = self.lm.context(
            B, T, device=h.device, positions=positions, attention_mask=attention_mask, cache=cache
        )
        joins = self._joins(tokens, media or {}, cache)
        for i, layer in enumerate(self.lm.layers):
            for blocks, kv, mask in joins:  # in `MODALITIES` order: the video block before the image block
                if str(i) in blocks:
                    h = blocks[str(i)](h, kv[i], mask)
            h = layer(h, ctx)
        if cache is not None:
            cache.advance(T)
        if labels is not None:
            return self.lm.head_loss(h, labels, loss_chunk)
        return self.lm.head(h[:, -1:] if last_only else h)

    def _joins(
        self, tokens: torch.Tensor, media: Mapping[str, MediaInput], cache: KVCache | None
    ) -> list[tuple[nn.ModuleDict, dict[int, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]]:
        """(blocks, K/V, per media token mask) of each given modality, in the order their blocks run."""
        for name in media:
            self.modality(name)
        joins = []
        for name, m in MODALITIES.items():
            if name not in media:
                continue
            given = media[name]
            kv = given.context.kv
            if given.rows is not None:
                if given.mask is None:
                    raise ValueError(f"{name} given for some rows (`rows`) needs its mask over every row")
                kv = scatter_kv(kv, given.rows, tokens.shape[0])
            mask = media_mask(tokens, given, cache, getattr(self, m.token_id), name)
            joins.append((getattr(self, m.xattn), kv, mask))
        return joins

    def forward_hf(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for `MllamaProcessor`'s tensors, as `MllamaForConditionalGeneration.forward`.

        Without `pixel_values` the cross-attention layers are skipped (text only), as transformers. Without a
        `cross_attention_mask` the processor's mask is derived from the `<|image|>` tokens (transformers' SDPA
        path would instead apply a causal mask to the cross-attention, a default no processor output hits).
        Text rows whose mask row is all zero (tokens before the first image) follow `hf_row_compat`: False
        (default) gives them no cross-attention output, as Meta's reference; True reproduces transformers
        (they attend to every media token and only the FFN part is zeroed, transformers issue #39379). Both
        agree on every row that sees an image, but a causal LM carries a difference at those rows into the
        later tokens of the same sequence.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        if pixel_values is None:
            return self(input_ids, attention_mask=attention_mask)
        if aspect_ratio_ids is None or aspect_ratio_mask is None:
            raise ValueError(
                "pixel_values need aspect_ratio_ids and aspect_ratio_mask (MllamaProcessor output)"
            )
        if cross_attention_mask is None and self.image_token_id is None:
            raise ValueError("pass cross_attention_mask: this model has no image_token_id to derive it from")
        want = (*input_ids.shape, *pixel_values.shape[1:3])
        if cross_attention_mask is not None and tuple(cross_attention_mask.shape) != want:
            raise ValueError(
                f"cross_attention_mask has shape {tuple(cross_attention_mask.shape)}, expected {want} "
                "(B, T, images, max_tiles)"
            )
        image = self.encode("image", pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        return self(
            input_ids, {"image": MediaInput(image, cross_attention_mask)}, attention_mask=attention_mask
        )
