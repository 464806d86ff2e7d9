"""Hugging Face interop: tiny random `LlamaForCausalLM` checkpoints load with the same logits, greedy
generations, RoPE frequencies; `save_hf` writes what transformers loads; bad checkpoints fail by name."""

import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from mm.formats.hf_llama import (  # noqa: E402
    config_from_hf,
    config_to_hf,
    hf_to_mm_state_dict,
    interleaved_to_rotate_half,
    mm_to_hf_state_dict,
    rotate_half_to_interleaved,
)
from mm.lm import RopeScaling, Transformer, generate, load_hf, preset, rope_inv_freq, save_hf  # noqa: E402

torch.set_num_threads(2)

# Llama 3.1 scaling with a small original context, so that at head_dim 16 the three regimes all occur:
# wavelengths 6.3 (< 64/4, kept), 32.6 (blended), 169 and longer (> 64/1, divided by 8).
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)


def hf_config(tied: bool = False, **kw) -> LlamaConfig:
    args = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=160,
        vocab_size=320,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_parameters=dict(LLAMA3_ROPE),
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    args.update(kw)
    return LlamaConfig(**args)


def random_hf_model(cfg: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """A tiny HF Llama with random weights everywhere (norm weights too, so their mapping is tested)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(
                    0.1 * torch.randn_like(p)
                )  # peakier logits than 0.02: no near-ties in greedy decoding
    return model


def load_theirs(path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("tied" if request.param else "untied")
    random_hf_model(hf_config(tied=request.param)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain")
    random_hf_model(hf_config(num_hidden_layers=3), seed=1).save_pretrained(path)
    return path


def tokens(batch: int = 2, seq: int = 32, vocab: int = 320, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def assert_logits_match(ours: Transformer, theirs: LlamaForCausalLM, x: torch.Tensor) -> None:
    with torch.no_grad():
        a, b = ours(x), theirs(x).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (a - b).abs().max().item() <= 1e-4


# ---- 1. logits parity ----------------------------------------------------------------------------------
def test_logits_match_transformers(hf_dir):
    theirs, ours = load_theirs(hf_dir), load_hf(hf_dir)
    cfg = ours.cfg
    assert (cfg.n_kv_heads, cfg.rope_scaling) == (2, RopeScaling(8.0, 1.0, 4.0, 64))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert cfg.num_params() == sum(p.numel() for p in ours.parameters())
    if cfg.tie_embeddings:
        assert ours.output.weight is ours.tok_embeddings.weight
        with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()
    else:
        assert ours.output.weight is not ours.tok_embeddings.weight
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])
    assert_logits_match(ours, theirs, tokens(2, 32))


def test_logits_match_with_explicit_head_dim(tmp_path):
    """head_dim 32 with hidden 64 and 4 heads: q_proj is (128, 64), o_proj (64, 128)."""
    random_hf_model(hf_config(head_dim=32)).save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    assert ours.cfg.hd == 32 and ours.layers[0].attention.wq.weight.shape == (128, 64)
    assert_logits_match(ours, load_theirs(tmp_path), tokens(2, 24))


def test_load_in_bfloat16_keeps_float32_rope(untied_dir):
    model = load_hf(untied_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.inv_freq.dtype == torch.float32
    ref = load_hf(untied_dir)
    assert torch.equal(model.layers[1].attention.wk.weight, ref.layers[1].attention.wk.weight.bfloat16())


# ---- 2. greedy generation ----------------------------------------------------------------------------
def test_greedy_generation_matches_transformers(hf_dir):
    theirs, ours = load_theirs(hf_dir), load_hf(hf_dir)
    prompt = tokens(2, 12, seed=3)
    with torch.no_grad():
        ref = theirs.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=32,
            min_new_tokens=32,
            eos_token_id=None,
            pad_token_id=0,
        )
    ref_new = ref[:, prompt.shape[1] :].tolist()
    assert all(len(r) == 32 for r in ref_new)
    assert generate(ours, prompt, max_new_tokens=32) == ref_new


def test_batched_prompts_of_different_lengths_match_unbatched_transformers(untied_dir):
    theirs, ours = load_theirs(untied_dir), load_hf(untied_dir)
    prompts = [tokens(1, 5, seed=4)[0].tolist(), tokens(1, 17, seed=5)[0].tolist()]
    ref = []
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p])
            out = theirs.generate(x, do_sample=False, max_new_tokens=16, min_new_tokens=16, pad_token_id=0)
            ref.append(out[0, len(p) :].tolist())
    assert generate(ours, prompts, max_new_tokens=16) == ref


# ---- 3. save_hf round trips --------------------------------------------------------------------------
def test_save_hf_loads_in_transformers_with_same_logits(hf_dir, tmp_path):
    ours = load_hf(hf_dir)
    out = save_hf(ours, tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["rope_parameters"] == LLAMA3_ROPE
    assert config["rope_theta"] == 500000.0 and config["rope_scaling"]["rope_type"] == "llama3"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not ours.cfg.tie_embeddings)
    # Our save holds exactly the tensors transformers saved (the q/k permutation is undone).
    original, saved = load_file(hf_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(original) == sorted(saved)
    assert all(torch.equal(original[k], saved[k]) for k in original)
    theirs = load_theirs(out)
    assert theirs.config.tie_word_embeddings == ours.cfg.tie_embeddings
    assert_logits_match(ours, theirs, tokens(2, 24))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fresh_model_round_trip(tmp_path, tied):
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=64)
    torch.manual_seed(0)
    ours = Transformer(preset("nano", tie_embeddings=tied, rope_theta=500000.0, rope_scaling=scaling)).eval()
    with torch.no_grad():
        for layer in ours.layers:
            layer.attention_norm.weight.normal_(1.0, 0.2)
    path = save_hf(ours, tmp_path)
    back = load_hf(path)
    assert back.cfg.to_dict() | {"multiple_of": 0, "ffn_dim_multiplier": 0} == ours.cfg.to_dict() | {
        "multiple_of": 0,
        "ffn_dim_multiplier": 0,
    }
    sd, sd_back = ours.state_dict(), back.state_dict()
    assert sorted(sd) == sorted(sd_back)
    assert all(torch.equal(sd[k], sd_back[k]) for k in sd)
    assert torch.equal(back.inv_freq, ours.inv_freq)
    assert_logits_match(ours, load_theirs(path), tokens(2, 24, vocab=ours.cfg.vocab_size))


def test_sharded_save_and_load(untied_dir, tmp_path):
    ours = load_hf(untied_dir)
    out = save_hf(ours, tmp_path, max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards == sorted(p.name for p in out.glob("model-*.safetensors"))
    assert not (out / "model.safetensors").exists()
    for shard in shards:  # each shard respects the limit (no single tensor here is bigger)
        assert (out / shard).stat().st_size < 200_000 + 10_000
    total = sum(t.numel() * t.element_size() for t in load_file(untied_dir / "model.safetensors").values())
    assert index["metadata"]["total_size"] == total
    back = load_hf(out)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())
    assert_logits_match(back, load_theirs(out), tokens(2, 24))
    # Saving unsharded into the same folder removes the old shards and index.
    save_hf(ours, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_state_dict_adapter_round_trip_and_meta_permutation():
    cfg = config_from_hf(hf_config().to_dict())
    hf_sd = random_hf_model(hf_config()).state_dict()
    mm_sd = hf_to_mm_state_dict(hf_sd, cfg)
    back = mm_to_hf_state_dict(mm_sd, cfg)
    assert sorted(back) == sorted(hf_sd) and all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)

    def meta_permute(w, n_heads, dim1, dim2):  # Meta -> HF, as in transformers' conversion script
        return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)

    wk = mm_sd["layers.0.attention.wk.weight"]  # (2 KV heads x 16, 64)
    assert torch.equal(interleaved_to_rotate_half(wk, 2, 16), meta_permute(wk, 2, 32, 64))
    assert torch.equal(rotate_half_to_interleaved(meta_permute(wk, 2, 32, 64), 2, 16), wk)
    assert not torch.equal(interleaved_to_rotate_half(wk, 2, 16), wk)


def test_config_round_trip_and_transformers_accepts_it():
    cfg = preset("llama3-8b")
    d = config_to_hf(cfg, torch.bfloat16)
    back = config_from_hf(d)
    assert (back.dim, back.n_layers, back.n_heads, back.n_kv_heads, back.hidden_dim) == (
        4096,
        32,
        32,
        8,
        14336,
    )
    assert (back.rope_theta, back.rope_scaling, back.max_seq_len) == (500000.0, cfg.rope_scaling, 131072)
    assert back.norm_eps == cfg.norm_eps and back.head_dim is None and back.vocab_size == 128256
    hf = LlamaConfig(**d)
    assert hf.rope_parameters["rope_type"] == "llama3" and hf.rope_parameters["factor"] == 8.0
    assert hf.intermediate_size == 14336 and hf.dtype == torch.bfloat16


# ---- 4. RoPE formats and frequencies -----------------------------------------------------------------
def _with_config(src, dst, edit):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_both_rope_formats_give_transformers_llama3_frequencies(untied_dir, tmp_path):
    def to_legacy(c, key="rope_type"):
        params = c.pop("rope_parameters")
        c["rope_theta"] = params.pop("rope_theta")
        c["rope_scaling"] = {key: params.pop("rope_type"), **params}

    new = load_hf(untied_dir)
    legacy = load_hf(_with_config(untied_dir, tmp_path / "legacy", to_legacy))
    oldest = load_hf(_with_config(untied_dir, tmp_path / "oldest", lambda c: to_legacy(c, key="type")))
    assert new.cfg.rope_scaling == legacy.cfg.rope_scaling == oldest.cfg.rope_scaling
    assert torch.equal(new.inv_freq, legacy.inv_freq) and torch.equal(new.inv_freq, oldest.inv_freq)

    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config(num_hidden_layers=3), "cpu")
    torch.testing.assert_close(new.inv_freq, hf_inv, atol=0, rtol=1e-6)
    torch.testing.assert_close(
        new.inv_freq, load_theirs(untied_dir).model.rotary_emb.inv_freq, atol=0, rtol=1e-6
    )

    # The scaling matters at these sizes: first frequency kept, second blended, the rest divided by 8.
    plain = rope_inv_freq(16, 500000.0)
    ratio = plain / new.inv_freq
    assert ratio[0] == 1.0 and 1.0 < ratio[1] < 8.0
    torch.testing.assert_close(ratio[2:], torch.full_like(ratio[2:], 8.0))


def test_default_rope_type_means_no_scaling(untied_dir, tmp_path):
    def default(c):
        c["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}

    path = _with_config(untied_dir, tmp_path / "default", default)
    ours = load_hf(path)
    assert ours.cfg.rope_scaling is None and ours.cfg.rope_theta == 10000.0
    torch.testing.assert_close(ours.inv_freq, load_theirs(path).model.rotary_emb.inv_freq, atol=0, rtol=1e-6)
    assert_logits_match(ours, load_theirs(path), tokens(1, 24))


# ---- 5. bad input --------------------------------------------------------------------------------------
def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"config\.json.*{re.escape(str(tmp_path))}"):
        load_hf(tmp_path)


def test_missing_weights_file(untied_dir, tmp_path):
    shutil.copy(untied_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(
        FileNotFoundError, match=r"model\.safetensors and model\.safetensors\.index\.json"
    ) as e:
        load_hf(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_shard_listed_in_index_but_missing(untied_dir, tmp_path):
    out = save_hf(load_hf(untied_dir), tmp_path, max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    second = sorted(set(index["weight_map"].values()))[1]
    (out / second).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(second)} listed in .*index\.json"):
        load_hf(out)


def test_tensor_not_in_weight_map(untied_dir, tmp_path):
    out = save_hf(load_hf(untied_dir), tmp_path, max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight'.*weight_map.*index\.json"):
        load_hf(out)


def _edit_weights(src, dst, edit):
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_tensor(untied_dir, tmp_path):
    path = _edit_weights(untied_dir, tmp_path / "m", lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' not found in .*model\.safetensors"
    ):
        load_hf(path)


def test_misshaped_tensor(untied_dir, tmp_path):
    def shrink(sd):
        sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)

    path = _edit_weights(untied_dir, tmp_path / "m", shrink)
    with pytest.raises(
        ValueError, match=r"k_proj\.weight.*model\.safetensors.*\(16, 64\), expected \(32, 64\)"
    ):
        load_hf(path)


@pytest.mark.parametrize(
    "edit,pattern",
    [
        (
            lambda c: c["rope_parameters"].update(rope_type="yarn"),
            r"config\.json.*'yarn'.*\['default', 'llama3'\]",
        ),
        (
            lambda c: c.update(
                rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0}
            ),
            r"config\.json.*'linear'.*supported",
        ),
        (lambda c: c.update(attention_bias=True), r"config\.json.*attention_bias"),
        (lambda c: c.update(mlp_bias=True), r"config\.json.*mlp_bias"),
        (lambda c: c.pop("hidden_size"), r"config\.json.*'hidden_size'"),
        (
            lambda c: c.update(rope_theta=10000.0),
            r"config\.json.*rope_parameters\['rope_theta'\]=500000\.0 disagrees.*10000\.0",
        ),
    ],
    ids=["yarn", "legacy-linear", "attention-bias", "mlp-bias", "no-hidden-size", "conflicting-theta"],
)
def test_bad_config(untied_dir, tmp_path, edit, pattern):
    path = _with_config(untied_dir, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=pattern):
        load_hf(path)
