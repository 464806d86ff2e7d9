"""The perceiver-resampler temporal aggregator: every M consecutive frames become one effective frame of L
latent tokens; groups are independent; frame order matters (time embeddings); padding tokens are ignored."""

import pytest
import torch

from mm.adapters import TemporalAggregator


def test_merges_every_m_frames_into_one_effective_frame():
    agg = TemporalAggregator(16, merge=4, n_latents=5, depth=2, n_heads=4, max_frames=16).eval()
    x = torch.randn(2, 8, 6, 16)
    out = agg(x)
    assert out.shape == (2, 2, 5, 16) and agg.n_groups(8) == 2
    with pytest.raises(ValueError, match="multiple of merge=4"):
        agg(torch.randn(1, 6, 6, 16))
    with pytest.raises(ValueError, match="max_frames=16"):
        agg.n_groups(20)


def test_groups_are_independent_and_frame_order_matters():
    """Order within a group reaches the output only through the per-frame time embeddings: swapping two frames of
    one group changes that group's output, swapping the frames together with their time embeddings gives the
    output back exactly, and with the time embeddings removed the aggregator is blind to the order."""
    torch.manual_seed(0)
    agg = TemporalAggregator(16, merge=4, n_latents=3, depth=1, n_heads=2).eval()
    x = torch.randn(1, 8, 6, 16)
    with torch.no_grad():
        out = agg(x)
        y = x.clone()
        y[:, 4:] = torch.randn(1, 4, 6, 16)  # change only the second group's frames
        out_y = agg(y)
        torch.testing.assert_close(out_y[:, 0], out[:, 0], rtol=0, atol=1e-6)
        assert (out_y[:, 1] - out[:, 1]).abs().max() > 1e-2
        perm = [1, 0, 2, 3, 4, 5, 6, 7]  # frames 0 and 1 swapped: the same set of frames in group 0
        swapped = agg(x[:, perm])
        assert (swapped[:, 0] - out[:, 0]).abs().max() > 1e-2
        torch.testing.assert_close(swapped[:, 1], out[:, 1], rtol=0, atol=1e-6)
        # Frame f gets time embedding f: moving the embeddings with the frames is the same computation.
        agg.time_embed[:8] = agg.time_embed[perm].clone()
        torch.testing.assert_close(agg(x[:, perm]), out, rtol=0, atol=1e-5)
        # Without time embeddings the same swap changes nothing: the check above is what would catch an
        # aggregator that ignores the order of the frames in a group.
        agg.time_embed.zero_()
        torch.testing.assert_close(agg(x[:, perm]), agg(x), rtol=0, atol=1e-5)


def test_padding_tokens_do_not_change_the_output():
    agg = TemporalAggregator(16, merge=2, n_latents=3, depth=2, n_heads=2).eval()
    x = torch.randn(2, 4, 6, 16)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    with torch.no_grad():
        out = agg(x, mask)
        y = x.clone()
        y[1, :, 3:] = 1e3 * torch.randn(4, 3, 16)  # garbage in the padding tokens of sample 1
        torch.testing.assert_close(agg(y, mask), out, rtol=0, atol=1e-5)
        torch.testing.assert_close(agg(x[1:, :, :3]), out[1:], rtol=0, atol=1e-5)


def test_space_embedding_makes_token_position_visible():
    """Without it the latents pool a frame's tokens as a set; with it, the same object at another place differs."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, 16)
    moved = x.roll(2, dims=2)  # every frame's tokens shifted by two positions: same contents, new places
    plain = TemporalAggregator(16, merge=4, n_latents=3, depth=2, n_heads=2).eval()
    spatial = TemporalAggregator(16, merge=4, n_latents=3, depth=2, n_heads=2, max_tokens=8).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(moved), plain(x), rtol=0, atol=1e-5)
        assert (spatial(moved) - spatial(x)).abs().max() > 1e-2
        with pytest.raises(ValueError, match="max_tokens=8"):
            spatial(torch.randn(1, 4, 9, 16))


def test_motion_term_sees_only_changes_between_frames():
    """motion=True starts as the plain aggregator (zero projection); trained, it changes the output of a moving
    clip but not of a static one (the frame differences are zero there)."""
    torch.manual_seed(0)
    agg = TemporalAggregator(16, merge=4, n_latents=3, depth=2, n_heads=2, max_tokens=6, motion=True).eval()
    moving = torch.randn(1, 4, 6, 16)
    static = moving[:, :1].expand(1, 4, 6, 16).clone()
    with torch.no_grad():
        start = agg(moving), agg(static)
        torch.nn.init.normal_(agg.motion.weight)
        after = agg(moving), agg(static)
        agg.motion = None  # the same weights without the motion term
        plain = agg(moving), agg(static)
    torch.testing.assert_close(start[0], plain[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(after[1], plain[1], rtol=0, atol=1e-6)
    assert (after[0] - plain[0]).abs().max() > 1e-2


def test_video_text_contrastive_loss_prefers_the_matching_captions():
    """The video stage's contrastive term: low when each clip's pooled latents point at its own caption's mean
    token embedding, high when they point at other captions; identical captions share the positive."""
    from types import SimpleNamespace

    from mm.stages.video import VideoStage

    torch.manual_seed(0)
    emb = torch.nn.Embedding(20, 16)
    agg = TemporalAggregator(16, merge=1, n_latents=2, depth=1, n_heads=2, text_align=True)
    with torch.no_grad():
        agg.align.weight.copy_(torch.eye(16))
        agg.align_log_scale.fill_(3.0)
    task = VideoStage.__new__(VideoStage)
    task.rank = 0
    task.model = SimpleNamespace(lm=SimpleNamespace(tok_embeddings=emb), video_aggregator=agg)
    labels = torch.tensor([[3, 4, -100], [5, 6, 7], [3, 4, -100], [8, 9, -100]])  # rows 0 and 2: same caption
    real = labels != -100
    text = (emb(labels.clamp(min=0)) * real[..., None]).sum(1) / real.sum(1, keepdim=True)
    matched = text.detach()[:, None, None, :].expand(4, 1, 2, 16)
    with torch.no_grad():
        good = task.contrastive_loss(matched, labels).mean()
        bad = task.contrastive_loss(matched[[1, 3, 1, 0]], labels).mean()
    assert float(good) < 0.5 * float(bad), (float(good), float(bad))
    # rows 0 and 2 are one caption: a clip of it scores both equally, so the loss cannot reach 0 but is minimal
    assert float(good) > 0.0
    from mm.stages.video import AggregatorConfig

    with pytest.raises(ValueError, match="aggregator.contrastive must be >= 0"):
        AggregatorConfig(contrastive=-0.5)
