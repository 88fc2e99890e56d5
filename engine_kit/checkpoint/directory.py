"""A directory of committed checkpoints: commit, remove, verify, load, repair.

Ordering is what keeps a crash harmless (RELIABILITY.md):

- :meth:`CheckpointDirectory.commit` writes the file atomically, *then*
  registers it. A kill in between leaves an unregistered (orphan) file.
- :meth:`CheckpointDirectory.remove` unregisters first, *then* unlinks. A kill
  in between again leaves an orphan, never a registry entry for a missing
  file, so rotation with keep-last = 1 always leaves a valid checkpoint.

Committed files are immutable: committing a name already registered is
refused, so the registry never points at bytes other than those it hashed.

Orphans: a file :meth:`~CheckpointDirectory.remove` unregistered but did not
get to unlink is recorded in the registry's ``pending_delete`` and deleted by
:meth:`~CheckpointDirectory.repair`. Any other unregistered ``*.ekpt`` file is
reported, never deleted: a user may have copied a checkpoint in, and a file
from a crash mid-commit is overwritten when the run reaches that step again.

Deletion never follows symlinks: ``os.lstat`` decides, a symlink or any
non-regular file at a registered name is left alone with a warning, and
``os.unlink`` on a name removes at most that name.

>>> import tempfile, torch
>>> with CheckpointDirectory(tempfile.mkdtemp()) as ckpts:
...     entry = ckpts.commit("step-000001.ekpt", {"w": torch.zeros(1)}, step=1, epoch=0)
...     ckpts.newest_valid().name
'step-000001.ekpt'
"""

from __future__ import annotations

import dataclasses
import os
import stat
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from engine_kit.checkpoint.atomic import fsync_directory, sweep_stale_temps, temp_prefix
from engine_kit.checkpoint.fileformat import load_checkpoint_file, save_checkpoint_file, verify_checkpoint_file
from engine_kit.checkpoint.lock import DirectoryLock
from engine_kit.checkpoint.registry import (
    CHECKPOINT_SUFFIX,
    RegistryEntry,
    read_registry,
    resolve_inside,
    validate_name,
    write_registry,
)
from engine_kit.errors import CheckpointCorruptError, CheckpointError, CheckpointWriteError, fix_message


class RepairReport(NamedTuple):
    """What :meth:`CheckpointDirectory.repair` found and did.

    Attributes:
        missing: registered names whose file was gone (entries dropped, warned).
        invalid: why each invalid registry entry was dropped (warned).
        finished: unregistered files a crashed rotation had left; now deleted.
        orphans: unregistered ``*.ekpt`` files left in place (warned).
    """

    missing: list[str]
    invalid: list[str]
    finished: list[str]
    orphans: list[str]


