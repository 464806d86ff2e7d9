"""Fixtures for the composition-layer tests: a small shapes corpus and a tokenizer trained on it."""

from pathlib import Path

import pytest

from mm.datasets.shapes import synth_text
from mm.datasets.text import read_documents
from mm.lm import Tokenizer


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    train = synth_text(root, n=1500, seed=0, split="train")
    heldout = synth_text(root, n=120, seed=0, split="heldout")
    tok = Tokenizer.train(read_documents(train, doc_split="line"), 400)
    tok_path = tok.save(root / "tok")
    return {"train": train, "heldout": heldout, "tokenizer": tok_path, "root": root}
