"""The Llama 3 vocabulary layout: the split regex, the named special tokens and their ids, the byte-level alphabet.

Id layouts:

- tiktoken file (`tokenizer.model`, lines "base64token rank", ranks 0..n-1): ordinary tokens keep their
  rank as id; the 256 special tokens follow at n..n+255: first `SPECIAL_TOKENS` in order, then
  `<|reserved_special_token_2|>` onwards (so Llama 3 gets `<|begin_of_text|>` = 128000, `<|image|>` = 128011).
- `Tokenizer.train`: the 256 single bytes, then the learned tokens in merge order, then exactly
  `SPECIAL_TOKENS` at the end (no reserved padding). Ordinary ids are tiktoken ranks, so `export_tiktoken`
  plus `from_file` gives the same ordinary ids and the same ids for the first 15 special tokens.
- `tokenizer.json` from elsewhere: ids as in the file; any of `MULTIMODAL_TOKENS` it lacks is added as a
  special token with a new id at the end (e.g. a Llama 3.1 file gets `<|image|>` = 128256 as in Mllama).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache

__all__ = [
    "LLAMA3_PAT_STR",
    "MULTIMODAL_TOKENS",
    "NUM_TIKTOKEN_SPECIAL_TOKENS",
    "SPECIAL_TOKENS",
    "SpecialTokenIds",
    "byte_level_ranks",
    "tiktoken_special_tokens",
]

# The pre-tokenization regex of Llama 3 (`pat_str` in llama-models; the Split pattern of Meta's tokenizer.json).
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The named special tokens mm uses, in id order (Llama 3.2's layout plus video and speech markers).
SPECIAL_TOKENS: list[str] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
    "<|video|>",
    "<|speech_start|>",
    "<|speech_end|>",
]

# The media markers mm adds to a tokenizer.json that lacks them.
MULTIMODAL_TOKENS: list[str] = ["<|image|>", "<|video|>", "<|speech_start|>", "<|speech_end|>"]

# A Llama 3 tiktoken vocabulary has this many special ids after its base ranks.
NUM_TIKTOKEN_SPECIAL_TOKENS = 256

_RESERVED_RE = re.compile(r"<\|reserved_special_token_\d+\|>")


def tiktoken_special_tokens() -> list[str]:
    """Return the 256 special token strings of a Llama 3 tiktoken vocabulary, in id order."""
    n_reserved = NUM_TIKTOKEN_SPECIAL_TOKENS - len(SPECIAL_TOKENS)
    return SPECIAL_TOKENS + [f"<|reserved_special_token_{2 + k}|>" for k in range(n_reserved)]


@cache
def _byte_to_unicode() -> dict[int, str]:
    """Return the GPT-2 byte-level table: each byte maps to one printable unicode character."""
    # Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are shifted to 256+.
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {}
    shifted = 0
    for b in range(256):
        if b in kept:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@cache
def _unicode_to_byte() -> dict[str, int]:
    """Return the inverse of the byte-level table."""
    return {c: b for b, c in _byte_to_unicode().items()}


def byte_level_ranks(vocab: Mapping[str, int]) -> dict[bytes, int]:
    """The tiktoken ranks (token bytes -> id) of a byte-level BPE's ordinary vocabulary (token string -> id)."""
    u2b = _unicode_to_byte()
    ranks = {}
    for token, i in vocab.items():
        if not token or any(c not in u2b for c in token):
            raise ValueError(f"export_tiktoken needs a byte-level BPE; token {token!r} (id {i}) is not")
        ranks[bytes(u2b[c] for c in token)] = i
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("export_tiktoken needs the ordinary token ids to be 0..n-1 (tiktoken ranks)")
    return ranks


class SpecialTokenIds:
    """The special-token lookups of a tokenizer whose `_special` maps each special token string to its id."""

    _special: dict[str, int]
    _special_ids: frozenset[int]

    def special_id(self, token: str) -> int:
        """Return the id of a special token such as "<|image|>"; ValueError naming it if this vocabulary lacks it."""
        try:
            return self._special[token]
        except KeyError:
            named = [t for t in self._special if not _RESERVED_RE.fullmatch(t)]
            n_reserved = len(self._special) - len(named)
            raise ValueError(
                f"unknown special token {token!r}; known: {', '.join(named)}"
                + (f" and {n_reserved} <|reserved_special_token_k|>" if n_reserved else "")
            ) from None

    @property
    def special_tokens(self) -> dict[str, int]:
        """All special tokens of this vocabulary, string -> id."""
        return dict(self._special)

    @property
    def special_ids(self) -> frozenset[int]:
        """The set of all special ids."""
        return self._special_ids

    @property
    def bos_id(self) -> int:
        """Id of `<|begin_of_text|>`."""
        return self.special_id("<|begin_of_text|>")

    @property
    def eos_id(self) -> int:
        """Id of `<|end_of_text|>` (end of a document)."""
        return self.special_id("<|end_of_text|>")

    @property
    def eot_id(self) -> int:
        """Id of `<|eot_id|>` (end of a turn)."""
        return self.special_id("<|eot_id|>")

    @property
    def pad_id(self) -> int:
        """Id of `<|finetune_right_pad_id|>`."""
        return self.special_id("<|finetune_right_pad_id|>")

    @property
    def image_id(self) -> int:
        """Id of `<|image|>`."""
        return self.special_id("<|image|>")

    @property
    def video_id(self) -> int:
        """Id of `<|video|>`."""
        return self.special_id("<|video|>")

    @property
    def speech_start_id(self) -> int:
        """Id of `<|speech_start|>`."""
        return self.special_id("<|speech_start|>")

    @property
    def speech_end_id(self) -> int:
        """Id of `<|speech_end|>`."""
        return self.special_id("<|speech_end|>")
