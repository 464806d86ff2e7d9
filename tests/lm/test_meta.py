"""Parity with Meta's reference implementation (`llama-models`, run with fairscale at model-parallel size 1 on
a gloo process group of one) and Meta-format checkpoints (`mm.lm.load_meta`): a tiny random Meta Transformer,
saved as Meta saves it (params.json + consolidated.NN.pth, 1 or 2 model-parallel shards), loads into our
Transformer with the same logits."""

import json
import os

import pytest
import torch

from mm.formats.meta_llama import merge_shards
from mm.lm import load_meta

meta_model = pytest.importorskip("llama_models.llama3.model")

PARAMS = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 96,
    "multiple_of": 32,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
}


@pytest.fixture(scope="module")
def reference(meta_parallel):
    """A random tiny Meta Transformer (every weight drawn, norms away from 1) and its logits on 2 rows."""
    torch.manual_seed(0)
    model = meta_model.Transformer(meta_model.ModelArgs(max_seq_len=64, max_batch_size=2, **PARAMS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    tokens = torch.randint(0, PARAMS["vocab_size"], (2, 24))
    logits = model(tokens, start_pos=0)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    yield {"state": sd, "tokens": tokens, "logits": logits}


def write_meta(path, state, shards=1):
    """Save `state` as Meta does: params.json + one consolidated.NN.pth per model-parallel rank."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(PARAMS))
    split = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "tok_embeddings": 0, "wo": 1, "w2": 1}
    for r in range(shards):
        part = {}
        for k, v in state.items():
            dim = next((d for n, d in split.items() if f"{n}.weight" in k), None)
            part[k] = v.chunk(shards, dim=dim)[r].clone() if dim is not None else v.clone()
        torch.save(part, path / f"consolidated.{r:02d}.pth")
    return path


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_checkpoint_loads_with_the_reference_logits(reference, tmp_path, shards):
    ckpt = write_meta(tmp_path / "meta", reference["state"], shards)
    if shards == 2:
        assert torch.load(ckpt / "consolidated.01.pth")["layers.0.attention.wo.weight"].shape == (64, 32)
    model = load_meta(ckpt)
    hidden = reference["state"]["layers.0.feed_forward.w1.weight"].shape[0]
    assert model.cfg.rope_scaling is not None and model.cfg.hidden_dim == hidden == 224
    with torch.no_grad():
        ours = model(reference["tokens"])
    diff = (ours.float() - reference["logits"]).abs().max().item()
    assert diff <= 1e-4, diff
    assert reference["logits"].abs().max().item() > 0.1  # the comparison is not between near-zero logits


def test_export_hf_llama_from_a_meta_checkpoint_loads_in_transformers(reference, tmp_path):
    from transformers import LlamaForCausalLM

    from mm.app.cli import main

    ckpt = write_meta(tmp_path / "meta", reference["state"], shards=2)
    assert (
        main(["export", "--checkpoint", str(ckpt), "--format", "hf-llama", "--out", str(tmp_path / "hf")])
        == 0
    )
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        logits = hf(reference["tokens"]).logits
    assert (logits - reference["logits"]).abs().max().item() <= 1e-4


def test_scaled_rope_matters_so_the_parity_covers_it(reference, tmp_path):
    params = dict(PARAMS, use_scaled_rope=False)
    ckpt = write_meta(tmp_path / "meta", reference["state"])
    (ckpt / "params.json").write_text(json.dumps(params))
    with torch.no_grad():
        ours = load_meta(ckpt)(reference["tokens"])
    # beyond the parity bound (1e-4): the parity test would catch a missing scaling
    assert (ours.float() - reference["logits"]).abs().max().item() > 3e-4


def test_shards_that_disagree_on_a_replicated_norm_are_refused(reference):
    a = {k: v.clone() for k, v in reference["state"].items()}
    b = {k: v.clone() for k, v in reference["state"].items()}
    b["norm.weight"] += 1
    with pytest.raises(ValueError, match="norm.weight is replicated but shard 1 differs"):
        merge_shards([a, b], "ckpt")


def test_a_pickle_that_needs_code_is_refused_not_run(tmp_path):
    ckpt = tmp_path / "meta"
    ckpt.mkdir()
    (ckpt / "params.json").write_text(json.dumps(PARAMS))
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Evil()}, ckpt / "consolidated.00.pth")
    with pytest.raises(ValueError, match="needs code to load"):
        load_meta(ckpt)
    assert not marker.exists()


def test_missing_params_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="params.json is missing"):
        load_meta(tmp_path)


CORPUS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "a large red circle and a small blue square",
    "Numbers: 1234567 3.14159 -42 1e10 0x1F",
    "Unicode: naïve café, Straße, 日本語のテキスト, Ελληνικά, русский, العربية, emoji 🙂🚀",
    "code:\n    def f(x):\n        return x ** 2  # square\n\ttabs\r\nwindows line",
    "special-looking text <|begin_of_text|> <|eot_id|> <|image|> stays text",
    "I'm sure they'll say we've done it, didn't we?",
    "\n\n\n   \n",
    "word " * 300,
    "",
]


@pytest.fixture(scope="module")
def tokenizers():
    from pathlib import Path

    import llama_models.llama3 as meta_llama3
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    from mm.lm import Tokenizer

    path = Path(meta_llama3.__file__).parent / "tokenizer.model"
    return Tokenizer.from_file(path), MetaTokenizer(path)


def test_tokenizer_equals_meta_on_a_varied_corpus(tokenizers):
    ours, meta = tokenizers
    assert ours.vocab_size == meta.n_words == 128256
    for name in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|image|>"):
        assert ours.special_id(name) == meta.special_tokens[name], name
    for text in CORPUS:
        want = meta.encode(text, bos=True, eos=True, allowed_special=set(), disallowed_special=())
        assert ours.encode(text, bos=True, eos=True) == want, text
        assert ours.decode(want[1:-1]) == meta.decode(want[1:-1]) == text


def test_chat_format_equals_meta(tokenizers):
    from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem
    from llama_models.llama3.chat_format import ChatFormat

    ours, meta = tokenizers
    fmt = ChatFormat(meta)
    png = _png_bytes()
    dialogs = [
        [{"role": "user", "content": "what colour is the circle?"}],
        [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "which way does the square move?"},
            {"role": "assistant", "content": "left"},
            {"role": "user", "content": "and the <|eot_id|> triangle? <|image|>"},
        ],
        [{"role": "user", "content": [{"type": "image"}, "describe the image."]}],
        [{"role": "tool", "content": '{"result": 3}'}],
    ]
    for dialog in dialogs:
        raw = []
        for m in dialog:
            c = m["content"]
            items = c if isinstance(c, list) else [c]
            raw.append(
                RawMessage(
                    role=m["role"],
                    content=[
                        RawMediaItem(data=png) if isinstance(i, dict) else RawTextItem(text=i) for i in items
                    ],
                )
            )
        # Meta's model input writes each image as id 128256 (the Mllama image index); the tokenizer's own id for
        # `<|image|>` is 128011, which `encode_dialog` returns
        image = meta.special_tokens["<|image|>"]
        want = [image if t == 128256 else t for t in fmt.encode_dialog_prompt(raw).tokens]
        assert ours.encode_dialog(dialog) == want, dialog


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()
