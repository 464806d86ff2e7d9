"""`mm plan`'s video formula (`mm.app.plan_activations_video`) against what autograd saves on the real temporal
aggregator (bf16 on the CPU) at two tiny sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mm.stages  # noqa: F401  (registers every stage)
from mm.adapters import TemporalAggregator
from mm.app import plan as P
from mm.app import plan_activations_video as V
from mm.models.media import MediaInput
from tests.mm.test_plan import materialize, saved_bytes
from tests.mm.test_plan_stages import configs  # noqa: F401  (the stage configs over tiny data and an image bundle)


@pytest.mark.parametrize("motion", [True, False])
@pytest.mark.parametrize(
    ("D", "merge", "L", "depth", "A", "mult", "frames", "N"),
    [(64, 2, 8, 1, 4, 4, 4, 10), (96, 4, 4, 2, 2, 2, 8, 9)],
)
def test_aggregator_formula_is_what_autograd_saves(D, merge, L, depth, A, mult, frames, N, motion):
    torch.manual_seed(0)
    agg = TemporalAggregator(
        D,
        merge,
        n_latents=L,
        depth=depth,
        n_heads=A,
        ffn_mult=mult,
        max_frames=16,
        max_tokens=N,
        motion=motion,
    ).to(torch.bfloat16)
    x = torch.randn(1, frames, N, D, dtype=torch.bfloat16)  # frozen image-encoder features: no gradient
    got = saved_bytes(lambda: agg(x, torch.ones(1, N, dtype=torch.bool)), [*agg.parameters(), x])
    X, lat = frames * N, frames // merge * L
    # the CPU keeps LayerNorm statistics in bf16 (4 B per token), CUDA in fp32 (8 B): the formula's; LayerNorms
    # over the frame tokens: 1 + depth, over the latents: 2 x depth + 1
    cpu = 4 * X * (1 + depth) + 4 * lat * (2 * depth + 1)
    assert got == V.aggregator_bytes(D, mult, A, depth, X, lat, motion) - cpu


def test_whole_step_activations_match_autograd_for_video(configs):  # noqa: F811  (the fixture)
    """The per-sample sum of the plan's video parts against everything one loss's forward saves (within 2%)."""
    st = P.load_stage(str(configs["video"][0]))
    m = materialize(st)
    parts, _ = P.activation_bytes(st, 48, "none")
    assert set(parts) == {"video_aggregator", "cross_attention", "lm_layers", "logits"}
    frames, tiles = st.cfg.data.n_frames, st.image_meta["max_tiles"]
    N = tiles * m.image_encoder.num_tokens_per_tile
    B, T, D = 2, 48, m.lm.cfg.dim
    feats = torch.randn(B, frames, N, D, dtype=torch.bfloat16)
    tok = torch.randint(0, m.lm.cfg.vocab_size, (B, T))
    G = frames // m.video_aggregator.merge
    xmask = torch.ones(B, T, 1, G, dtype=torch.long)
    xmask[:, :5] = 0

    def video_loss():
        video = m.encode_video(frame_features=feats, tile_mask=torch.ones(B, tiles, dtype=torch.bool))
        logits = m(tok, {"video": MediaInput(video, xmask)})
        return F.cross_entropy(logits.float().flatten(0, 1), tok.flatten(), reduction="sum")

    got = saved_bytes(video_loss, [*m.parameters(), *m.buffers()])
    assert got / B == pytest.approx(sum(parts.values()), rel=0.02)
