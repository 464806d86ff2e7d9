"""Text corpora: readers, packing, the weighted mixture, resumable order, held-out passes (mm.datasets.text)."""

import gzip
import json
import logging

import pytest
import torch

from mm.datasets.mixture import PackedText
from mm.datasets.packing import heldout_batches
from mm.datasets.text import IGNORE_INDEX, TextSource, new_read_stats, read_documents
from mm.lm.tokenizer import Tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _sentences(n, start=0):
    """n distinct short sentences."""
    return [f"{WORDS[i % 12]} {WORDS[(i // 12) % 12]} number {i}." for i in range(start, start + n)]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(_sentences(300) + ["one two three four five six seven"], vocab_size=400)


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _split_stream(ids, bos, eos):
    """Split a token stream that starts at a BOS into documents (lists of ids without bos/eos)."""
    docs, cur = [], None
    for t in ids:
        if t == bos:
            assert cur is None, "BOS inside a document"
            cur = []
        elif t == eos:
            docs.append(cur)
            cur = None
        else:
            cur.append(t)
    return docs


def _stream_of(batches):
    """The token stream the batches cover (rows are consecutive windows)."""
    return [t for b in batches for t in b["tokens"].reshape(-1).tolist()]


# --------------------------------------------------------------------------------------------- reading