class CheckpointDirectory:
    """The checkpoints of one run, stored as plain files plus ``registry.json``.

    Args:
        path: the directory.
        create: create it (and parents) when missing.
        read_only: inspect or resume only: no lock, no temp sweep, no repair,
            and :meth:`commit`/:meth:`remove` are refused.

    Raises:
        CheckpointWriteError: (writable mode) the directory cannot be created
            or written, or another writer holds its lock.
        FileNotFoundError: (read-only mode) the directory does not exist.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True, read_only: bool = False) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.read_only = read_only
        self._lock: DirectoryLock | None = None
        if read_only:
            if not os.path.isdir(self.path):
                raise FileNotFoundError(fix_message(f"Checkpoint directory {self.path!r} does not exist.", "check the path."))
            return
        self._check_writable(create)
        self._lock = DirectoryLock(self.path)
        self._lock.acquire()
        try:
            # Only under the lock: a live writer's temp must never be swept.
            sweep_stale_temps(self.path)
            self.repair()
        except BaseException:
            self.close()
            raise

    def _check_writable(self, create: bool) -> None:
        """Fail now, not at the first save hours later."""
        try:
            if create:
                os.makedirs(self.path, exist_ok=True)
            elif not os.path.isdir(self.path):
                raise FileNotFoundError(f"{self.path!r} does not exist")
            fd, probe = tempfile.mkstemp(dir=self.path, prefix=temp_prefix())
            try:
                os.write(fd, b"probe")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as exc:
            raise CheckpointWriteError(
                fix_message(
                    f"Checkpoint directory {self.path!r} is not writable: {exc!r}.",
                    "choose a directory you can write to (not under a file, not on a read-only mount) with free space.",
                )
            ) from exc

    def _require_writable(self, action: str) -> None:
        if self.read_only:
            raise CheckpointWriteError(fix_message(f"Cannot {action} in {self.path!r}: it was opened read_only=True.", "open it with read_only=False."))
        if self._lock is None or not self._lock.held:
            raise CheckpointWriteError(fix_message(f"Cannot {action} in {self.path!r}: it was closed.", "open a new CheckpointDirectory."))

    def close(self) -> None:
        """Release the writer lock (safe to call twice)."""
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> CheckpointDirectory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointDirectory({self.path!r}, read_only={self.read_only})"

    def entries(self) -> list[RegistryEntry]:
        """The registered checkpoints, validated, sorted by step (oldest first)."""
        return read_registry(self.path).entries

    def commit(
        self,
        name: str,
        payload: dict[str, Any],
        *,
        step: int,
        epoch: int,
        tags: Iterable[str] = (),
        metric: float | None = None,
    ) -> RegistryEntry:
        """Write ``payload`` to ``name`` atomically, then register it.

        Args:
            name: a new plain file name ending in ``.ekpt``.
            payload: a dict of tensors, numbers, strings and containers.
            step: the training step it captures (>= 0).
            epoch: the epoch it captures (>= 0).
            tags: labels such as ``"last"``/``"best"``.
            metric: the score used for best-k ranking (NaN/inf allowed).

        Returns:
            The registry entry.

        Raises:
            ValueError / TypeError: a bad name, step, epoch, tag or metric.
            CheckpointWriteError: the name is already committed or a symlink,
                or writing failed (the registry and older files are untouched).
        """
        self._require_writable("commit")
        validate_name(name)
        for key, value in (("step", step), ("epoch", epoch)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(fix_message(f"{key}={value!r} is not an integer >= 0.", f"pass the engine's {key} count."))
        tags = tuple(tags)
        if not all(isinstance(tag, str) for tag in tags):
            raise TypeError(fix_message(f"tags={tags!r} must all be str.", "pass e.g. tags=('last',)."))
        if metric is not None:
            try:
                metric = float(metric)
            except (TypeError, ValueError) as exc:
                raise TypeError(fix_message(f"metric={metric!r} is not a number.", "pass a float (NaN/inf allowed) or None.")) from exc
        entries, _, pending = read_registry(self.path)
        if any(entry.name == name for entry in entries):
            raise CheckpointWriteError(
                fix_message(
                    f"Checkpoint {name!r} is already committed in {self.path!r}; committed files are never overwritten.",
                    "use a per-step name such as 'step-000100.ekpt', or remove([name]) first.",
                )
            )
        path = os.path.join(self.path, name)
        info = save_checkpoint_file(path, payload)
        entry = RegistryEntry(name, info.sha256, info.size_bytes, step, epoch, tags, metric, time.time())
        try:
            write_registry(self.path, [*entries, entry], self._still_pending(pending))
        except CheckpointError:
            # Unregistered, so it is ours alone to take back.
            self._unlink_regular(name, quiet=True)
            raise
        return entry

    def remove(self, names: Iterable[str]) -> list[str]:
        """Unregister ``names``, then delete their files.

        Args:
            names: registered checkpoint names (a single str is one name).

        Returns:
            The names whose files were deleted.

        Raises:
            ValueError: a name is invalid or not registered (nothing changed).
        """
        self._require_writable("remove checkpoints")
        wanted = [names] if isinstance(names, str) else list(names)
        if not wanted:
            return []
        entries, _, pending = read_registry(self.path)
        registered = {entry.name for entry in entries}
        for name in wanted:
            validate_name(name)
            if name not in registered:
                raise ValueError(fix_message(f"{name!r} is not a registered checkpoint in {self.path!r}.", "pass names from entries()."))
        # Unregister first and note the names as pending, so a kill before the
        # unlinks leaves files that repair() deletes, never a dangling entry.
        keep = [entry for entry in entries if entry.name not in set(wanted)]
        write_registry(self.path, keep, [*self._still_pending(pending), *wanted])
        removed = [name for name in wanted if self._unlink_regular(name)]
        fsync_directory(self.path)
        return removed

    def retag(self, tags: Mapping[str, Iterable[str]]) -> list[RegistryEntry]:
        """Replace the tags of registered checkpoints in one atomic registry write.

        Args:
            tags: registered name -> its new tags; names not given keep theirs.

        Returns:
            The updated entries, sorted by step.

        Raises:
            ValueError: a name is not registered (nothing changed).
        """
        self._require_writable("retag checkpoints")
        entries, _, pending = read_registry(self.path)
        registered = {entry.name for entry in entries}
        new_tags = {name: tuple(values) for name, values in tags.items()}
        unknown = sorted(set(new_tags) - registered)
        if unknown:
            raise ValueError(fix_message(f"{unknown} are not registered checkpoints in {self.path!r}.", "pass names from entries()."))
        if not all(isinstance(tag, str) for values in new_tags.values() for tag in values):
            raise TypeError(fix_message(f"tags={new_tags!r} must all be str.", "pass e.g. {'step-1.ekpt': ('best',)}."))
        updated = [dataclasses.replace(entry, tags=new_tags.get(entry.name, entry.tags)) for entry in entries]
        if updated != entries:
            write_registry(self.path, updated, self._still_pending(pending))
        return updated

    def _still_pending(self, pending: list[str]) -> list[str]:
        """The pending deletions whose files still exist (the rest are done)."""
        return [name for name in pending if os.path.lexists(os.path.join(self.path, name))]

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

    def _check_entry(self, entry: RegistryEntry, loader: Callable[[str, str], Any]) -> Any:
        """Run ``loader(path, sha256)`` on a registered file; CheckpointCorruptError if unsound."""
        try:
            path = resolve_inside(self.path, entry.name)
        except ValueError as exc:
            raise CheckpointCorruptError(str(exc)) from exc
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise CheckpointCorruptError(fix_message(f"{path!r} is not a regular file.", "remove it."))
        except FileNotFoundError as exc:
            raise CheckpointCorruptError(fix_message(f"{path!r} is missing.", "fall back to an older checkpoint.")) from exc
        return loader(path, entry.sha256)

    def _newest(self, loader: Callable[[str, str], Any]) -> tuple[RegistryEntry, Any] | None:
        skipped = []
        found = None
        for entry in reversed(self.entries()):
            try:
                found = (entry, self._check_entry(entry, loader))
                break
            except CheckpointCorruptError as exc:
                skipped.append(f"{entry.name} ({str(exc).split(' To fix:')[0]})")
        if skipped:
            fallback = f"using {found[0].name}" if found else "no valid checkpoint is left"
            warnings.warn(f"engine_kit: skipped corrupt checkpoint(s) {'; '.join(skipped)}; {fallback}.", stacklevel=3)
        return found

    def newest_valid(self) -> RegistryEntry | None:
        """The newest entry whose file matches its registered SHA-256 and verifies.

        Corrupt newer entries are skipped with one warning naming them.
        """
        found = self._newest(lambda path, sha: _verify_against(path, sha))
        return None if found is None else found[0]

    def load_newest_valid(self, map_location: Any = "cpu") -> tuple[RegistryEntry, dict[str, Any]] | None:
        """Like :meth:`newest_valid`, but loads the payload in the same pass."""
        return self._newest(lambda path, sha: load_checkpoint_file(path, map_location, expected_sha256=sha))

    def load(self, entry_or_name: RegistryEntry | str, map_location: Any = "cpu") -> dict[str, Any]:
        """Load a registered checkpoint after checking its registered SHA-256.

        Raises:
            ValueError: the name is not registered.
            CheckpointCorruptError: the file is missing, a symlink, altered,
                truncated or carries code.
        """
        name = entry_or_name.name if isinstance(entry_or_name, RegistryEntry) else validate_name(entry_or_name)
        for entry in self.entries():
            if entry.name == name:
                return self._check_entry(entry, lambda path, sha: load_checkpoint_file(path, map_location, expected_sha256=sha))
        raise ValueError(fix_message(f"{name!r} is not a registered checkpoint in {self.path!r}.", "pass a name from entries()."))

    def repair(self) -> RepairReport:
        """Finish interrupted deletions, drop entries whose file is missing, report orphans.

        Files named in the registry's ``pending_delete`` (unregistered by
        :meth:`remove`, then the process died before the unlink) are deleted:
        engine_kit wrote and registered them. Other unregistered ``*.ekpt``
        files are only reported: they may be a user's copies.
        """
        self._require_writable("repair")
        entries, invalid, pending = read_registry(self.path)
        finished = [name for name in pending if self._unlink_regular(name)]
        missing = [entry.name for entry in entries if not os.path.lexists(os.path.join(self.path, entry.name))]
        if missing:
            warnings.warn(f"engine_kit: registry of {self.path!r} lists missing file(s) {missing}; dropping those entries.", stacklevel=2)
        if missing or invalid or pending:
            write_registry(self.path, [entry for entry in entries if entry.name not in missing], self._still_pending(pending))
        registered = {entry.name for entry in entries}
        orphans = sorted(
            name
            for name in os.listdir(self.path)
            if name.endswith(CHECKPOINT_SUFFIX) and not name.startswith(".") and name not in registered
        )
        if orphans:
            warnings.warn(
                f"engine_kit: {self.path!r} holds checkpoint file(s) the registry does not list: {orphans} "
                "(left by a crash mid-commit, or copied in). They are kept but never loaded or rotated; delete them if unwanted.",
                stacklevel=2,
            )
        return RepairReport(missing, invalid, finished, orphans)


def _verify_against(path: str, sha256: str) -> None:
    info = verify_checkpoint_file(path)
    if info.sha256 != sha256:
        raise CheckpointCorruptError(
            fix_message(f"{path!r} has SHA-256 {info.sha256[:16]}..., the registry recorded {sha256[:16]}....", "fall back to an older checkpoint.")
        )
