"""Deterministic seeds derived from names (the same value in every process and run)."""

import hashlib


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from the parts' text (stable across processes and Python runs)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")
