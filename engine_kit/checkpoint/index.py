"""Reconcile the index (``registry.json``) with the files: the files win.

:func:`load_index` reads the registry and checks it against the directory:

- an entry whose file is missing, is not a regular file, or whose file's own
  record disagrees with it (name, step, epoch, order, run, size) is dropped
  from the index — the file itself is never touched;
- a ``*.ekpt`` file the index does not list is verified in full: it is
  *adopted* when it verifies, its record names it, and (with a ``run_id``
  filter) it belongs to that run; otherwise it is *set aside*: left in
  place, excluded from the index, and remembered with its size and mtime so
  it is only looked at again when it changes;
- a missing, unreadable or edited registry (its digest no longer matches)
  is rebuilt from the files that verify.

Checking an entry against its file reads only the file's record at its end,
so listing stays cheap; full verification happens for files the index does
not know and when a checkpoint is loaded. ``repair`` with ``full=True``
verifies every file.

>>> import tempfile
>>> load_index(tempfile.mkdtemp()).entries
[]
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any, NamedTuple

from engine_kit.checkpoint.fileformat import read_record, verify_checkpoint_file
from engine_kit.checkpoint.record import CheckpointRecord
from engine_kit.checkpoint.regular import describe_kind
from engine_kit.checkpoint.registry import (
    CHECKPOINT_SUFFIX,
    RegistryContents,
    RegistryEntry,
    read_registry,
    sort_key,
    validate_name,
)
from engine_kit.errors import CheckpointCorruptError

_ORDER_IN_NAME = re.compile(r"-(\d{1,18})\.ekpt$")


class IndexState(NamedTuple):
    """The reconciled index of a directory and what reconciling it changed.

    Attributes:
        entries: the checkpoints the index lists, oldest first.
        pending: unregistered names whose deletion a crash interrupted.
        set_aside: files kept in place but excluded: name -> {"reason", "size", "mtime_ns", "run_filter"}.
        next_order: a creation order above every one in use or on disk.
        rebuilt_because: why the registry itself could not be used (None: it could).
        missing: names dropped because their file is gone.
        invalid: why each entry that disagreed with its file was dropped.
        adopted: verified files the index did not list, now listed.
        newly_set_aside: files set aside by this reconciliation, with the reason.
    """

    entries: list[RegistryEntry]
    pending: list[str]
    set_aside: dict[str, dict[str, Any]]
    next_order: int
    rebuilt_because: str | None
    missing: list[str]
    invalid: list[str]
    adopted: list[str]
    newly_set_aside: dict[str, str]

    @property
    def changed(self) -> bool:
        """Whether the registry on disk differs from this index."""
        return bool(self.rebuilt_because or self.missing or self.invalid or self.adopted or self.newly_set_aside)

    def describe(self) -> str:
        """One line naming every repair (empty when nothing changed)."""
        parts = []
        if self.rebuilt_because:
            parts.append(f"the registry {self.rebuilt_because}")
        if self.missing:
            parts.append(f"dropped entries for missing files {self.missing}")
        if self.invalid:
            parts.append(f"dropped entries that disagree with their files ({'; '.join(self.invalid)})")
        if self.adopted:
            parts.append(f"adopted verified files it did not list {self.adopted}")
        if self.newly_set_aside:
            shown = "; ".join(f"{name}: {reason}" for name, reason in sorted(self.newly_set_aside.items()))
            parts.append(f"set aside (kept in place, not indexed) {shown}")
        return "; ".join(parts)


def _scan(directory: str) -> dict[str, os.stat_result]:
    """Every plausible checkpoint name in ``directory`` with its lstat."""
    found = {}
    with os.scandir(directory) as listing:
        for item in listing:
            if item.name.startswith(".") or not item.name.endswith(CHECKPOINT_SUFFIX):
                continue
            try:
                validate_name(item.name)
                found[item.name] = item.stat(follow_symlinks=False)
            except (ValueError, TypeError, FileNotFoundError):
                continue
    return found


def _entry_disagreement(entry: RegistryEntry, record: CheckpointRecord | None, size: int) -> str | None:
    """Why ``entry`` does not describe its file (None: it does)."""
    if entry.size != size:
        return f"{entry.name}: size {entry.size} listed, {size} on disk"
    if record is None:
        return None  # a format-1 file has no record to compare with
    listed = (entry.name, entry.step, entry.epoch, entry.order, entry.run_id)
    actual = (record.name, record.step, record.epoch, record.order, record.run_id)
    for field, said, has in zip(("name", "step", "epoch", "order", "run_id"), listed, actual):
        if said != has:
            return f"{entry.name}: {field} {said!r} listed, the file says {has!r}"
    return None


def _judge_unknown(directory: str, name: str, info: os.stat_result, run_id: str | None) -> RegistryEntry | str:
    """Adopt a file the index does not list (its entry), or say why it is set aside."""
    if not stat.S_ISREG(info.st_mode):
        return f"{describe_kind(info.st_mode)}, not a checkpoint file"
    try:
        verified = verify_checkpoint_file(os.path.join(directory, name))
    except CheckpointCorruptError as exc:
        return str(exc).split(" To fix:")[0].replace(f"Checkpoint {os.path.join(directory, name)!r} is unusable: ", "")
    record = verified.record
    if record is None:
        return "a format-1 file without a record (load it explicitly by path)"
    if record.name != name:
        return f"its record names it {record.name!r} (renamed or copied)"
    if run_id is not None and record.run_id != run_id:
        return f"it belongs to run {record.run_id!r}, not {run_id!r}"
    return RegistryEntry.from_record(record, verified.sha256, verified.size_bytes)


def _max_order_on_disk(directory: str, names: list[str], unlisted: dict[str, dict[str, Any]]) -> int:
    """The largest creation order the names in the directory, or the records of unlisted files, carry."""
    highest = 0
    for name in names:
        match = _ORDER_IN_NAME.search(name)
        if match:
            highest = max(highest, int(match.group(1)))
    for name in unlisted:
        try:
            record = read_record(os.path.join(directory, name))
        except (CheckpointCorruptError, OSError):
            continue
        if record is not None:
            highest = max(highest, record.order)
    return highest


def _read_or_rebuild(directory: str) -> tuple[RegistryContents, str | None]:
    try:
        contents = read_registry(directory)
    except CheckpointCorruptError as exc:
        reason = str(exc).split(" To fix:")[0]
        return RegistryContents([], [], [], {}, 1, False), f"could not be used ({reason})"
    return contents, None


def load_index(
    directory: str | os.PathLike[str],
    *,
    run_id: str | None = None,
    full: bool = False,
    known_aside: dict[str, dict[str, Any]] | None = None,
    known_adopted: dict[str, tuple[int, int, RegistryEntry]] | None = None,
) -> IndexState:
    """Read the registry and reconcile it with the files (nothing on disk changes).

    Args:
        directory: the checkpoint directory.
        run_id: adopt unlisted files only when their record carries this run.
        full: verify every listed file in full (digest and archive), not only its record.
        known_aside: set-aside files already judged (kept while unchanged).
        known_adopted: files already verified and adopted by an earlier call
            that could not persist them (read-only): name -> (size, mtime_ns,
            entry), reused while the file is unchanged.

    Returns:
        The reconciled :class:`IndexState`.
    """
    directory = os.fspath(directory)
    contents, rebuilt_because = _read_or_rebuild(directory)
    on_disk = _scan(directory)
    if rebuilt_because is None and not contents.found and on_disk:
        rebuilt_because = "was missing"
    if contents.dropped:
        rebuilt_because = rebuilt_because or f"had invalid entries ({'; '.join(contents.dropped)})"
    kept: list[RegistryEntry] = []
    missing: list[str] = []
    invalid: list[str] = []
    for entry in contents.entries:
        info = on_disk.get(entry.name)
        if info is None:
            missing.append(entry.name)
            continue
        problem = _check_listed(directory, entry, info, full)
        if problem is None:
            kept.append(entry)
        else:
            invalid.append(problem)
    listed = {entry.name for entry in kept}
    pending = [name for name in contents.pending if name in on_disk and name not in listed]
    if missing:
        # The index got ahead of the files (a power loss before the directory fsync can keep the
        # index's rename and lose the new file's): what it meant to delete is judged like any unlisted file.
        pending = []
    set_aside: dict[str, dict[str, Any]] = {}
    remembered = {**(known_aside or {}), **contents.set_aside}
    adopted: list[str] = []
    newly_set_aside: dict[str, str] = {}
    for name, info in sorted(on_disk.items()):
        if name in listed or name in pending:
            continue
        previous = remembered.get(name)
        unchanged = previous and (previous.get("size"), previous.get("mtime_ns")) == (info.st_size, info.st_mtime_ns)
        if unchanged and previous.get("run_filter") == run_id:  # judged under the same adoption rule
            set_aside[name] = previous
            continue
        cached = (known_adopted or {}).get(name)
        if cached and cached[:2] == (info.st_size, info.st_mtime_ns) and (run_id is None or cached[2].run_id == run_id):
            verdict: RegistryEntry | str = cached[2]
        else:
            verdict = _judge_unknown(directory, name, info, run_id)
        if isinstance(verdict, RegistryEntry):
            kept.append(verdict)
            adopted.append(name)
        else:
            set_aside[name] = {"reason": verdict, "size": info.st_size, "mtime_ns": info.st_mtime_ns, "run_filter": run_id}
            newly_set_aside[name] = verdict
    kept.sort(key=sort_key)
    unlisted = {**set_aside, **{name: {} for name in pending}}
    highest = _max_order_on_disk(directory, list(on_disk), unlisted)
    next_order = max([contents.next_order, highest + 1, *(entry.order + 1 for entry in kept)])
    return IndexState(kept, pending, set_aside, next_order, rebuilt_because, missing, invalid, adopted, newly_set_aside)


def _check_listed(directory: str, entry: RegistryEntry, info: os.stat_result, full: bool) -> str | None:
    """Why a listed entry cannot stay in the index (None: it stays)."""
    if not stat.S_ISREG(info.st_mode):
        return f"{entry.name}: {describe_kind(info.st_mode)} at that name"
    path = os.path.join(directory, entry.name)
    try:
        if full:
            verified = verify_checkpoint_file(path)
            record, size = verified.record, verified.size_bytes
            if verified.sha256 != entry.sha256:
                return f"{entry.name}: sha256 {entry.sha256[:12]}... listed, the file has {verified.sha256[:12]}..."
        elif entry.size != info.st_size:
            return _entry_disagreement(entry, None, info.st_size)  # truncated or grown: no need to read it
        else:
            record, size = read_record(path), info.st_size
    except CheckpointCorruptError as exc:
        return f"{entry.name}: {str(exc).split(' To fix:')[0]}"
    return _entry_disagreement(entry, record, size)
