"""Which checkpoints to keep: the last k saved and the best k by a metric.

A plain object with no file or engine knowledge, so the rules are testable
with scripted scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

from engine_kit.errors import fix_message


@dataclass(frozen=True)
class Kept:
    """One checkpoint as the policy sees it."""

    name: str
    step: int
    metric: float | None = None
    tags: frozenset[str] = field(default_factory=frozenset)


def _is_score(metric: float | None) -> bool:
    # NaN and infinities are never "best": an exploded run must not win.
    return metric is not None and math.isfinite(metric)


@dataclass(frozen=True)
class RotationPolicy:
    """Keep the ``keep_last`` newest and the ``keep_best`` best checkpoints.

    A checkpoint that is both among the last and the best is one file with
    both tags; last-k rotation never removes a best one. Ties in the metric
    keep the earlier checkpoint.

    >>> policy = RotationPolicy(keep_last=1, keep_best=1, mode="max")
    >>> kept, dropped = policy.admit([], Kept("a", 1, 0.5))
    >>> kept, dropped = policy.admit(kept, Kept("b", 2, 0.4))
    >>> sorted((k.name, sorted(k.tags)) for k in kept), dropped
    ([('a', ['best']), ('b', ['last'])], [])
    """

    keep_last: int = 1
    keep_best: int = 0
    mode: str = "max"

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_best"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(fix_message(f"{name}={value!r} is not an integer >= 0.", f"pass {name}=0 or more."))
        if self.keep_last + self.keep_best == 0:
            raise ValueError(fix_message("keep_last=0 and keep_best=0 keep nothing.", "keep at least one checkpoint."))
        if self.mode not in ("min", "max"):
            raise ValueError(fix_message(f"mode={self.mode!r} is not 'min' or 'max'.", "pass mode='min' or 'max'."))

    def better(self, a: float, b: float) -> bool:
        """True when score ``a`` is strictly better than ``b``."""
        return a > b if self.mode == "max" else a < b

    def admit(self, kept: Sequence[Kept], new: Kept) -> tuple[list[Kept], list[str]]:
        """Add ``new`` and return (the checkpoints to keep with their tags, names to delete)."""
        # A newer save of the same step supersedes the older one.
        candidates = [k for k in kept if k.step != new.step] + [new]
        superseded = [k.name for k in kept if k.step == new.step and k.name != new.name]
        last = sorted(candidates, key=lambda k: k.step)[-self.keep_last :] if self.keep_last else []
        best = self.ranked(candidates)[: self.keep_best]
        last_names, best_names = {k.name for k in last}, {k.name for k in best}
        result, dropped = [], list(superseded)
        for k in candidates:
            tags = frozenset(
                tag for tag, names in (("last", last_names), ("best", best_names)) if k.name in names
            )
            if tags:
                result.append(replace(k, tags=tags))
            else:
                dropped.append(k.name)
        return result, dropped

    def ranked(self, kept: Sequence[Kept]) -> list[Kept]:
        """Checkpoints with a finite metric, best first (ties: the earlier step first)."""
        sign = -1.0 if self.mode == "max" else 1.0
        return sorted((k for k in kept if _is_score(k.metric)), key=lambda k: (sign * k.metric, k.step))

    def would_keep(self, kept: Sequence[Kept], metric: float | None) -> bool:
        """Would a new checkpoint with ``metric`` enter the best k now?

        Decided from the metrics alone, never from stored tags: the kept set
        always holds the best k, so its ranking is the whole run's ranking.
        """
        if self.keep_best == 0 or not _is_score(metric):
            return False
        best = self.ranked(kept)[: self.keep_best]
        return len(best) < self.keep_best or self.better(metric, best[-1].metric)
