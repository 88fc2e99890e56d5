"""What ``CheckpointRotation`` does with the checkpoints already in its directory when a run starts.

A fresh run (``resume=None``) refuses a directory that holds an earlier
run's checkpoints; a run resumed from an explicit file older than the
directory's newest moves the newer ones aside (never deletes them).
"""

from __future__ import annotations

import os
import time
import warnings

from engine_kit.checkpoint import CheckpointDirectory
from engine_kit.errors import CheckpointDirectoryNotEmptyError, fix_message


def refuse_foreign_checkpoints(directory: CheckpointDirectory) -> None:
    """Raise ``CheckpointDirectoryNotEmptyError`` when ``directory`` already holds checkpoints."""
    existing = directory.entries()
    if existing:
        newest = max(existing, key=lambda e: e.step)
        problem = (
            f"resume=None starts a fresh run, but {directory.path!r} already holds {len(existing)} checkpoint(s) "
            f"of an earlier run (newest {newest.name!r}, step {newest.step}); a fresh run there would mix them "
            "into its rotation. Nothing was changed."
        )
        raise CheckpointDirectoryNotEmptyError(
            fix_message(problem, "pass resume='auto' to continue that run, point the new run at another directory, "
                        "or move those files away first.")
        )


def branch_from(directory: CheckpointDirectory, step: int, path: str) -> None:
    """Resuming at ``step`` from the file ``path``: keep every newer checkpoint, out of this run's rotation.

    They are moved into a ``branched-from-step<N>-<time>`` subfolder, never
    deleted; the resumed run then saves and rotates as usual.
    """
    resumed = os.path.basename(path) if os.path.dirname(path) == directory.path else None
    newer = [e.name for e in directory.entries() if e.step > step and e.name != resumed]
    if not newer:
        return
    folder = f"branched-from-step{step:08d}-{time.strftime('%Y%m%d-%H%M%S')}"
    directory.set_aside(newer, folder)
    warnings.warn(
        f"CheckpointRotation: resumed from step {step}, older than the newest checkpoint; the newer checkpoints "
        f"{newer} were moved (not deleted) to {os.path.join(directory.path, folder)!r}.", stacklevel=3,
    )
