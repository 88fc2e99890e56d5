"""What repairing a checkpoint directory found."""

from __future__ import annotations

from typing import NamedTuple


class RepairReport(NamedTuple):
    """What :meth:`CheckpointDirectory.repair` found and did (no checkpoint is ever deleted by it).

    Attributes:
        missing: indexed names whose file was gone (entries dropped).
        invalid: why each entry that disagreed with its file was dropped.
        finished: files a crashed rotation had unindexed; now deleted.
        orphans: files left in place but excluded from the index (set aside).
        adopted: verified files the index did not list; now listed.
        rebuilt_because: why registry.json itself was rebuilt (None: it was usable).
        set_aside: why each newly set-aside file was excluded.
    """

    missing: list[str]
    invalid: list[str]
    finished: list[str]
    orphans: list[str]
    adopted: list[str] = []
    rebuilt_because: str | None = None
    set_aside: dict[str, str] = {}

