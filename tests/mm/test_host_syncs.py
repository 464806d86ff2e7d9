"""No host sync on the training path: the speech splice, CTC compression and CTC loss are branch-free and give the
values of the branching versions they replace (on the cases that hit each branch); the input checks keep their
errors on the CPU and on CUDA queue a device-side assertion instead (`mm.lm.checks`); and a training forward and
backward of the speech stage's model, the LM loss and the CLIP loss read no tensor value on the host."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mm.adapters.speech import SpeechAdapterConfig
from mm.encoders.clip import _right_padded_lengths, clip_loss
from mm.encoders.speech import BestRQ, BestRQConfig, SpeechEncoder, SpeechEncoderConfig
from mm.lm import Transformer, checks, preset
from mm.lm.checks import check_on_host_or_async
from mm.models.speech import SpeechLM
from mm.stages.speech import SpeechStageConfig, build_speech_model

# what reads a device value on the host: .item()/bool()/int() (_local_scalar_dense), boolean-mask indexing
# (nonzero), torch.equal
HOST_READS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero"}


class HostReads(TorchDispatchMode):
    """Records the operations of HOST_READS that run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def speech_model(ctc_compress: bool = True) -> SpeechLM:
    torch.manual_seed(0)
    lm = Transformer(preset("nano"))
    cfg = SpeechStageConfig(
        speech_encoder=SpeechEncoderConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, dropout=0.0),
        adapter=SpeechAdapterConfig(dim=32, n_heads=2, ffn_dim=64, ctc_weight=0.5, ctc_compress=ctc_compress),
    )
    return build_speech_model(cfg, lm)


# ---- the branching versions these replace (the code before), as references -------------------------------
def splice_before(embeds, slots, speech, counts):
    valid = torch.arange(speech.shape[1])[None, :] < counts[:, None]
    out = embeds.clone()
    out[slots] = speech[valid].to(embeds.dtype)
    return out


def kept_frames_before(model, speech, counts):
    logits, _, keep = model.ctc_greedy(speech, counts)
    blank = logits.shape[-1] - 1
    in_row = torch.arange(keep.shape[1])[None, :] < counts[:, None]
    empty = ~keep.any(1)
    if bool(empty.any()):
        blank_logp = logits.float().log_softmax(-1)[..., blank].masked_fill(~in_row, float("inf"))
        keep[empty, blank_logp[empty].argmin(1)] = True
    return keep


def ctc_loss_before(model, speech, counts, targets, target_lengths):
    rows = target_lengths > 0
    if not bool(rows.any()):
        return speech.sum() * 0.0
    logits = model.speech_adapter.ctc_logits(speech[rows], model.lm.tok_embeddings.weight)
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)
    return F.ctc_loss(
        log_probs,
        targets[rows],
        counts[rows],
        target_lengths[rows],
        blank=logits.shape[-1] - 1,
        reduction="sum",
        zero_infinity=True,
    )


# ---- values ---------------------------------------------------------------------------------------------------
def test_splice_gathers_what_the_boolean_index_put_and_refuses_mismatched_counts():
    torch.manual_seed(0)
    B, T, S, D = 3, 12, 5, 8
    embeds = torch.randn(B, T, D)
    counts = torch.tensor([5, 0, 3])  # a row with no speech at all
    slots = torch.zeros(B, T, dtype=torch.bool)
    slots[0, 2:7] = True
    slots[2, [1, 4, 9]] = True  # slots need not be contiguous
    speech = torch.randn(B, S, D, requires_grad=True)
    got = SpeechLM.splice(embeds, slots, speech, counts)
    (g_got,) = torch.autograd.grad((got * torch.arange(T)[None, :, None]).sum(), speech)
    want = splice_before(embeds, slots, speech, counts)
    (g_want,) = torch.autograd.grad((want * torch.arange(T)[None, :, None]).sum(), speech)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=0)
    assert not torch.equal(got, embeds)
    with pytest.raises(
        ValueError, match=r"speech slots per row \[5, 0, 3\] != speech embeddings \[5, 1, 3\]"
    ):
        SpeechLM.splice(embeds, slots, speech, torch.tensor([5, 1, 3]))
    with pytest.raises(ValueError, match="do not match the embeddings"):
        SpeechLM.splice(embeds, slots[:, :-1], speech, counts)


def test_kept_frames_keep_the_least_blank_frame_of_an_all_blank_row_as_before():
    model = speech_model()
    emb, blank = model.lm.tok_embeddings.weight.detach(), model.speech_adapter.ctc_blank.detach()
    with torch.no_grad():
        model.speech_adapter.ctc_log_scale.fill_(3.0)
    torch.manual_seed(1)
    speech = torch.stack(
        [
            blank + 0.3 * torch.randn(6, blank.shape[0]) * blank.abs().mean(),  # every frame blank
            torch.stack([emb[3], blank, emb[7], emb[7], blank, emb[9]]),  # three labels start
        ]
    )
    counts = torch.tensor([5, 6])  # row 0's last frame is padding: never chosen
    _, best, starts = model.ctc_greedy(speech, counts)
    assert not starts[0].any() and starts[1].sum() == 3  # the branch is hit on row 0 only
    got = model.kept_frames(speech, counts)
    assert torch.equal(got, kept_frames_before(model, speech, counts))
    assert int(got[0].sum()) == 1 and int(got[0].nonzero()) < 5
    assert torch.equal(got[1], starts[1])


