"""Decode modes (`mm.lm.decode`): the static KV cache and the compiled step give the dynamic cache's tokens,
"auto" picks by model size, and a compiled step follows weights changed after it was compiled."""

import pytest
import torch

from mm.lm import KVCache, Transformer, decode, generate, preset
from mm.lm.decode import (
    AUTO_COMPILE_MIN_PARAMS,
    cache_length,
    resolve_decode_mode,
    set_default_decode_mode,
)


def tiny() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("nano")).eval()


def test_static_cache_forward_equals_the_dynamic_cache_and_keeps_its_length():
    m = tiny()
    x = torch.randint(0, 512, (2, 9))
    ref = KVCache.for_model(m, 2, 16)
    full = m(x, cache=ref)
    cache = KVCache.for_model(m, 2, 16)
    first = m(x[:, :6], cache=cache)
    cache.start_static()
    assert cache.static and cache.length == 6
    steps = [m(x[:, i : i + 1], cache=cache) for i in range(6, 9)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 9 and int(cache.pos) == 9
    for layer in range(m.cfg.n_layers):  # the same keys at the same places; the unfilled end untouched
        torch.testing.assert_close(cache.k[layer][:, :, :9], ref.k[layer][:, :, :9], atol=1e-5, rtol=1e-5)
        assert not cache.k[layer][:, :, 9:].any()
    cache.reset()
    assert not cache.static and cache.length == 0


def test_static_cache_hides_padding_of_a_left_padded_prompt():
    m = tiny()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert generate(m, prompts, 10, decode="static") == generate(m, prompts, 10, decode="dynamic")
    sampled = [
        generate(m, prompts, 10, temperature=1.0, generator=torch.Generator().manual_seed(3), decode=d)
        for d in ("static", "dynamic")
    ]
    assert sampled[0] == sampled[1]


def test_cache_length_is_bucketed_for_fixed_shapes_but_never_short():
    assert cache_length(70, 256, "dynamic") == 70
    assert cache_length(70, 256, "static") == 128
    assert cache_length(250, 256, "compiled") == 256
    assert cache_length(256, 256, "static") == 256


def test_auto_picks_by_lm_size_and_the_default_can_be_fixed(monkeypatch):
    m = tiny()
    assert sum(p.numel() for p in m.parameters()) < AUTO_COMPILE_MIN_PARAMS
    assert resolve_decode_mode("auto", m) == "dynamic"
    monkeypatch.setenv("MM_DECODE", "static")
    assert resolve_decode_mode("auto", m) == "static"
    assert resolve_decode_mode("dynamic", m) == "dynamic"  # an explicit mode wins
    monkeypatch.setenv("MM_DECODE", "fast")
    with pytest.raises(ValueError, match="MM_DECODE must be one of"):
        resolve_decode_mode("auto", m)
    monkeypatch.delenv("MM_DECODE")
    set_default_decode_mode("compiled")
    try:
        assert resolve_decode_mode("auto", m) == "compiled"
    finally:
        set_default_decode_mode("auto")
    with pytest.raises(ValueError, match="decode mode must be one of"):
        generate(m, [[1, 2]], 2, decode="fastest")


def test_compiled_step_gives_the_dynamic_tokens_and_follows_changed_weights(monkeypatch):
    # freezing (weights compiled in) is what this checks; without the GEMM autotuning each compile takes seconds
    monkeypatch.setattr(decode, "CPU_OPTIONS", {"freezing": True})
    m = tiny()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert generate(m, prompts, 12, decode="compiled") == generate(m, prompts, 12, decode="dynamic")
    step = m.__dict__["_mm_decode_step"][1]
    assert generate(m, prompts, 12, decode="compiled") and m.__dict__["_mm_decode_step"][1] is step  # reused
    with torch.no_grad():  # what a training step does: in place
        m.output.weight.mul_(-1.0)
    flipped = generate(m, prompts, 12, decode="dynamic")
    assert generate(m, prompts, 12, decode="compiled") == flipped  # recompiled: the frozen weights were stale
    assert m.__dict__["_mm_decode_step"][1] is not step


def test_cli_decode_option_sets_the_process_default(tmp_path, capsys):
    from mm.app.cli import build_parser, main
    from mm.lm.decode import DECODE_MODES, default_decode_mode

    option = next(a for a in build_parser()._actions if a.dest == "decode")
    assert tuple(option.choices) == DECODE_MODES  # the CLI (which imports no torch) names the same modes

    try:
        # the option applies before the command runs (here one that stops at its missing checkpoint)
        assert main(["--decode", "static", "generate", "--checkpoint", str(tmp_path / "none"), "hi"]) == 2
        assert default_decode_mode() == "static"
    finally:
        set_default_decode_mode("auto")
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--decode", "fastest", "generate", "--checkpoint", "x", "hi"])
    assert "invalid choice: 'fastest'" in capsys.readouterr().err