def test_paragraph_and_line_splitting(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("first line\nstill first\n\n\n  \nsecond para\r\nmore\n\nthird\n", encoding="utf-8")
    assert list(read_documents(f)) == ["first line\nstill first", "second para\nmore", "third"]
    assert list(read_documents(f, doc_split="line")) == [
        "first line",
        "still first",
        "second para",
        "more",
        "third",
    ]
    md = tmp_path / "README.md"
    md.write_text("# Title\n\nBody text\nwraps here", encoding="utf-8")  # no final newline
    assert list(read_documents(md)) == ["# Title", "Body text\nwraps here"]
    with pytest.raises(ValueError, match="doc_split"):
        read_documents(f, doc_split="sentence")


def test_jsonl_and_gzip(tmp_path):
    records = [{"text": "hello world", "id": 1}, {"text": "multi\n\nline doc"}, {"text": "café"}]
    data = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
    (tmp_path / "a.jsonl").write_bytes(data)
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(data)
    expected = ["hello world", "multi\n\nline doc", "café"]
    assert list(read_documents(tmp_path / "a.jsonl")) == expected
    assert list(read_documents(tmp_path / "b.jsonl.gz")) == expected
    stats = new_read_stats()
    assert list(read_documents(tmp_path, stats=stats)) == expected * 2  # folder: a.jsonl, then b.jsonl.gz
    assert stats["files"] == 2 and stats["documents"] == 6 and stats["skipped_records"] == 0


def test_folder_recursive_sorted_skips_hidden_and_other_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    _write_lines(tmp_path / "b" / "x.txt", ["from b/x"])
    _write_lines(tmp_path / "a.md", ["from a.md"])
    _write_lines(tmp_path / "c.txt", ["from c"])
    _write_lines(tmp_path / ".hidden.txt", ["hidden"])
    _write_lines(tmp_path / ".git" / "y.txt", ["git"])
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n")
    (tmp_path / "manifest.json").write_text('{"not": "text"}')
    assert list(read_documents(tmp_path)) == ["from a.md", "from b/x", "from c"]


def test_non_utf8_bytes_replaced_and_counted(tmp_path, caplog):
    f = tmp_path / "latin1.txt"
    # \xe9 is one invalid byte; \xe2\x82 is a truncated 3-byte sequence: 2 bytes, one U+FFFD.
    f.write_bytes(b"caf\xe9 ok\n\nbad \xe2\x82 end\nfine \xe2\x82\xac\n")
    stats = new_read_stats()
    with caplog.at_level(logging.WARNING, logger="mm.datasets.text"):
        docs = list(read_documents(f, stats=stats))
    assert docs == ["caf\ufffd ok", "bad \ufffd end\nfine \u20ac"]
    assert stats["replaced_bytes"] == 3
    assert stats["replaced_bytes_per_file"] == {str(f): 3}
    assert any(str(f) in r.getMessage() and " 3 bytes" in r.getMessage() for r in caplog.records)

    g = tmp_path / "one.txt"
    g.write_bytes(b"caf\xe9 ok\n")
    stats = new_read_stats()
    assert list(read_documents(g, stats=stats)) == ["caf\ufffd ok"]
    assert stats["replaced_bytes"] == 1
    # A genuine U+FFFD in valid UTF-8 is not a replaced byte.
    h = tmp_path / "genuine.txt"
    h.write_text("already \ufffd here\n", encoding="utf-8")
    stats = new_read_stats()
    list(read_documents(h, stats=stats))
    assert stats["replaced_bytes"] == 0 and stats["replaced_bytes_per_file"] == {}


def test_bad_jsonl_lines_skipped_and_counted(tmp_path, caplog):
    f = tmp_path / "mixed.jsonl"
    lines = [
        '{"text": "good one"}',
        "not json at all",
        '{"content": "no text field"}',
        "",  # blank lines are not records
        '{"text": 42}',
        '["a", "list"]',
        '{"text": "good two"}',
        '{"text": ',
    ]
    _write_lines(f, lines)
    stats = new_read_stats()
    with caplog.at_level(logging.WARNING, logger="mm.datasets.text"):
        docs = list(read_documents(f, stats=stats))
    assert docs == ["good one", "good two"]
    assert stats["skipped_records"] == 5
    assert stats["skipped_records_per_file"] == {str(f): 5}
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{f}:2:" in m for m in messages)  # file:line of the first bad record
    assert any(f"{f}:3:" in m for m in messages)


def test_missing_and_empty_paths_are_named(tmp_path):
    missing = tmp_path / "nope" / "data.txt"
    with pytest.raises(FileNotFoundError, match="nope/data.txt"):
        read_documents(missing)  # raised at once, not at the first next()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(ValueError, match="empty.txt"):
        list(read_documents(empty))
    allbad = tmp_path / "allbad.jsonl"
    _write_lines(allbad, ["nope", '{"x": 1}'])
    with pytest.raises(ValueError, match="allbad.jsonl"):
        list(read_documents(allbad))
    folder = tmp_path / "emptydir"
    folder.mkdir()
    with pytest.raises(ValueError, match="emptydir"):
        read_documents(folder)
    (folder / "e.txt").write_text("")
    with pytest.raises(ValueError, match="emptydir"):
        list(read_documents(folder))


def test_text_source_validation(tmp_path):
    src = TextSource(str(tmp_path / "corpus.txt"))
    assert src.paths == [str(tmp_path / "corpus.txt")] and src.name == "corpus.txt"
    assert TextSource([str(tmp_path / "a"), str(tmp_path / "b")]).name == "a+1"
    with pytest.raises(ValueError, match="weight"):
        TextSource(["x"], weight=-1)
    with pytest.raises(ValueError, match="doc_split"):
        TextSource(["x"], doc_split="words")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        PackedText([TextSource([str(tmp_path / "missing.txt")])], object())


# --------------------------------------------------------------------------------------------- packing


def test_packing_shift_labels_and_doc_ids(tmp_path, tok):
    sentences = _sentences(40)
    corpus = _write_lines(tmp_path / "c.txt", sentences)
    packed = PackedText([TextSource([str(corpus)], doc_split="line")], tok, seed=1)
    batches = [packed.next_batch(3, 16) for _ in range(4)]
    bos, eos = tok.bos_id, tok.eos_id
    stream = _stream_of(batches)
    for b in batches:
        tokens, labels, doc_ids = b["tokens"], b["labels"], b["doc_ids"]
        assert tokens.shape == labels.shape == doc_ids.shape == (3, 16)
        assert tokens.dtype == labels.dtype == doc_ids.dtype == torch.long
    # Rows are consecutive windows: row r of the stream is stream[r*16 : r*16 + 16], the label of its last
    # position is the first token of the next row.
    rows_t = torch.cat([b["tokens"] for b in batches])
    rows_l = torch.cat([b["labels"] for b in batches])
    rows_d = torch.cat([b["doc_ids"] for b in batches])
    for r in range(rows_t.shape[0]):
        window = stream[r * 16 : r * 16 + 17]
        assert rows_t[r].tolist() == window[:16]
        for t in range(16):
            if t + 1 < len(window):
                nxt = window[t + 1]
                assert rows_l[r, t].item() == (IGNORE_INDEX if nxt == bos else nxt)
        # doc_ids: 0 at the row start, +1 exactly at each BOS (except one at position 0).
        is_bos = rows_t[r] == bos
        expected = torch.cumsum(is_bos.long(), 0) - int(is_bos[0])
        assert rows_d[r].tolist() == expected.tolist()
        assert rows_d[r, 0].item() == 0
    # -100 exactly where the next token is a BOS (and in particular right after every EOS).
    assert ((rows_l == IGNORE_INDEX) == torch.cat([rows_t[:, 1:] == bos, torch.zeros(12, 1, dtype=bool)], 1))[
        :, :-1
    ].all()
    assert (rows_l[rows_t == eos] == IGNORE_INDEX).all()
    assert stream[0] == bos
    # The stream is bos + text + eos per document, each a line of the corpus, no repeats within an epoch.
    docs = [tok.decode(d) for d in _split_stream(stream, bos, eos)]
    assert len(docs) >= 8
    assert all(d in sentences for d in docs) and len(set(docs)) == len(docs)
    assert packed.tokens_seen == 4 * 3 * 16
    assert docs != sentences[: len(docs)]  # shuffled


def test_epochs_visit_every_document_once_in_new_orders(tmp_path, tok):
    sentences = _sentences(6)
    corpus = _write_lines(tmp_path / "c.txt", sentences)
    packed = PackedText([TextSource([str(corpus)], doc_split="line", name="c")], tok, seed=0)
    n_tokens = sum(len(tok.encode(s)) + 2 for s in sentences)
    stream = _stream_of([packed.next_batch(1, n_tokens * 3)])
    docs = [tok.decode(d) for d in _split_stream(stream, tok.bos_id, tok.eos_id)]
    assert len(docs) == 18
    epochs = [docs[0:6], docs[6:12], docs[12:18]]
    for e in epochs:
        assert sorted(e) == sorted(sentences)
    assert len({tuple(e) for e in epochs}) > 1  # each epoch shuffled anew
    # The final label needs one token of a 19th document, the first of the fourth epoch.
    assert packed.stats["sources"]["c"]["documents_drawn"] == 19
    assert packed.stats["sources"]["c"]["epoch"] == 3
    # Another seed, another order; same seed, same stream.
    other = PackedText([TextSource([str(corpus)], doc_split="line", name="c")], tok, seed=1)
    assert _stream_of([other.next_batch(1, n_tokens)]) != stream[:n_tokens]
    again = PackedText([TextSource([str(corpus)], doc_split="line", name="c")], tok, seed=0)
    assert _stream_of([again.next_batch(1, n_tokens * 3)]) == stream


def test_mixture_respects_weights(tmp_path):
    class Chars:
        bos_id, eos_id = 1, 2

        def encode(self, text):
            return [ord(c) for c in text]

    a = _write_lines(tmp_path / "a.txt", ["a"] * 50)
    b = _write_lines(tmp_path / "b.txt", ["b"] * 50)
    packed = PackedText(
        [
            TextSource([str(a)], weight=3.0, name="A", doc_split="line"),
            TextSource([str(b)], weight=1.0, name="B", doc_split="line"),
        ],
        Chars(),
        seed=0,
    )
    packed.next_batch(4, 1500)  # every document is 3 tokens: 2000 documents
    stats = packed.stats["sources"]
    n_a, n_b = stats["A"]["documents_drawn"], stats["B"]["documents_drawn"]
    assert n_a + n_b == 2001  # one more document supplies the final label
    assert 0.7 < n_a / (n_a + n_b) < 0.8
    # A weight of zero is never drawn.
    packed = PackedText(
        [
            TextSource([str(a)], weight=1.0, name="A", doc_split="line"),
            TextSource([str(b)], weight=0.0, name="B", doc_split="line"),
        ],
        Chars(),
    )
    assert set(packed.next_batch(2, 300)["tokens"].reshape(-1).tolist()) == {1, 2, ord("a")}
    with pytest.raises(ValueError, match="unique"):
        PackedText([TextSource([str(a)], name="x"), TextSource([str(b)], name="x")], Chars())


def test_resume_gives_the_same_batches(tmp_path, tok):
    a = _write_lines(tmp_path / "a.txt", _sentences(30))
    b = _write_lines(tmp_path / "b.txt", _sentences(25, start=100))

    def build():
        sources = [
            TextSource([str(a)], weight=2.0, name="a", doc_split="line"),
            TextSource([str(b)], weight=1.0, name="b", doc_split="line"),
        ]
        return PackedText(sources, tok, seed=7)

    # The shape schedule changes seq_len (and batch size) across the save point.
    shapes = [(2, 16)] * 5 + [(3, 24)] * 4 + [(2, 40)] * 3
    ref = build()
    expected = [ref.next_batch(*s) for s in shapes]

    run = build()
    for s in shapes[:7]:
        run.next_batch(*s)
    state = json.loads(json.dumps(run.state_dict()))  # JSON round trip: plain values only
    assert state["tokens_seen"] == run.tokens_seen == 5 * 32 + 2 * 72

    resumed = build()
    resumed.next_batch(1, 5)  # a fresh object that already moved must still land exactly on the state
    resumed.load_state_dict(state)
    for s, want in zip(shapes[7:], expected[7:], strict=True):
        got = resumed.next_batch(*s)
        for k in ("tokens", "labels", "doc_ids"):
            assert torch.equal(got[k], want[k]), k
    assert resumed.tokens_seen == ref.tokens_seen
    assert resumed.stats["sources"] == ref.stats["sources"]
    # Over a couple of epochs the streams stay identical (epoch counters and orders restored).
    for _ in range(6):
        assert torch.equal(resumed.next_batch(4, 64)["tokens"], ref.next_batch(4, 64)["tokens"])
    assert ref.stats["sources"]["b"]["epoch"] >= 1


def test_load_state_rejects_other_sources(tmp_path, tok):
    a = _write_lines(tmp_path / "a.txt", _sentences(10))
    b = _write_lines(tmp_path / "b.txt", _sentences(11))
    state = PackedText([TextSource([str(a)], name="x", doc_split="line")], tok).state_dict()
    other = PackedText([TextSource([str(b)], name="x", doc_split="line")], tok)
    with pytest.raises(ValueError, match="other sources"):
        other.load_state_dict(state)


def test_stats_report_reading_problems(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "caf\xe9"}\nbroken\n{"text": "ok"}\n')
    packed = PackedText([TextSource([str(f)], name="d")], tok)
    s = packed.stats
    assert s["replaced_bytes"] == 1 and s["skipped_records"] == 1
    assert s["sources"]["d"]["documents"] == 2
    assert s["sources"]["d"]["skipped_records_per_file"] == {str(f): 1}


# -------------------------------------------------------------------------------------------- held out


def test_heldout_batches_one_exact_pass(tmp_path, tok):
    sentences = _sentences(23)
    corpus = _write_lines(tmp_path / "h.txt", sentences)
    src = TextSource([str(corpus)], doc_split="line")
    batches = list(heldout_batches(src, tok, seq_len=16, batch_size=4))
    again = list(heldout_batches([src], tok, seq_len=16, batch_size=4))
    assert len(batches) == len(again) and all(
        torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["labels"], y["labels"])
        for x, y in zip(batches, again)
    )
    encoded = [tok.encode(s) for s in sentences]
    total = sum(len(e) + 2 for e in encoded)
    # Every token but the BOS of each document is a label exactly once: text tokens + one EOS per document.
    n_labels = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    assert n_labels == sum(len(e) + 1 for e in encoded)
    assert sum(b["tokens"].numel() for b in batches) == -(-(total - 1) // 16) * 16
    # In order, unshuffled: the rows spell the corpus (the stream's final EOS may be a label only).
    flat = [t for b in batches for t in b["tokens"].reshape(-1).tolist()]
    docs = _split_stream(flat[: total - 1] + [tok.eos_id], tok.bos_id, tok.eos_id)
    assert [tok.decode(d) for d in docs] == sentences
    assert all(int((b["labels"] == tok.bos_id).sum()) == 0 for b in batches)  # BOS is never a label
    # All batches full but the last; the last row's padding has labels -100 and a doc id of its own.
    assert all(b["tokens"].shape == (4, 16) for b in batches[:-1])
    last = batches[-1]
    pad = len(flat) + 1 - total
    assert 0 < pad <= 16  # 23 sentences do not fill the rows exactly here
    assert (last["labels"][-1, -pad:] == IGNORE_INDEX).all()
    assert (last["labels"][-1, :-pad] != IGNORE_INDEX).any()
    assert last["doc_ids"][-1, -1] == last["doc_ids"][-1, -pad - 1] + 1 if pad > 1 else True
    with pytest.raises(ValueError, match="seq_len"):
        heldout_batches(src, tok, seq_len=0, batch_size=1)
