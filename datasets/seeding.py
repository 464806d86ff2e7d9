"""Seeds derived from names and numbers: every seeded order or draw of the readers takes its seed from a tag and
the numbers it depends on (seed, epoch, window, position), so it is the same in every process and run."""

from __future__ import annotations

import hashlib

__all__ = ["derive_seed"]


def derive_seed(*parts: object) -> int:
    """A 64-bit seed derived from the parts (stable across runs and Python versions)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")
