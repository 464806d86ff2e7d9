"""The core decoder: published parameter counts, document masking, KV cache, input checks."""

import pytest
import torch

from mm.lm import KVCache, LMConfig, Transformer, generate, positions_in_documents, preset


def tiny(**kw) -> Transformer:
    return Transformer(preset("nano", **kw)).eval()


@pytest.mark.parametrize(
    "name,expected",
    [
        ("llama3-8b", 8_030_261_248),
        ("llama3.2-1b", 1_235_814_400),
        ("llama3.2-3b", 3_212_749_824),
        ("llama3-70b", 70_553_706_496),
        ("llama3-405b", 405_853_388_800),
    ],
)
def test_paper_presets_have_published_parameter_counts(name, expected):
    cfg = preset(name)
    assert cfg.num_params() == expected
    if name in ("llama3-8b", "llama3.2-1b"):  # built on the meta device: no memory
        with torch.device("meta"):
            model = Transformer(cfg)
        assert sum(p.numel() for p in model.parameters()) == expected


def test_paper_presets_ffn_sizes():
    assert preset("llama3-8b").hidden_dim == 14336
    assert preset("llama3-70b").hidden_dim == 28672
    assert preset("llama3-405b").hidden_dim == 53248
    assert preset("llama3.2-1b").hidden_dim == 8192


def test_tied_embeddings_share_one_tensor():
    m = tiny(tie_embeddings=True)
    assert m.output.weight is m.tok_embeddings.weight
    untied = tiny()
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert untied.output.weight.data_ptr() != untied.tok_embeddings.weight.data_ptr()
    # Untied: writing to the embedding leaves the output head as it was, and the head has its own init.
    head = untied.output.weight.detach().clone()
    with torch.no_grad():
        untied.tok_embeddings.weight.add_(1.0)
    assert torch.equal(untied.output.weight, head)
    assert not torch.equal(untied.output.weight, untied.tok_embeddings.weight)
    # Tied: the same write shows through the output head.
    with torch.no_grad():
        m.tok_embeddings.weight.add_(1.0)
    assert torch.equal(m.output.weight, m.tok_embeddings.weight)
    n_untied = sum(p.numel() for p in untied.parameters())
    assert sum(p.numel() for p in m.parameters()) == n_untied - untied.output.weight.numel()


def test_init_scales_residual_outputs():
    m = Transformer(preset("tiny"))
    std_in = m.layers[0].attention.wq.weight.std().item()
    std_out = m.layers[0].attention.wo.weight.std().item()
    assert abs(std_in - 0.02) < 0.002
    assert abs(std_out - 0.02 / (2 * 4) ** 0.5) < 0.001


def test_positions_in_documents():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    assert positions_in_documents(doc).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]


def test_document_masking_equals_per_document_forwards():
    m = tiny()
    lens = [5, 9, 3, 7]
    docs = [torch.randint(0, 512, (n,)) for n in lens]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    out = m(packed, doc_ids=doc_ids)
    alone = torch.cat([m(d[None]) for d in docs], dim=1)
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
    # Without document masking the later documents do see the earlier ones.
    assert (m(packed)[0, 5:] - alone[0, 5:]).abs().max() > 1e-3


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_kv_cached_generation_equals_full_recompute(decode):
    m = tiny()
    prompt = torch.randint(0, 512, (2, 7))
    new = generate(m, prompt, max_new_tokens=20, decode=decode)
    seq = prompt.clone()
    for _ in range(20):  # recompute the whole sequence at every step, no cache
        nxt = m(seq)[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert new == seq[:, 7:].tolist()


def test_cached_logits_equal_full_forward():
    m = tiny()
    x = torch.randint(0, 512, (2, 12))
    full = m(x)
    cache = KVCache.for_model(m, 2, 16)
    parts = [m(x[:, :5], cache=cache), m(x[:, 5:6], cache=cache), m(x[:, 6:], cache=cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 12


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_batched_prompts_of_different_lengths_equal_single_runs(decode):
    m = tiny()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]
    batched = generate(m, prompts, max_new_tokens=12, decode=decode)
    singles = [generate(m, [p], max_new_tokens=12, decode="dynamic")[0] for p in prompts]
    assert batched == singles
    assert all(len(s) == 12 for s in singles)


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_stop_tokens_stop_each_sequence(decode):
    m = tiny()
    prompts = [[5, 6, 7], [1, 2, 3, 4]]
    free = generate(m, prompts, max_new_tokens=10, decode=decode)
    stop = free[0][3]
    stopped = generate(m, prompts, max_new_tokens=10, stop_tokens=[stop], decode=decode)
    assert stopped[0] == free[0][: free[0].index(stop)]
    expected_1 = free[1][: free[1].index(stop)] if stop in free[1] else free[1]
    assert stopped[1] == expected_1


def test_sampling_is_seeded_and_top_p_tiny_is_greedy():
    m = tiny()
    p = [[3, 4, 5]]
    a = generate(m, p, 15, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = generate(m, p, 15, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert a == b
    greedy = generate(m, p, 15)
    nucleus = generate(m, p, 15, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(2))
    assert nucleus == greedy


def test_bad_token_ids_raise_before_compute():
    m = tiny()
    with pytest.raises(ValueError, match="token id 512 is outside the vocabulary"):
        m(torch.tensor([[1, 2, 512]]))
    with pytest.raises(ValueError, match="token id -1"):
        m(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(m, [[1, 9999]], 4)


def test_sequences_longer_than_cache_or_context_raise():
    m = tiny()
    cache = KVCache.for_model(m, 1, 8)
    with pytest.raises(ValueError, match="longer than the KV cache"):
        m(torch.zeros(1, 9, dtype=torch.long), cache=cache)
    assert cache.length == 0
    with pytest.raises(ValueError, match="max_seq_len=256"):
        m(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        generate(m, [[1] * 250], 10)


def test_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="n_kv_heads=3 must divide n_heads=4"):
        LMConfig(dim=64, n_heads=4, n_kv_heads=3, n_layers=1, vocab_size=10)
    with pytest.raises(ValueError, match="unknown LM preset"):
        preset("llama5")
    with pytest.raises(ValueError, match="unknown LMConfig keys"):
        LMConfig.from_dict({"dim": 8, "bogus": 1})
