"""Tests for mm.lm.tokenizer: training, round trips, special-token safety, tiktoken and transformers parity."""

import copy as copy_module
import json
import pickle

import pytest

from mm.lm.tokenizer import Tokenizer
from mm.lm.vocab import LLAMA3_PAT_STR, MULTIMODAL_TOKENS, SPECIAL_TOKENS

SIZES = ["small", "large"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle"]
MOTIONS = ["left", "right", "up", "down"]


def shapes_corpus() -> list[str]:
    objects = [f"{s} {c} {h}" for s in SIZES for c in COLORS for h in SHAPES]
    corpus = [f"a {o}" for o in objects]
    corpus += [f"a {a} and a {b}" for a in objects[::3] for b in objects[::5]]
    corpus += [f"a {c} {h} moves {m}" for c in COLORS for h in SHAPES for m in MOTIONS]
    corpus += [f"Describe the image: a {o}.\nAnswer {i * 37}!" for i, o in enumerate(objects)]
    corpus += [f"Repeat after me in English: a {o}" for o in objects[::2]]
    return corpus


SENTENCES = [
    "a large red circle and a small blue square",
    "a green triangle moves up",
    "  two  spaces,\tand a tab",
    "numbers 12345 and 7 and 1000000",
    "punctuation!? (yes) -- 'quoted' \"double\"; I'm sure they'll go",
    "line one\nline two\n\n\nline five\r\nend\n",
    "unicode: héllo wörld, 日本語, emoji 🙂🟥",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(shapes_corpus(), vocab_size=480)


@pytest.fixture(scope="module")
def tt(tok, tmp_path_factory) -> Tokenizer:
    path = tok.export_tiktoken(tmp_path_factory.mktemp("tiktoken") / "tokenizer.model")
    return Tokenizer.from_file(path)


# ------------------------------------------------------------------------------------------------ training


def test_trained_layout_and_learned_merges(tok):
    n_special = len(SPECIAL_TOKENS)
    assert tok.backend == "tokenizers"
    assert 256 + n_special < tok.vocab_size <= 480
    # Special tokens sit at the end, in SPECIAL_TOKENS order, and nothing else is special.
    base = tok.vocab_size - n_special
    assert [tok.special_id(t) for t in SPECIAL_TOKENS] == list(range(base, tok.vocab_size))
    assert tok.special_ids == frozenset(range(base, tok.vocab_size))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id) == (base, base + 1, base + 4, base + 9)
    assert (tok.image_id, tok.video_id, tok.speech_start_id, tok.speech_end_id) == tuple(
        range(base + 11, base + 15)
    )
    # The words of the world were learned as whole tokens (with their leading space).
    ids = tok.encode("a large red circle and a small blue square")
    assert [tok.decode([i]) for i in ids] == [
        "a",
        " large",
        " red",
        " circle",
        " and",
        " a",
        " small",
        " blue",
        " square",
    ]
    # Every single byte is in the vocabulary, so any text round-trips.
    assert len(tok.encode("\x00\x7f\xff")) >= 3


def test_training_is_deterministic(tok, tmp_path):
    again = Tokenizer.train(iter(shapes_corpus()), vocab_size=480)
    a = tok.save(tmp_path / "a").read_bytes()
    b = again.save(tmp_path / "b").read_bytes()
    assert a == b
    assert again.encode(SENTENCES[0]) == tok.encode(SENTENCES[0])


def test_saved_json_has_meta_llama3_structure(tok, tmp_path):
    data = json.loads(tok.save(tmp_path).read_text())
    split, byte_level = data["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["pattern"]["Regex"] == LLAMA3_PAT_STR
    assert split["behavior"] == "Isolated"
    assert byte_level == dict(byte_level, type="ByteLevel", add_prefix_space=False, use_regex=False)
    assert data["decoder"]["type"] == "ByteLevel"
    assert data["model"]["type"] == "BPE" and data["model"]["ignore_merges"] is True
    assert [a["content"] for a in data["added_tokens"]] == SPECIAL_TOKENS
    assert all(a["special"] for a in data["added_tokens"])


def test_train_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="at least 271"):
        Tokenizer.train(["a b c"], vocab_size=100)


# ------------------------------------------------------------------------------------- encode and decode


@pytest.mark.parametrize("backend", ["tok", "tt"])
@pytest.mark.parametrize("text", SENTENCES)
def test_round_trip(backend, text, request):
    t = request.getfixturevalue(backend)
    ids = t.encode(text)
    assert t.decode(ids) == text
    assert all(0 <= i < t.vocab_size for i in ids)
    full = t.encode(text, bos=True, eos=True)
    assert full == [t.bos_id, *ids, t.eos_id]
    assert t.encode(text, bos=True) == [t.bos_id, *ids]
    assert t.encode(text, eos=True) == [*ids, t.eos_id]
    assert t.decode(full) == "<|begin_of_text|>" + text + "<|end_of_text|>"


def test_digits_split_in_groups_of_three(tok, tt):
    for t in (tok, tt):
        pieces = [t.decode([i]) for i in t.encode("12345 9876543")]
        assert "".join(pieces) == "12345 9876543"
        assert all(sum(c.isdigit() for c in p) <= 3 for p in pieces)
        # Token boundaries fall where the Llama 3 regex cuts: 123|45| |987|654|3.
        ends = {sum(len(p) for p in pieces[: k + 1]) for k in range(len(pieces))}
        assert {3, 5, 6, 9, 12, 13} <= ends


def test_encode_batch_matches_encode(tok, tt):
    for t in (tok, tt):
        assert t.encode_batch(SENTENCES, bos=True) == [t.encode(s, bos=True) for s in SENTENCES]


@pytest.mark.parametrize("backend", ["tok", "tt"])
def test_special_strings_in_user_text_stay_ordinary(backend, request):
    t = request.getfixturevalue(backend)
    assert t.special_id("<|image|>") in t.special_ids
    for s in t.special_tokens:
        text = f"a caption with {s} inside{s}{s} and <|image|>\n{s}"
        ids = t.encode(text, bos=True, eos=True)
        inner = ids[1:-1]
        assert not set(inner) & t.special_ids, s
        assert t.decode(inner) == text
        assert t.encode_batch([text]) == [inner]
    # The special ids themselves decode to their strings when placed by the caller.
    assert t.decode([t.image_id, *t.encode(" a red circle")]) == "<|image|> a red circle"


def test_special_id_errors_name_the_token(tok, tt):
    with pytest.raises(ValueError, match=r"<\|nope\|>.*<\|image\|>"):
        tok.special_id("<|nope|>")
    with pytest.raises(ValueError, match=r"<\|nope\|>.*243 <\|reserved_special_token_k\|>"):
        tt.special_id("<|nope|>")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


# ------------------------------------------------------------------------------------------- tiktoken path


def test_tiktoken_export_gives_identical_ids(tok, tt):
    assert tt.backend == "tiktoken"
    for text in [*SENTENCES, *shapes_corpus()[::7]]:
        assert tt.encode(text, bos=True, eos=True) == tok.encode(text, bos=True, eos=True), text


def test_tiktoken_special_layout(tok, tt):
    base = tok.vocab_size - len(SPECIAL_TOKENS)  # ordinary tokens of the trained vocabulary
    assert tt.vocab_size == base + 256
    assert len(tt.special_tokens) == 256
    assert tt.special_ids == frozenset(range(base, base + 256))
    assert tt.bos_id == base and tt.eos_id == base + 1
    assert tt.pad_id == base + 4 and tt.eot_id == base + 9
    assert (tt.image_id, tt.video_id, tt.speech_start_id, tt.speech_end_id) == (
        base + 11,
        base + 12,
        base + 13,
        base + 14,
    )
    assert tt.special_id("<|reserved_special_token_1|>") == base + 3
    assert tt.special_id("<|reserved_special_token_2|>") == base + 15
    assert tt.special_id("<|reserved_special_token_242|>") == base + 255
    # The named specials have the same ids in both backends.
    assert [tt.special_id(t) for t in SPECIAL_TOKENS] == [tok.special_id(t) for t in SPECIAL_TOKENS]


def test_tiktoken_save_reload_and_rewrite_same_path(tok, tt, tmp_path):
    path = tt.save(tmp_path)
    assert path == tmp_path / "tokenizer.model"
    again = Tokenizer.from_file(tmp_path)
    assert again.backend == "tiktoken"
    assert again.encode(SENTENCES[4]) == tt.encode(SENTENCES[4])
    # Rewriting the file at the same path must load the new vocabulary (no stale cache).
    small = Tokenizer.train(["zzz zzz zzz"] * 10, vocab_size=280)
    small.export_tiktoken(path)
    reloaded = Tokenizer.from_file(path)
    assert reloaded.vocab_size == small.vocab_size - len(SPECIAL_TOKENS) + 256
    assert reloaded.encode("a large red circle") != tt.encode("a large red circle")


def test_pickle_and_deepcopy_keep_special_strings_ordinary(tok, tt):
    text = SENTENCES[5] + "<|image|><|end_of_text|>"
    for t in (tok, tt):
        for copy in (pickle.loads(pickle.dumps(t)), copy_module.deepcopy(t)):
            assert copy.encode(text) == t.encode(text)
            assert not set(copy.encode(text)) & copy.special_ids
            assert copy.special_ids == t.special_ids


# ----------------------------------------------------------------------------------------- HF / transformers


def test_transformers_parity(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    path = tok.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in SENTENCES:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text
    for t in SPECIAL_TOKENS:
        assert hf.convert_tokens_to_ids(t) == tok.special_id(t)
    # Reloading our own file gives the same tokenizer.
    again = Tokenizer.from_file(tmp_path)
    assert again.backend == "tokenizers"
    assert again.special_tokens == tok.special_tokens
    assert again.encode(SENTENCES[4] + "<|image|>") == tok.encode(SENTENCES[4] + "<|image|>")


def test_tokenizer_json_without_media_tokens_gets_them_appended(tok, tmp_path):
    data = json.loads((tok.save(tmp_path / "src")).read_text())
    base = tok.vocab_size - len(SPECIAL_TOKENS)
    kept = {"<|begin_of_text|>": base, "<|end_of_text|>": base + 1, "<|image|>": base + 2}
    data["added_tokens"] = [
        dict(a, id=kept[a["content"]]) for a in data["added_tokens"] if a["content"] in kept
    ]
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(data))

    t = Tokenizer.from_file(path)
    assert t.bos_id == base and t.eos_id == base + 1 and t.image_id == base + 2  # existing ids kept
    assert (t.video_id, t.speech_start_id, t.speech_end_id) == (base + 3, base + 4, base + 5)  # appended
    assert t.vocab_size == base + 6
    assert t.special_ids == frozenset(range(base, base + 6))
    assert set(MULTIMODAL_TOKENS) <= set(t.special_tokens)
    text = "<|video|> then <|speech_start|>hi<|speech_end|>"
    assert not set(t.encode(text)) & t.special_ids
    assert t.decode(t.encode(text)) == text
    with pytest.raises(ValueError, match="eot_id"):
        _ = t.eot_id  # this file has no <|eot_id|>, and none is invented


def test_bad_paths_name_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nowhere.*tokenizer.json"):
        Tokenizer.from_file(missing)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*tokenizer.model"):
        Tokenizer.from_file(empty_dir)

    broken_json = tmp_path / "tokenizer.json"
    broken_json.write_text('{"not": "a tokenizer"')
    with pytest.raises(ValueError, match=r"tokenizer\.json.*Hugging Face"):
        Tokenizer.from_file(broken_json)

    bad_lines = tmp_path / "bad.model"
    bad_lines.write_text("hello world again\n")
    with pytest.raises(ValueError, match=r"bad\.model:1 .*base64token rank"):
        Tokenizer.from_file(bad_lines)

    binary = tmp_path / "sp.model"
    binary.write_bytes(b"\n\x0f\x80\xff\x00sentencepiece")
    with pytest.raises(ValueError, match=r"sp\.model.*SentencePiece"):
        Tokenizer.from_file(binary)

    incomplete = tmp_path / "incomplete.model"
    incomplete.write_text("YQ== 0\nYg== 1\n")  # only b"a" and b"b"
    with pytest.raises(ValueError, match=r"incomplete\.model.*single bytes"):
        Tokenizer.from_file(incomplete)
