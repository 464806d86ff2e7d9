"""The bad-input policy of the media readers: a sample that cannot be used (missing file, zero-byte file, corrupt
or truncated data, too many pixels, no caption, ...) is skipped; `SkipStats` counts skips per reason, keeps the
first few sources per reason and logs each (the first 20 per reason at WARNING, later ones at DEBUG). Once at
least `min_tried` samples were tried, a skipped fraction above `max_bad_fraction` (default 0.05) raises
`TooManyBadSamples` naming the counts: a mostly broken dataset stops the run instead of silently shrinking it.
With DataLoader workers each worker counts (and checks) its own share.

A decoder signals an unusable sample by raising `BadSample(reason, detail)`; any other exception is a bug and
propagates.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BadSample", "SkipStats", "TooManyBadSamples", "read_media_file"]

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 5  # sources kept per skip reason (and malformed manifest lines logged)
_MAX_LOGGED = 20  # skips logged at WARNING per reason (later ones at DEBUG)


class BadSample(Exception):
    """A sample that must be skipped; `reason` is a short key (e.g. "corrupt"), `detail` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class TooManyBadSamples(RuntimeError):
    """More than `max_bad_fraction` of the samples tried were skipped."""


@dataclass
class SkipStats:
    """Samples tried and skipped (per reason, with the first few sources); enforces `max_bad_fraction`."""

    max_bad_fraction: float = 0.05
    min_tried: int = 20
    what: str = "samples"  # how the error names the data, e.g. "samples of manifest train.jsonl"
    tried: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction!r}")

    @property
    def n_skipped(self) -> int:
        """Total skipped samples."""
        return sum(self.skipped.values())

    def ok(self) -> None:
        """Record (and check) a good sample: early skips can push the fraction over the limit at `min_tried`."""
        self.tried += 1
        self.check()

    def skip(self, reason: str, source: str, detail: str = "") -> None:
        """Record, log and check one skipped sample."""
        self.tried += 1
        self.skipped[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < MAX_EXAMPLES:
            kept.append(source)
        level = logging.WARNING if self.skipped[reason] <= _MAX_LOGGED else logging.DEBUG
        logger.log(level, "skipped %s (%s%s)", source, reason, f": {detail}" if detail else "")
        self.check()

    def check(self) -> None:
        """Raise TooManyBadSamples if the skipped fraction is above the limit (after `min_tried` samples)."""
        if self.tried < self.min_tried or self.n_skipped <= self.max_bad_fraction * self.tried:
            return
        reasons = ", ".join(
            f"{r}: {n} (e.g. {', '.join(self.examples[r][:3])})" for r, n in self.skipped.items()
        )
        raise TooManyBadSamples(
            f"{self.n_skipped} of {self.tried} {self.what} tried were skipped "
            f"({self.n_skipped / self.tried:.1%} > max_bad_fraction={self.max_bad_fraction:.1%}); {reasons}"
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict summary (for logs and reports)."""
        return {
            "tried": self.tried,
            "skipped": self.n_skipped,
            "skipped_by_reason": dict(self.skipped),
            "examples": {r: list(v) for r, v in self.examples.items()},
        }


def read_media_file(path: Path) -> bytes:
    """The bytes of a media file; raise BadSample ("missing", "unreadable") if it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadSample("missing", "file does not exist") from None
    except OSError as e:
        raise BadSample("unreadable", f"{type(e).__name__}: {e}") from None
