"""The chunked LM loss (`mm.lm.loss`): the whole computation's loss and gradients, with no whole logits kept for
the backward (each chunk's head recomputed there, one chunk at a time)."""

import pytest
import torch
import torch.nn.functional as F

from mm.lm import Transformer, preset
from mm.lm.loss import head_cross_entropy

B, T = 2, 24


def model_and_batch(**kw):
    torch.manual_seed(0)
    m = Transformer(preset("nano", **kw))
    tokens = torch.randint(0, m.cfg.vocab_size, (B, T))
    labels = tokens.roll(-1, 1)
    labels[0, :7] = -100  # a prompt: whole chunks of ignored labels at small chunk sizes
    labels[:, -1] = -100
    return m, tokens, labels


def loss_and_grads(m, tokens, labels, chunk=None):
    """(loss, gradients by name): `chunk` None = the plain reference on the logits, else `labels=` + chunk."""
    m.zero_grad(set_to_none=True)
    if chunk is None:
        logits = m(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    else:
        loss = m(tokens, labels=labels, loss_chunk=chunk)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_and_gradients_equal_the_whole(tied):
    m, tokens, labels = model_and_batch(tie_embeddings=tied)
    ref_loss, ref_grads = loss_and_grads(m, tokens, labels)
    assert ref_loss > 0
    for chunk in (0, 1, 5, 16, B * T - 1, B * T, 1000):  # whole, ragged last chunk, one chunk, more than all
        loss, grads = loss_and_grads(m, tokens, labels, chunk)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=f"{name}, chunk {chunk}")


def test_chunks_keep_no_logits_for_the_backward_and_recompute_one_chunk_at_a_time():
    m, tokens, labels = model_and_batch()
    n, V = B * T, m.cfg.vocab_size
    calls = []
    m.output.register_forward_hook(lambda mod, args, out: calls.append(tuple(out.shape)))

    def saved_shapes(chunk):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        calls.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = m(tokens, labels=labels, loss_chunk=chunk)
        forward_calls = list(calls)
        loss.backward()
        return shapes, forward_calls, calls[len(forward_calls) :]

    whole, fwd, bwd = saved_shapes(0)
    assert (n, V) in whole and fwd == [(n, V)] and bwd == []  # the whole float32 log-probabilities are kept
    chunked, fwd, bwd = saved_shapes(10)
    assert not [s for s in chunked if V in s]  # nothing of vocabulary width is kept for the backward
    assert fwd == [(10, V)] * 4 + [(8, V)]  # 48 tokens in chunks of 10
    assert sorted(bwd) == sorted(fwd)  # the backward recomputes each chunk's logits once


def test_without_autograd_chunks_equal_the_whole():
    m, tokens, labels = model_and_batch()
    with torch.no_grad():
        whole = m(tokens, labels=labels)
        torch.testing.assert_close(m(tokens, labels=labels, loss_chunk=7), whole, rtol=1e-5, atol=1e-4)


def test_bad_chunk_or_labels_are_refused():
    m, tokens, labels = model_and_batch()
    with pytest.raises(ValueError, match=r"train.loss_chunk\) must be >= 0 tokens"):
        m(tokens, labels=labels, loss_chunk=-1)
    with pytest.raises(ValueError, match=r"labels of shape \(2, 23\) do not match the hidden states"):
        m(tokens, labels=labels[:, :-1], loss_chunk=4)
    h = torch.randn(3, 5, 8)
    with pytest.raises(ValueError, match=r"expected \(3, 5\)"):
        head_cross_entropy(torch.nn.Linear(8, 4), h, torch.zeros(3, 4, dtype=torch.long), 2)