@pytest.mark.parametrize("lengths", [[4, 0, 2], [0, 0, 0], [3, 3, 1]])
def test_ctc_loss_masks_rows_without_transcript_as_skipping_them_did(lengths):
    model = speech_model()
    torch.manual_seed(2)
    speech = torch.randn(3, 9, model.lm.cfg.dim, requires_grad=True)
    counts = torch.tensor([9, 7, 8])
    targets = torch.randint(0, model.lm.cfg.vocab_size, (3, 4))
    target_lengths = torch.tensor(lengths)
    got = model.ctc_loss(speech, counts, targets, target_lengths)
    (g_got,) = torch.autograd.grad(got, speech)
    want = ctc_loss_before(model, speech, counts, targets, target_lengths)
    (g_want,) = torch.autograd.grad(want, speech)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)
    assert (float(got.detach()) > 0) == any(lengths)
    assert g_got[torch.tensor(lengths) == 0].abs().sum() == 0  # a row without transcript gets no gradient


# ---- checks -----------------------------------------------------------------------------------------------------
def test_checks_raise_on_the_cpu_and_queue_a_device_assertion_on_cuda(monkeypatch):
    check_on_host_or_async(torch.tensor(True), "never")
    with pytest.raises(ValueError, match="^static text$"):
        check_on_host_or_async(torch.tensor([False]), "static text")
    with pytest.raises(RuntimeError, match="^fuller 3$"):
        check_on_host_or_async(torch.tensor(False), "static", lambda: f"fuller {3}", error=RuntimeError)
    with pytest.raises(ValueError, match="one-element condition"):
        check_on_host_or_async(torch.tensor([True, True]), "x")
    queued = []
    monkeypatch.setattr(checks, "asserts_on_device", lambda t: True)  # as a CUDA tensor
    monkeypatch.setattr(torch, "_assert_async", lambda t, msg: queued.append((t.shape, msg)))
    with HostReads() as reads:
        check_on_host_or_async(torch.tensor([False]), "static text", lambda: pytest.fail("detail read"))
    assert queued == [(torch.Size([]), "static text")] and reads.seen == []


def test_bad_inputs_still_raise_their_errors_on_the_cpu():
    lm = Transformer(preset("nano"))
    with pytest.raises(ValueError, match=r"token id 600 is outside the vocabulary \[0, 512\) \(2 such ids"):
        lm(torch.tensor([[1, 600, 700]]))
    with pytest.raises(ValueError, match="right-padded"):
        _right_padded_lengths(torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="at least one real token"):
        _right_padded_lengths(torch.tensor([[1, 1], [0, 0]]))
    emb = F.normalize(torch.randn(3, 4), dim=-1)
    with pytest.raises(ValueError, match="every pair on the diagonal"):
        clip_loss(emb, emb, 10.0, ~torch.eye(3, dtype=torch.bool))


def test_training_forward_and_backward_read_no_device_value(monkeypatch):
    """With the checks queued as on CUDA, the speech model's training loss (splice, CTC compression, chunked LM
    loss, CTC loss with a row without transcript), the LM loss and the CLIP loss run no host read."""
    queued = []
    monkeypatch.setattr(checks, "asserts_on_device", lambda t: True)
    monkeypatch.setattr(torch, "_assert_async", lambda t, msg: queued.append(msg))
    model = speech_model(ctc_compress=True)
    B, T = 2, 24
    slots = model.n_slots(81)
    tokens = torch.randint(0, model.lm.cfg.vocab_size, (B, T))
    smask = torch.zeros(B, T, dtype=torch.bool)
    smask[:, 2 : 2 + slots] = True
    labels = tokens.roll(-1, 1).masked_fill(smask, -100)
    feats, lengths = torch.randn(B, 81, 80), torch.tensor([81, 61])
    with HostReads() as reads:
        loss, sp, counts = model(
            tokens,
            features=feats,
            feature_lengths=lengths,
            speech_mask=smask,
            return_speech=True,
            labels=labels,
            loss_chunk=16,
        )
        loss = loss + model.ctc_loss(sp, counts, tokens[:, :4], torch.tensor([4, 0]))
        loss.backward()
        lm = Transformer(preset("nano"))
        lm(tokens, labels=labels, loss_chunk=7).backward()
        img, txt = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8)
        clip_loss(
            img,
            txt,
            10.0,
            torch.eye(3, dtype=torch.bool) | torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 0]]).bool(),
        )
        _right_padded_lengths(torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert reads.seen == []
    assert len(queued) == 5  # token ids (two models), speech slots, positives' diagonal, right padding


def test_bestrq_loss_leaves_its_accuracy_on_the_device():
    """BEST-RQ's training loss reads no scalar on the host (its accuracy stays a tensor); only the gather of the
    masked frames (a boolean index: their number) remains."""
    torch.manual_seed(0)
    enc = SpeechEncoder(SpeechEncoderConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, dropout=0.0))
    m = BestRQ(enc, BestRQConfig(n_codebooks=2, codebook_size=16))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, 2:6] = True
    with HostReads() as reads:
        loss, info = m.loss(torch.randn(2, 40, 80), torch.tensor([40, 32]), mask, torch.randn(2, 10, 320))
        loss.backward()
    assert "_local_scalar_dense" not in reads.seen and set(reads.seen) <= {"nonzero"}
    acc = info["accuracy"]
    assert isinstance(acc, torch.Tensor) and acc.shape == () and 0 <= float(acc) <= 1
