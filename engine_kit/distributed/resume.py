"""Start and resume a multi-process run: every rank from the one checkpoint rank 0 chose, or none does.

Steps, each ending on every rank with the same outcome (see
:mod:`engine_kit.distributed.agreement`):

1. **Choose** — rank 0 picks the checkpoint (the newest that verifies, or the
   file the user named) and broadcasts its name and SHA-256.
2. **Load** — every rank loads that name from its checkpoint directory and
   checks the digest. A rank that lacks the file or holds other bytes (a stale
   or node-local view) stops the run on every rank; it never resumes from
   another step.
3. **Check** — every rank runs the resume checks (architecture, optimizer,
   data order, world size, ...) before anything is applied; a refusal on any
   rank leaves every rank untouched.
4. **Apply** — every rank applies the payload, then its own slot of the
   per-rank states (RNG, data position).
5. **Confirm** — the ranks compare their resumed position; any difference
   stops the run on every rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ignite.engine import Engine

from engine_kit.checkpoint import CheckpointDirectory, load_checkpoint_file, sha256_file
from engine_kit.distributed.agreement import agree, check_same, decide, rank
from engine_kit.distributed.rank_state import restore_own_rank_state
from engine_kit.distributed.shared_dir import check_shared_directory
from engine_kit.distributed.sharded import refuse_sharded_model
from engine_kit.resume_checks import check_resume
from engine_kit.training_state import restore_training_state


def _choose(resume: str | os.PathLike[str], open_directory: Callable[[], CheckpointDirectory], keep: dict[str, Any]) -> dict[str, Any] | None:
    """Rank 0: the checkpoint to resume from, as {name, sha256}; its payload stays in ``keep``."""
    if resume == "auto":
        found = open_directory().load_newest_valid()
        if found is None:
            return None
        entry, keep["payload"] = found
        return {"name": entry.name, "sha256": entry.sha256}
    path = os.path.abspath(os.fspath(resume))
    sha256 = sha256_file(path)
    keep["payload"] = load_checkpoint_file(path, expected_sha256=sha256)
    return {"name": path, "sha256": sha256}


def _position(engine: Engine) -> dict[str, Any]:
    state = engine.state
    loader = state.dataloader
    return {
        "iteration": int(state.iteration),
        "epoch": int(state.epoch),
        "optimizer_steps": int(getattr(state, "optimizer_steps", 0)),
        "data": loader.state_dict() if hasattr(loader, "state_dict") else None,
    }


def check_run_start(engine: Engine, dirname: str) -> None:
    """At ``STARTED``, before any save or resume: what a multi-process ``CheckpointRotation`` needs.

    A sharded (FSDP2) model is refused now rather than at the first save;
    every rank must have as many batches per epoch (otherwise the ranks with
    more wait forever in an all-reduce the others never join) and must see
    rank 0's checkpoint directory (a collective; this also orders rank 0's
    ``mkdir`` before any other rank reads the directory).
    """
    refuse_sharded_model(engine.step.model)
    check_same("the number of batches per epoch (epoch_length)", engine.state.epoch_length)
    check_shared_directory(dirname)


def resume_every_rank(
    engine: Engine,
    *,
    dirname: str,
    resume: str | os.PathLike[str],
    open_directory: Callable[[], CheckpointDirectory],
    strict: bool = True,
) -> str | None:
    """Resume ``engine`` on every rank from the checkpoint rank 0 chooses (a collective).

    Args:
        engine: a ``create_trainer`` engine, at ``STARTED``.
        dirname: this rank's checkpoint directory (the same shared one on every rank).
        resume: ``"auto"`` (rank 0's newest valid checkpoint) or a file path.
        open_directory: returns rank 0's writable ``CheckpointDirectory`` (called on rank 0 only).
        strict: refuse an inexact resume (see ``restore_training_state``).

    Returns:
        The path resumed from on this rank, or None when there is nothing to resume.

    Raises:
        RankAgreementError: on every rank, naming the ranks that could not
            load, check or apply the chosen checkpoint, or whose resumed
            position differs.
    """
    keep: dict[str, Any] = {}
    chosen = decide("choose the checkpoint to resume from", lambda: _choose(resume, open_directory, keep))
    if chosen is None:
        return None
    path = chosen["name"] if os.path.isabs(chosen["name"]) else os.path.join(dirname, chosen["name"])

    def load() -> dict[str, Any]:
        if "payload" in keep:
            return keep.pop("payload")  # rank 0 loaded and verified it while choosing
        return load_checkpoint_file(path, expected_sha256=chosen["sha256"])

    payload = agree(f"load the checkpoint {chosen['name']!r} that rank 0 chose", load)

    def check() -> None:
        if check_resume(engine, payload).refused(strict):
            # Raises the refusal, listing every difference, and applies nothing.
            restore_training_state(engine, payload, strict=strict)

    agree(f"check the checkpoint {chosen['name']!r} against this run", check)

    def apply() -> None:
        report = restore_training_state(engine, payload, strict=strict)
        # An inexact resume (strict=False) may have left the data position alone on purpose: so does this.
        loader = engine.state.dataloader if not report.inexact else None
        restore_own_rank_state(payload, loader, rank())

    agree(f"apply the checkpoint {chosen['name']!r}", apply)
    check_same("the resumed position", _position(engine))
    return path
