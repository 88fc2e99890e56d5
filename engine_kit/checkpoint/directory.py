"""A directory of committed checkpoints: commit, remove, verify, load, repair.

The files are the truth and ``registry.json`` is an index over them
(:mod:`engine_kit.checkpoint.index`): every file carries its own record, so
a missing, damaged, edited or inconsistent registry is rebuilt from the
files that verify, with one warning naming what was repaired — never a
refusal, never a deletion.

Ordering is what keeps a crash harmless:

- :meth:`CheckpointDirectory.commit` writes the file atomically, *then*
  indexes it, then fsyncs the directory once for both renames, and only
  then deletes the files rotation ranked out. A kill in between leaves a
  complete file the index does not list yet; the next open adopts it.
- :meth:`CheckpointDirectory.remove` unindexes first (noting the names as
  pending deletions), *then* unlinks. A kill in between leaves pending
  files, deleted at the next open, never an entry for a missing file, so
  rotation with keep-last = 1 always leaves a valid checkpoint.

:meth:`CheckpointDirectory.commit_async` does the same commit on a
background writer thread (see :mod:`engine_kit.checkpoint.async_commit`);
while it is in flight every other call on the directory waits for it.

A file that verifies is never overwritten or deleted, except by
:meth:`~CheckpointDirectory.remove` of names the index holds (rotation):
:meth:`~CheckpointDirectory.commit` refuses any name already present, and
:meth:`~CheckpointDirectory.next_name` hands out names whose creation order
is above every order in the index and on disk, so a rerun after the index
was lost never reuses a name. A file the index does not list is adopted if
it verifies (and belongs to ``run_id``, when given), else set aside: left in
place and excluded.

Deletion never follows symlinks: ``os.lstat`` decides, a symlink or any
non-regular file at an indexed name is left alone with a warning, and
``os.unlink`` on a name removes at most that name.

>>> import tempfile, torch
>>> with CheckpointDirectory(tempfile.mkdtemp()) as ckpts:
...     name = ckpts.next_name(1)
...     entry = ckpts.commit(name, {"w": torch.zeros(1)}, step=1, epoch=0)
...     ckpts.newest_valid().name, ckpts.record(name).order
('step00000001-00001.ekpt', 1)
"""

from __future__ import annotations

import dataclasses
import os
import stat
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from engine_kit.checkpoint.async_commit import AsyncCommits, PendingCommit
from engine_kit.checkpoint.atomic import fsync_directory, probe_writable, sweep_stale_temps
from engine_kit.checkpoint.commit_args import check_count, checked_folder, checked_names, checked_record, checked_tags
from engine_kit.checkpoint.fileformat import save_checkpoint_file
from engine_kit.checkpoint.index import IndexState
from engine_kit.checkpoint.lock import DirectoryLock
from engine_kit.checkpoint.reader import IndexedReader
from engine_kit.checkpoint.repair_report import RepairReport
from engine_kit.checkpoint.record import CheckpointRecord
from engine_kit.checkpoint.registry import RegistryEntry
from engine_kit.checkpoint.serialized import SerializedPayload
from engine_kit.errors import CheckpointError, CheckpointExistsError, CheckpointWriteError, fix_message


