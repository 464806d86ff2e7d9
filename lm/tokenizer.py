"""The mm tokenizer: Llama 3 tiktoken BPE files, Hugging Face tokenizer.json files, and small trained BPEs.

Follows Meta's Llama 3 tokenizer (meta-llama/llama-models `models/llama3/tokenizer.py`: byte-level BPE,
the Llama 3 split regex, 256 special tokens after the base ranks, `<|image|>` at base + 11 as in Llama 3.2)
and the structure of Meta's Hugging Face `tokenizer.json` (regex Split + ByteLevel pre-tokenizer, ByteLevel
decoder, `ignore_merges`).

The vocabulary layout (special tokens, their ids per file format, the byte-level alphabet) is in `vocab.py`.

User text never produces a special token: `encode` treats `<|image|>` and friends inside text as ordinary
characters. Special ids enter a sequence only through `bos`/`eos` or by the caller inserting `special_id(...)`.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tiktoken
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from .io import atomic_write_bytes
from .vocab import (
    LLAMA3_PAT_STR,
    MULTIMODAL_TOKENS,
    SPECIAL_TOKENS,
    SpecialTokenIds,
    byte_level_ranks,
    tiktoken_special_tokens,
)

__all__ = ["Tokenizer"]


def _merges_from_ranks(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Derive HF merges that reproduce tiktoken's rank-based BPE: every split of a token into two tokens."""
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank; an HF BPE whose merges are
    # all such splits, ordered by the rank of the result, does the same (this is how Meta's tokenizer.json
    # was derived from tokenizer.model).
    found: list[tuple[int, int, int, str, str]] = []
    for token, rank in vocab.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in vocab and right in vocab:
                found.append((rank, vocab[left], vocab[right], left, right))
    found.sort()
    return [(left, right) for _, _, _, left, right in found]


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file (lines "base64token rank") and check it is a complete byte-level vocabulary."""
    # Parsed here rather than with tiktoken.load.load_tiktoken_bpe, which caches files by path name in a temp
    # folder and would return stale ranks for a file rewritten at the same path.
    expected = "a tiktoken BPE file (lines 'base64token rank', e.g. Llama 3's tokenizer.model)"
    try:
        text = path.read_bytes().decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(
            f"{path} is not {expected}: it is binary (a SentencePiece model, as in Llama 2, is not supported)"
        ) from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("wrong number of fields")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except ValueError:
            raise ValueError(f"{path}:{lineno} is not {expected}: got {line[:80]!r}") from None
        if token in ranks:
            raise ValueError(f"{path}:{lineno}: token {token!r} appears twice")
        ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path} is empty; expected {expected}")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(
            f"{path}: not a byte-level BPE, {len(missing)} single bytes have no rank (e.g. {missing[0]})"
        )
    return ranks


class Tokenizer(SpecialTokenIds):
    """Byte-level BPE tokenizer over a tiktoken or Hugging Face `tokenizers` backend, with mm's special tokens."""

    def __init__(
        self,
        hf: HFTokenizer | None = None,
        *,
        tiktoken_ranks: dict[bytes, int] | None = None,
        name: str = "mm",
    ) -> None:
        """Wrap one backend: an HF `tokenizers.Tokenizer` (modified in place) or tiktoken ranks (bytes -> rank)."""
        if (hf is None) == (tiktoken_ranks is None):
            raise ValueError("Tokenizer needs exactly one of `hf` or `tiktoken_ranks`")
        self._hf: HFTokenizer | None = None
        self._tt: tiktoken.Encoding | None = None
        self._ranks: dict[bytes, int] | None = None
        if hf is not None:
            specials = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
            missing = [t for t in MULTIMODAL_TOKENS if t not in specials]
            if missing:
                hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
                specials = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
            # Special-token strings inside user text are split like any other text.
            hf.encode_special_tokens = True
            self._hf = hf
            self._special = specials
            self._vocab_size = max(hf.get_vocab(with_added_tokens=True).values()) + 1
        else:
            assert tiktoken_ranks is not None
            n_base = len(tiktoken_ranks)
            specials = {t: n_base + i for i, t in enumerate(tiktoken_special_tokens())}
            self._tt = tiktoken.Encoding(
                name=name, pat_str=LLAMA3_PAT_STR, mergeable_ranks=tiktoken_ranks, special_tokens=specials
            )
            self._ranks = tiktoken_ranks
            self._special = specials
            self._vocab_size = self._tt.n_vocab
        self._special_ids = frozenset(self._special.values())

    def __setstate__(self, state: dict) -> None:
        """Restore after pickling (DataLoader workers); `encode_special_tokens` is not part of HF's pickle."""
        self.__dict__.update(state)
        if self._hf is not None:
            self._hf.encode_special_tokens = True

    # ----------------------------------------------------------------------------------------- constructors

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a tokenizer.json (HF tokenizers) or tokenizer.model (tiktoken) file, or a folder holding one."""
        path = Path(path)
        if path.is_dir():
            candidates = [
                path / "tokenizer.json",
                path / "tokenizer.model",
                path / "original" / "tokenizer.model",
            ]
            found = next((p for p in candidates if p.is_file()), None)
            if found is None:
                raise FileNotFoundError(
                    f"no tokenizer in folder {path}: expected tokenizer.json (Hugging Face tokenizers) "
                    "or tokenizer.model (tiktoken BPE, as shipped with Llama 3)"
                )
            path = found
        elif not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {path} does not exist: expected a tokenizer.json (Hugging Face tokenizers), "
                "a tokenizer.model (tiktoken BPE), or a folder holding one"
            )
        with path.open("rb") as f:
            head = f.read(64).lstrip()
        if path.suffix == ".json" or head.startswith(b"{"):
            try:
                hf = HFTokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises a bare Exception on bad files
                raise ValueError(f"could not read {path} as a Hugging Face tokenizer.json: {e}") from e
            return cls(hf)
        return cls(tiktoken_ranks=_read_tiktoken_ranks(path), name=path.stem)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a deterministic byte-level BPE (HF tokenizers, Llama 3 regex) with `SPECIAL_TOKENS` at the end."""
        n_special = len(SPECIAL_TOKENS)
        if vocab_size < 256 + n_special:
            raise ValueError(
                f"vocab_size must be at least {256 + n_special} (256 bytes + specials), got {vocab_size}"
            )
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_PAT_STR), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - n_special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],  # added after training, so they take the last ids as in Llama 3
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        # Re-express the learned vocabulary with tiktoken semantics (rank = id, merges = all splits,
        # ignore_merges) as Meta's tokenizer.json does, so the tiktoken export encodes identically.
        vocab = tok.get_vocab(with_added_tokens=False)
        tok.model = models.BPE(vocab=vocab, merges=_merges_from_ranks(vocab), ignore_merges=True)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        return cls(tok)

    # ---------------------------------------------------------------------------------------------- saving

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write tokenizer.json (HF backend) or tokenizer.model (tiktoken backend) into directory; return it."""
        directory = Path(directory)
        if self._hf is not None:
            path = directory / "tokenizer.json"
            atomic_write_bytes(path, self._hf.to_str(pretty=True).encode("utf-8"))
            return path
        path = directory / "tokenizer.model"
        self.export_tiktoken(path)
        return path

    def export_tiktoken(self, path: str | os.PathLike[str]) -> Path:
        """Write the ordinary (non-special) vocabulary as a tiktoken BPE file, rank = id; return the path."""
        path = Path(path)
        if self._ranks is not None:
            ranks = self._ranks
        else:
            assert self._hf is not None
            model = json.loads(self._hf.to_str())["model"]
            if model.get("type") != "BPE":
                raise ValueError(f"export_tiktoken needs a BPE model, this tokenizer has {model.get('type')}")
            vocab = {
                t: i for t, i in self._hf.get_vocab(with_added_tokens=False).items() if t not in self._special
            }
            ranks = byte_level_ranks(vocab)
        lines = [
            f"{base64.b64encode(t).decode('ascii')} {r}\n"
            for t, r in sorted(ranks.items(), key=lambda x: x[1])
        ]
        atomic_write_bytes(path, "".join(lines).encode("ascii"))
        return path

    # ------------------------------------------------------------------------------------ encode / decode

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Encode user text as ordinary text (never a special id), optionally adding bos / end_of_text."""
        if self._tt is not None:
            ids = self._tt.encode_ordinary(text)
        else:
            assert self._hf is not None
            ids = self._hf.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, bos, eos)

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        """Encode several user texts (in parallel in the backend); same rules as `encode`."""
        texts = list(texts)
        if self._tt is not None:
            batch = self._tt.encode_ordinary_batch(texts)
        else:
            assert self._hf is not None
            batch = [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        return [self._wrap(ids, bos, eos) for ids in batch]

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        """Add the bos / eos ids around an encoded text."""
        if bos:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text; special tokens appear as their strings, invalid UTF-8 as U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self._vocab_size - 1})")
        if self._tt is not None:
            return self._tt.decode(ids)
        assert self._hf is not None
        return self._hf.decode(ids, skip_special_tokens=False)

    # ----------------------------------------------------------------------------------------- chat format

    def encode_dialog(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Llama 3 chat format: `<|begin_of_text|>`, then per message `<|start_header_id|>role<|end_header_id|>`
        "\n\n" content `<|eot_id|>`, then the assistant's header when `add_generation_prompt`.

        A message is {"role": "system"|"user"|"assistant"|"tool", "content": ...}; content is a string or a list
        of strings and {"type": "image"} items (each one `<|image|>`). Text never becomes a special token.
        """
        ids = [self.bos_id]
        for k, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ("system", "user", "assistant", "tool"):
                raise ValueError(f"message {k}: role={role!r}; allowed: system, user, assistant, tool")
            ids += self.header_ids(role)
            for item in content if isinstance(content, list) else [content]:
                if isinstance(item, str):
                    ids += self.encode(item)
                elif isinstance(item, Mapping) and item.get("type") == "image":
                    ids.append(self.image_id)
                else:
                    raise ValueError(
                        f"message {k}: content items are strings or {{'type': 'image'}}, got {item!r}"
                    )
            ids.append(self.eot_id)
        if add_generation_prompt:
            ids += self.header_ids("assistant")
        return ids

    def header_ids(self, role: str) -> list[int]:
        """`<|start_header_id|>role<|end_header_id|>` + "\n\n" (Meta names the tool role `ipython`)."""
        name = "ipython" if role == "tool" else role
        head = [
            self.special_id("<|start_header_id|>"),
            *self.encode(name),
            self.special_id("<|end_header_id|>"),
        ]
        return head + self.encode("\n\n")

    @property
    def vocab_size(self) -> int:
        """Number of ids including special tokens (max id + 1); the LM's embedding table needs at least this."""
        return self._vocab_size

    @property
    def backend(self) -> str:
        """Which backend encodes: "tiktoken" or "tokenizers"."""
        return "tiktoken" if self._tt is not None else "tokenizers"

    def __len__(self) -> int:
        """Same as `vocab_size`."""
        return self._vocab_size

    def __repr__(self) -> str:
        """Short description: backend, vocabulary size, number of special tokens."""
        return (
            f"Tokenizer(backend={self.backend}, vocab_size={self._vocab_size}, specials={len(self._special)})"
        )
