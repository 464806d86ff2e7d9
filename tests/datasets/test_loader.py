"""Position-addressed data through `ResumableLoader` (DataLoader workers): global batches do not depend on the
number of processes or workers, a state saved at 4 processes restores at 2 and 1 with the same global batches,
resuming decodes nothing of the past, WebDataset shards are read by position (webdataset's tar parser) with a
seeded window shuffle, and `mm data tokenize` writes memory-mapped shards the packed row stream reads."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from mm.app.cli import main as mm_main
from mm.datasets.images import image_decoder
from mm.datasets.loader import LoaderOptions, ResumableLoader, SampleReader, add_counts
from mm.datasets.media import iter_webdataset
from mm.datasets.skips import SkipStats
from mm.datasets.streams import ShardStream, open_stream
from mm.datasets.text import TextSource
from mm.datasets.tiling import TileTransform
from mm.datasets.token_folders import check_tokenizer, read_index
from mm.datasets.tokens import TokenCorpus, TokenReader
from mm.lm import Tokenizer
from mm.world import synth_shapes

ROWS4 = 2  # rows per process at world 4: global batch 8


def keys(samples):
    """A picklable collate: what identifies each sample (its stream position and source)."""
    return [(s["position"], s["source"]) for s in samples]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    manifest = synth_shapes(root, n=13, seed=0, split="train", shard_size=4)  # shards of 4 + 4 + 4 + 1
    return {"manifest": manifest, "shards": sorted(str(p) for p in (root / "shapes").glob("train-*.tar"))}


def batches(paths, world_size, state, steps, workers=0):
    """The global batches of `steps` steps (ranks' rows merged by position) and each rank's end state/stats."""
    ranks = []
    for r in range(world_size):
        stream = open_stream(
            paths, image_decoder(TileTransform(32, 2)), seed=5, shuffle_window=3, rank=r, world=world_size
        )
        loader = ResumableLoader(
            SampleReader(stream, r, world_size, keys), LoaderOptions(num_workers=workers)
        )
        if state is not None:
            loader.load_state_dict(state)
        rows = 8 // world_size
        ranks.append(([loader.next(rows) for _ in range(steps)], loader.state_dict(), loader.stats()))
    merged = [sorted(x for out, _, _ in ranks for x in out[s]) for s in range(steps)]
    return merged, ranks


@pytest.mark.parametrize("kind", ["manifest", "shards"])
def test_a_state_saved_at_four_processes_restores_at_two_and_one_with_the_same_global_batches(world, kind):
    paths = [str(world["manifest"])] if kind == "manifest" else world["shards"]
    ref, _ = batches(paths, 1, None, 5)  # crosses epoch boundaries (13 samples, 8 a step)
    assert all([p for p, _ in b] == list(range(8 * s, 8 * s + 8)) for s, b in enumerate(ref))
    first, ranks = batches(paths, 4, None, 2, workers=1)
    assert first == ref[:2]
    states = {json.dumps(st, sort_keys=True) for _, st, _ in ranks}
    assert states == {json.dumps({"position": 16})}  # one world-size independent number
    state = ranks[0][1]
    two, two_ranks = batches(paths, 2, state, 3, workers=2)
    one, one_ranks = batches(paths, 1, state, 3)
    assert two == one == ref[2:]
    # each process decoded only its rows, nothing before the saved position
    assert [st["tried"] for _, _, st in ranks] == [2 * ROWS4] * 4
    assert [st["tried"] for _, _, st in two_ranks] == [3 * 4] * 2 and one_ranks[0][2]["tried"] == 3 * 8


def test_resuming_decodes_nothing_of_the_past(world):
    stream = open_stream([str(world["manifest"])], image_decoder(TileTransform(32, 2)), seed=1)
    loads = []
    real = stream.dataset.load
    stream.dataset.load = lambda i: loads.append(i) or real(i)
    loader = ResumableLoader(SampleReader(stream, 0, 1, keys))
    full = [loader.next(4) for _ in range(5)]
    assert len(loads) == 20
    # stop after 3 steps (a checkpoint), resume in a new loader: the same batches, only the new ones decoded
    again = open_stream([str(world["manifest"])], image_decoder(TileTransform(32, 2)), seed=1)
    loads.clear()
    real2 = again.dataset.load
    again.dataset.load = lambda i: loads.append(i) or real2(i)
    resumed = ResumableLoader(SampleReader(again, 0, 1, keys))
    resumed.load_state_dict({"position": 12})
    assert [resumed.next(4) for _ in range(2)] == full[3:]
    assert len(loads) == 8 and resumed.state_dict() == {"position": 20}


def test_worker_counts_are_summed_over_workers_and_restarts(world):
    stream = open_stream(world["shards"], image_decoder(TileTransform(32, 2)), seed=2, shuffle_window=4)
    loader = ResumableLoader(
        SampleReader(stream, 0, 1, keys), LoaderOptions(num_workers=2, prefetch_factor=1)
    )
    got = [loader.next(3) for _ in range(3)] + [loader.next(2) for _ in range(2)]  # a new shape restarts
    assert [p for b in got for p, _ in b] == list(range(13))
    st = loader.stats()
    assert st["tried"] == 13 and st["num_workers"] == 2 and stream.stats()["tried"] == 0  # read in workers
    assert add_counts({"a": 1, "e": {"r": ["x"]}}, {"a": 2, "e": {"r": ["y", "x"]}}) == {
        "a": 3,
        "e": {"r": ["x", "y"]},
    }


def test_shards_are_read_by_position_with_a_seeded_window_shuffle(world, tmp_path):
    stream = open_stream(world["shards"], image_decoder(TileTransform(32, 2)), seed=3, shuffle_window=5)
    assert isinstance(stream, ShardStream) and len(stream) == 13
    epoch0 = [stream.sample(g)["key"] for g in range(13)]
    epoch1 = [stream.sample(g)["key"] for g in range(13, 26)]
    stored = [s["key"] for s in iter_webdataset(world["shards"], image_decoder())]
    assert sorted(epoch0) == sorted(epoch1) == sorted(stored) and epoch0 != epoch1 != stored
    again = open_stream(world["shards"], image_decoder(TileTransform(32, 2)), seed=3, shuffle_window=5)
    assert [again.sample(g)["key"] for g in (20, 3, 17)] == [epoch1[7], epoch0[3], epoch1[4]]
    in_order = open_stream(world["shards"], image_decoder(), seed=3, shuffle_window=1)
    shard_of = [in_order.sample(g)["source"].rsplit(":", 1)[0] for g in range(13)]
    assert shard_of == sorted(shard_of, key=shard_of.index)  # whole shards, one after another

    # bad samples: the same skips as the sequential reader; a bad position is filled by the next usable one
    bad = tmp_path / "bad-00000.tar"
    good = world["shards"][0]
    with tarfile.open(good) as src, tarfile.open(bad, "w") as dst:
        for i, m in enumerate(src.getmembers()):
            data = src.extractfile(m).read()
            if i == 0:  # the first sample's image is corrupt
                data = b"\x89PNG broken"
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    s = open_stream(
        [str(bad)], image_decoder(TileTransform(32, 2)), seed=0, shuffle_window=1, max_bad_fraction=1.0
    )
    got = [s.sample(g) for g in range(4)]
    assert [x["position"] for x in got] == [0, 1, 2, 3] and got[0]["key"] == got[1]["key"]
    seq = SkipStats(max_bad_fraction=1.0)
    list(iter_webdataset(str(bad), image_decoder(), stats=seq))
    assert s.stats()["skipped_by_reason"] == dict(seq.skipped) == {"corrupt": 1}
    # a shard cut inside its third sample: the two before it are read, the cut one is refused unread
    cut = tmp_path / "cut-00000.tar"
    with tarfile.open(good) as src:
        third = [m for m in src.getmembers() if m.name.startswith("000002")][0]
    cut.write_bytes(open(good, "rb").read()[: third.offset_data + 10])
    s = open_stream(
        [str(cut)], image_decoder(TileTransform(32, 2)), seed=0, shuffle_window=1, max_bad_fraction=1.0
    )
    assert len(s) == 3 and [s.dataset.load(i) is not None for i in range(3)] == [True, True, False]
    assert s.stats()["skipped_by_reason"] == {"broken_shard": 1, "truncated": 1}


# ------------------------------------------------------------------------------------------------ text


@pytest.fixture(scope="module")
def tokens(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "shards"
    argv = ["data", "tokenize", "--tokenizer", str(corpus["tokenizer"]), "--out", str(out)]
    assert mm_main([*argv, "--doc-split", "line", "--shard-tokens", "3000", str(corpus["train"])]) == 0
    return out


def test_mm_data_tokenize_round_trip(corpus, tokens, capsys):
    tok = Tokenizer.from_file(corpus["tokenizer"])
    index = read_index(tokens)
    assert len(index["shards"]) > 1 and all(s["num_tokens"] <= 3000 for s in index["shards"])
    lines = [x for x in corpus["train"].read_text().splitlines() if x.strip()]
    assert index["num_documents"] == len(lines)
    first = np.memmap(tokens / index["shards"][0]["tokens"], dtype=np.uint32, mode="r")
    starts = np.load(tokens / index["shards"][0]["documents"])
    doc = first[starts[1] : starts[2]]
    assert doc[0] == tok.bos_id and doc[-1] == tok.eos_id and tok.decode(doc[1:-1].tolist()) == lines[1]
    memmapped = TokenCorpus.open([tokens], "shapes")
    in_memory = TokenCorpus.from_text(TextSource([str(corpus["train"])], doc_split="line"), tok)
    assert memmapped.num_tokens == in_memory.num_tokens == index["num_tokens"]
    assert all(np.array_equal(memmapped.document(d), in_memory.document(d)) for d in range(0, 1500, 37))
    assert Tokenizer.from_file(tokens).vocab_size == tok.vocab_size  # the folder keeps its tokenizer
    check_tokenizer(tokens, tok)
    other = Tokenizer.train(["a completely different tiny corpus"] * 50, 300)
    with pytest.raises(ValueError, match="was tokenized with another tokenizer"):
        check_tokenizer(tokens, other)
    assert mm_main(["data", "tokenize", "--tokenizer", str(corpus["tokenizer"]), "--out", str(tokens),
                    str(corpus["train"])]) == 2  # fmt: skip
    assert "already holds tokenized data" in capsys.readouterr().err


def rows(corpora, weights, world_size, state, steps, shape, workers=0):
    ranks = []
    for r in range(world_size):
        reader = TokenReader(corpora, weights, seed=4, rank=r, world=world_size, block_docs=50)
        loader = ResumableLoader(reader, LoaderOptions(num_workers=workers))
        if state is not None:
            loader.load_state_dict(state)
        ranks.append(([loader.next(shape(s)) for s in range(steps)], loader.state_dict(), loader.stats()))
    merged = [
        {k: torch.cat([out[s][k] for out, _, _ in ranks]) for k in ranks[0][0][s]} for s in range(steps)
    ]
    return merged, ranks


def test_packed_rows_do_not_depend_on_the_world_size_and_resume_anywhere(corpus, tokens):
    tok = Tokenizer.from_file(corpus["tokenizer"])
    corpora = [
        TokenCorpus.open([tokens], "web"),
        TokenCorpus.from_text(TextSource([str(corpus["heldout"])], doc_split="line", name="code"), tok),
    ]
    weights = [0.7, 0.3]

    def shape(step):  # a ramp: the sequence length grows at step 3
        return (8, 16 if step < 3 else 24, None)

    ref, _ = rows(corpora, weights, 1, None, 6, lambda s: shape(s))
    assert ref[0]["tokens"].shape == (8, 16) and ref[5]["tokens"].shape == (8, 24)
    first, ranks = rows(corpora, weights, 4, None, 3, shape, workers=1)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, ref[:3]) for k in a)
    state = ranks[0][1]
    assert all(st == state for _, st, _ in ranks) and state["row"] == 24 and sum(state["rows"]) == 24
    assert [st["rows_read"] for _, _, st in ranks] == [3 * 2] * 4  # each process read only its rows
    for n, workers in ((2, 2), (1, 0)):
        rest, _ = rows(corpora, weights, n, state, 3, lambda s: shape(s + 3), workers=workers)
        assert all(torch.equal(a[k], b[k]) for a, b in zip(rest, ref[3:]) for k in a)
    # labels: the next token, except where a document starts; doc ids restart in every row
    b = ref[0]
    assert torch.equal(
        b["labels"][:, :-1][b["labels"][:, :-1] != -100], b["tokens"][:, 1:][b["labels"][:, :-1] != -100]
    )
    assert (b["labels"][b["tokens"] == tok.eos_id] == -100).all() and (b["doc_ids"][:, 0] == 0).all()
    with pytest.raises(ValueError, match="other text sources"):
        rows(corpora[:1], [1.0], 1, state, 1, shape)


def test_lm_configs_of_real_size_need_a_tokenizer_and_no_large_bpe_in_a_multi_process_run(
    corpus, monkeypatch
):
    from pathlib import Path

    from mm.training.config import LMPretrainConfig, load_config
    from mm.training.runner import stage_for

    root = Path(__file__).resolve().parents[2]
    data = [f"data=[{{paths: [{corpus['train']}]}}]"]
    cfg = load_config(LMPretrainConfig, root / "configs/lm/llama3-8b.yaml", data)
    assert cfg.tokenizer.path
    with pytest.raises(
        FileNotFoundError, match=r"tokenizer.path=llama3/tokenizer.model does not exist.*Llama 3"
    ):
        stage_for(cfg).check()
    no_path = load_config(
        LMPretrainConfig, root / "configs/lm/llama3-8b.yaml", [*data, "tokenizer.path=null"]
    )
    with pytest.raises(ValueError, match="tokenizer.path is unset for model.preset='llama3-8b'"):
        stage_for(no_path).check()
    meta = Path(__import__("llama_models").__file__).parent / "llama3" / "tokenizer.model"
    if meta.is_file():  # Meta's Llama 3 tokenizer, as the preset expects it
        given = load_config(
            LMPretrainConfig, root / "configs/lm/llama3-8b.yaml", [*data, f"tokenizer.path={meta}"]
        )
        stage_for(given).check()
        assert Tokenizer.from_file(meta).vocab_size == given.tokenizer.vocab_size
    small = [*data, "model.preset=nano", "tokenizer.vocab_size=32000"]
    stage_for(
        load_config(LMPretrainConfig, root / "configs/lm/tiny.yaml", small)
    ).check()  # one process: allowed
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=r"tokenizer.vocab_size=32000 .* 4-process run"):
        stage_for(load_config(LMPretrainConfig, root / "configs/lm/tiny.yaml", small)).check()
    stage_for(load_config(LMPretrainConfig, root / "configs/lm/tiny.yaml", data)).check()  # 1024 ids: allowed