class CheckpointDirectory(IndexedReader):
    """The checkpoints of one run, stored as self-describing files plus an index, ``registry.json``.

    Args:
        path: the directory.
        create: create it (and parents) when missing.
        read_only: inspect or resume only: no lock, no temp sweep, nothing
            written (a damaged index is rebuilt in memory), and
            :meth:`commit`/:meth:`remove` are refused.
        run_id: this run's identity; files the index does not list are
            adopted only when their record carries it. ``None``: any run.
        lock_stale_after_s: take over another host's lock whose heartbeat
            (refreshed by every commit) is older than this; ``None``: only
            provably dead holders (see :mod:`engine_kit.checkpoint.lock`).

    Raises:
        CheckpointWriteError: (writable mode) the directory cannot be created
            or written, another writer holds its lock, or a FIFO/directory
            sits at ``registry.json``.
        NotARegularFileError: (writable mode) a FIFO, directory or device
            sits at the lock's name.
        FileNotFoundError: (read-only mode) the directory does not exist.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        read_only: bool = False,
        run_id: str | None = None,
        lock_stale_after_s: float | None = None,
    ) -> None:
        self._commits: AsyncCommits | None = None  # commit_async's writer, from its first call
        super().__init__(path, read_only=read_only, run_id=run_id)
        self._lock: DirectoryLock | None = None
        self.repaired_at_open: RepairReport | None = None  # what opening for writing repaired
        if read_only:
            if not os.path.isdir(self.path):
                raise FileNotFoundError(fix_message(f"Checkpoint directory {self.path!r} does not exist.", "check the path."))
            return
        probe_writable(self.path, create)
        self._lock = DirectoryLock(self.path, stale_after_s=lock_stale_after_s)
        self._lock.acquire()
        try:
            # Only under the lock: a live writer's temp must never be swept.
            sweep_stale_temps(self.path)
            self.repaired_at_open = self.repair(_stacklevel=4)
        except BaseException:
            self.close()
            raise

    def _require_writable(self, action: str) -> DirectoryLock:
        """The held lock; CheckpointWriteError when read-only or closed."""
        if self.read_only:
            raise CheckpointWriteError(fix_message(f"Cannot {action} in {self.path!r}: it was opened read_only=True.", "open it with read_only=False."))
        if self._lock is None or not self._lock.held:
            raise CheckpointWriteError(fix_message(f"Cannot {action} in {self.path!r}: it was closed.", "open a new CheckpointDirectory."))
        return self._lock

    def close(self) -> None:
        """Wait for a :meth:`commit_async` in flight (:meth:`flush`), then release the writer lock (safe to call twice).

        Raises:
            CheckpointWriteError: an asynchronous commit failed (the lock is released all the same).
        """
        try:
            if self._commits is not None:
                self._commits.close()  # flush(), and the writer thread exits
        finally:
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> CheckpointDirectory:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: object) -> None:
        try:
            self.close()
        except CheckpointWriteError as failure:
            if error is None:
                raise
            error.add_note(f"Also: {type(failure).__name__}: {failure}")  # the error that left the block wins

    def commit_async(self, name: str, payload: dict[str, Any], **options: Any) -> PendingCommit:
        """:meth:`commit` (same arguments: ``step``, ``epoch``, ``tags``, ``rotate_out``...) on a background writer thread.

        Returns once ``payload`` is copied: the caller may change its tensors
        at once. One commit in flight; a call while one is being written waits
        for it (counted in :attr:`waits`). Its failure is raised by the returned
        :class:`~engine_kit.checkpoint.async_commit.PendingCommit`'s ``result()``,
        else by the next ``commit_async``, :meth:`flush` or :meth:`close`
        (see :mod:`engine_kit.checkpoint.async_commit`).

        Raises:
            ValueError / TypeError: a bad argument (nothing submitted).
            CheckpointWriteError: the previous asynchronous commit failed (nothing submitted).
        """
        if self._commits is None:
            self._commits = AsyncCommits(self)
        return self._commits.submit(name, payload, options)

    def flush(self) -> None:
        """Wait for the :meth:`commit_async` in flight, if any, and raise its failure (``CheckpointWriteError``)."""
        if self._commits is not None:
            self._commits.flush()

    @property
    def waits(self) -> int:
        """How many :meth:`commit_async` calls waited for the previous commit (back-pressure)."""
        return self._commits.waits if self._commits is not None else 0

    def _index(self, *, full: bool = False, stacklevel: int = 3, strict: bool = False) -> IndexState:
        if self._commits is not None:
            self._commits.wait_unless_writer()  # the directory is the writer's while a commit is in flight
        return super()._index(full=full, stacklevel=stacklevel + 1, strict=strict)

    def __repr__(self) -> str:
        return f"CheckpointDirectory({self.path!r}, read_only={self.read_only})"

    def next_name(self, step: int) -> str:
        """A checkpoint name for ``step`` that no file in this directory has ever had.

        ``step{step:08d}-{order:05d}.ekpt``, with ``order`` above every
        creation order in the index, in any file's record and in any name on
        disk, so a rerun after the index was lost never reuses a name.

        Raises:
            ValueError: ``step`` is not an integer >= 0.
        """
        check_count("step", step)
        state = self._index()
        taken = {entry.name for entry in state.entries}
        order = state.next_order
        while True:
            name = f"step{step:08d}-{order:05d}.ekpt"
            if name not in taken and not os.path.lexists(os.path.join(self.path, name)):
                return name
            order += 1

    def commit(
        self,
        name: str,
        payload: dict[str, Any] | SerializedPayload,
        *,
        step: int,
        epoch: int,
        tags: Iterable[str] = (),
        metric: float | None = None,
        run_id: str | None = None,
        retag: Mapping[str, Iterable[str]] | None = None,
        rotate_out: Iterable[str] = (),
        on_serialized: Callable[[], None] | None = None,
    ) -> RegistryEntry:
        """Write ``payload`` and its record to the new file ``name`` atomically, then index it.

        One save costs two fsyncs: the new file's content, then the
        directory once, covering both the file's rename and the index's.
        The index is replaced atomically but not fsynced on its own: a power
        loss that leaves it stale or empty is detected at the next open (a
        file it does not list is adopted, an entry without its file is
        dropped) and the index rebuilt from the files. ``rotate_out`` files
        are unindexed in the same index write (noted as pending deletions)
        and unlinked only after the directory fsync made the new file
        durable; a crash before the unlinks leaves them to the next open.

        Args:
            name: a name no file in the directory has (see :meth:`next_name`).
            payload: a dict of tensors, numbers, strings and containers (or its
                :class:`~engine_kit.checkpoint.serialized.SerializedPayload`).
            step: the training step it captures (>= 0).
            epoch: the epoch it captures (>= 0).
            tags: labels such as ``"last"``/``"best"``.
            metric: the score used for best-k ranking (NaN/inf allowed).
            run_id: the identity of the writing run (default: the directory's ``run_id``).
            retag: new tags for indexed checkpoints (and for ``name``), written
                in the same index update (see :meth:`retag`).
            rotate_out: indexed names to delete once the new file is durable
                (rotation; see :meth:`remove`).
            on_serialized: called once ``payload`` is serialized (its tensors
                are not read after that; see ``save_checkpoint_file``).

        Returns:
            The index entry.

        Raises:
            ValueError / TypeError: a bad name, step, epoch, tag, metric or run_id.
            CheckpointExistsError: something (a checkpoint, a directory, a
                FIFO) already sits at ``name``; it is left untouched.
            CheckpointWriteError: writing failed (the index and older files are untouched).
        """
        self._require_writable("commit").refresh()  # the heartbeat; refuses if another writer took the lock over
        tags, metric, run_id = checked_record(name, step, epoch, tags, metric, self.run_id if run_id is None else run_id)
        state = self._index()
        if any(entry.name == name for entry in state.entries):
            raise CheckpointExistsError(
                fix_message(
                    f"Checkpoint {name!r} is already committed in {self.path!r}; committed files are never overwritten.",
                    "take a fresh name from next_name(step).",
                )
            )
        indexed = {entry.name for entry in state.entries}
        new_tags = checked_tags(self.path, retag or {}, indexed | {name})
        doomed = checked_names(self.path, rotate_out, indexed)
        if name in doomed:
            raise ValueError(fix_message(f"rotate_out names the new checkpoint {name!r}.", "rotate out only older, indexed names."))
        record = CheckpointRecord(name, step, epoch, state.next_order, tags, metric, run_id, time.time())
        info = save_checkpoint_file(os.path.join(self.path, name), payload, record=record, replace=False, sync_directory=False,
                                    on_serialized=on_serialized)
        entry = RegistryEntry(name, info.sha256, info.size_bytes, step, epoch, new_tags.get(name, tags), metric, record.created, record.order, run_id)
        kept = [dataclasses.replace(e, tags=new_tags[e.name]) if e.name in new_tags else e for e in state.entries if e.name not in doomed]
        try:
            written = self._write([*kept, entry], [*state.pending, *doomed], state, record.order + 1, durable=False, remember=False)
        except CheckpointError:
            # Not indexed, so it is ours alone to take back.
            self._unlink_regular(name, quiet=True)
            raise
        try:
            fsync_directory(self.path)  # both renames (file, index) durable; only now may old files go
        except OSError as exc:
            raise CheckpointWriteError(
                fix_message(
                    f"{name!r} was written and indexed but fsync of {self.path!r} failed: {exc!r}; it may not survive a power loss. "
                    "No older checkpoint was deleted.",
                    "check the filesystem for I/O errors, then save again.",
                )
            ) from exc
        # A lost unlink is finished at the next open (pending in the index).
        self._forget_pending(written, [doomed_name for doomed_name in doomed if self._unlink_regular(doomed_name)])
        return entry

    def remove(self, names: Iterable[str]) -> list[str]:
        """Unindex ``names``, then delete their files (rotation's only way to delete).

        Args:
            names: indexed checkpoint names (a single str is one name).

        Returns:
            The names whose files were deleted (only regular files inside the directory).

        Raises:
            ValueError: a name is invalid or not indexed (nothing changed).
        """
        self._require_writable("remove checkpoints")
        wanted = [names] if isinstance(names, str) else list(names)
        if not wanted:
            return []
        state = self._index()
        checked_names(self.path, wanted, {entry.name for entry in state.entries})
        # Unindex first and note the names as pending, so a kill before the
        # unlinks leaves files that the next open deletes, never a dangling entry.
        keep = [entry for entry in state.entries if entry.name not in set(wanted)]
        self._write(keep, [*state.pending, *wanted], state)
        removed = [name for name in wanted if self._unlink_regular(name)]
        fsync_directory(self.path)
        return removed

    def set_aside(self, names: Iterable[str], folder: str) -> list[str]:
        """Move indexed checkpoints into the subfolder ``folder`` and drop them from the index.

        For a run that branches from an older checkpoint: the newer files are
        kept, out of rotation's reach (the index never looks into subfolders).
        Files are moved, never copied or replaced: a name already taken in
        ``folder`` stops the move.

        Args:
            names: indexed checkpoint names (a single str is one name).
            folder: a plain subfolder name (created when missing).

        Returns:
            The new paths of the moved files.

        Raises:
            ValueError: a name is not indexed, or ``folder`` is not a plain name.
            CheckpointExistsError: something already sits at a target name
                (files moved before it stay moved and unindexed).
            CheckpointCorruptError: a name is not a regular file.
        """
        self._require_writable("set checkpoints aside")
        checked_folder(folder)
        state = self._index()
        entries = {entry.name: entry for entry in state.entries}
        wanted = checked_names(self.path, names, set(entries))
        target = os.path.join(self.path, folder)
        os.makedirs(target, exist_ok=True)
        moved = []
        try:
            for name in wanted:
                source = self._path_of(entries[name])
                destination = os.path.join(target, name)
                try:
                    os.link(source, destination)  # no-clobber: fails if the name is taken
                except FileExistsError:
                    raise CheckpointExistsError(
                        fix_message(f"Cannot set {name!r} aside: {destination!r} already exists.", "choose another folder.")
                    ) from None
                os.unlink(source)
                moved.append(name)
        finally:
            if moved:
                fsync_directory(target)
                fsync_directory(self.path)
                self._write([entry for entry in state.entries if entry.name not in moved], state.pending, state)
        return [os.path.join(target, name) for name in moved]

    def retag(self, tags: Mapping[str, Iterable[str]]) -> list[RegistryEntry]:
        """Replace the tags of indexed checkpoints in one atomic index write.

        Args:
            tags: indexed name -> its new tags; names not given keep theirs.

        Returns:
            The updated entries, sorted by step.

        Raises:
            ValueError: a name is not indexed (nothing changed).
        """
        self._require_writable("retag checkpoints")
        state = self._index()
        new_tags = checked_tags(self.path, tags, {entry.name for entry in state.entries})
        updated = [dataclasses.replace(entry, tags=new_tags.get(entry.name, entry.tags)) for entry in state.entries]
        if updated != state.entries:
            self._write(updated, state.pending, state)
        return updated

    def _unlink_regular(self, name: str, *, quiet: bool = False) -> bool:
        """Delete ``name`` only if it is a regular file; never follow a link."""
        path = os.path.join(self.path, name)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(mode):
            if not quiet:
                warnings.warn(f"engine_kit: left {path!r} in place: it is not a regular file (a symlink?), so engine_kit did not write it.", stacklevel=3)
            return False
        # If it is swapped for a symlink after lstat, unlink removes the link, never its target.
        os.unlink(path)
        return True

    def repair(self, *, full: bool = False, _stacklevel: int = 2) -> RepairReport:
        """Rebuild the index from the files, and finish deletions a crash interrupted.

        Files the index had unlisted for deletion (rotation's pending list)
        are deleted; nothing else is. With ``full=True`` every indexed file
        is verified in full (digest and archive), not only its record; a
        file that fails is set aside (kept in place, excluded).

        Returns:
            A :class:`RepairReport` of what changed.
        """
        self._require_writable("repair")
        state = self._index(full=full, stacklevel=_stacklevel + 1, strict=True)
        finished = [name for name in state.pending if self._unlink_regular(name)]
        if finished:
            self._write(state.entries, [], state)
        return RepairReport(
            missing=state.missing,
            invalid=state.invalid,
            finished=finished,
            orphans=sorted(state.set_aside),
            adopted=state.adopted,
            rebuilt_because=state.rebuilt_because,
            set_aside=state.newly_set_aside,
        )
