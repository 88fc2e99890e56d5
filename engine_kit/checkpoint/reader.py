"""Reading a checkpoint directory: its reconciled index, verification, loading.

:class:`IndexedReader` is the read side of
:class:`~engine_kit.checkpoint.directory.CheckpointDirectory`: every listing
goes through :func:`~engine_kit.checkpoint.index.load_index`, so it answers
whatever state ``registry.json`` is in, and every load verifies the file.
A file that verifies is believed over the index: if the index recorded
another digest for it, the index is corrected (one warning).
"""

from __future__ import annotations

import dataclasses
import os
import stat
import warnings
from collections.abc import Callable
from typing import Any

from engine_kit.checkpoint.fileformat import load_verified, verify_checkpoint_file
from engine_kit.checkpoint.index import IndexState, load_index
from engine_kit.checkpoint.record import CheckpointRecord
from engine_kit.checkpoint.registry import REGISTRY_NAME, RegistryEntry, resolve_inside, sort_key, validate_name, write_registry
from engine_kit.errors import CheckpointCorruptError, CheckpointWriteError, fix_message


class IndexedReader:
    """The read side of a checkpoint directory (see ``CheckpointDirectory``).

    Args:
        path: the directory (made absolute).
        read_only: never write ``registry.json`` (repairs stay in memory).
        run_id: adopt unlisted files only when their record carries it.
    """

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool, run_id: str | None) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.read_only = read_only
        if run_id is not None and not isinstance(run_id, str):
            raise TypeError(fix_message(f"run_id={run_id!r} is not a str.", "pass a string naming the run, or None."))
        self.run_id = run_id
        # Read-only mode cannot persist what it judged; remember it, so files are verified once per change.
        self._aside: dict[str, dict[str, Any]] = {}
        self._adopted: dict[str, tuple[int, int, RegistryEntry]] = {}
        self._warned: set[str] = set()
        # The last reconciled index and the stat fingerprint it was valid for (see _fingerprint).
        self._cached: tuple[tuple[Any, ...], IndexState] | None = None

    # -- the index -------------------------------------------------------
    def _index(self, *, full: bool = False, stacklevel: int = 3, strict: bool = False) -> IndexState:
        """The reconciled index; persisted (writable) and warned about once when it changed.

        Args:
            full: verify every listed file in full.
            stacklevel: where the warning points.
            strict: raise when the repaired index cannot be saved (opening and
                ``repair``); otherwise a listing still answers from memory and
                the warning says the index could not be saved.
        """
        if not full and self._cached is not None and self._fingerprint(self._cached[1].entries) == self._cached[0]:
            return self._cached[1]
        state = load_index(self.path, run_id=self.run_id, full=full, known_aside=self._aside, known_adopted=self._adopted)
        if not state.changed:
            self._remember(state)
            return state
        where = "in memory (read-only)"
        if not self.read_only:
            try:
                self._write(state.entries, state.pending, state)  # caches the repaired index
                where = "and saved"
            except CheckpointWriteError as exc:
                if strict:
                    raise
                where = f"in memory (saving it failed: {str(exc).split(' To fix:')[0]})"
        if where != "and saved":
            self._aside = state.set_aside
            self._adopted = self._stat_adopted(state)
        # Unsaved, the same repair is redone on every call: say it once per instance.
        seen = repr((state.rebuilt_because, state.missing, state.invalid, state.adopted))
        if state.newly_set_aside or seen not in self._warned:
            self._warned.add(seen)
            warnings.warn(
                f"engine_kit: rebuilt the checkpoint index of {self.path!r} {where}: {state.describe()}. No checkpoint file was deleted.",
                stacklevel=stacklevel,
            )
        return state

    def _fingerprint(self, entries: list[RegistryEntry]) -> tuple[Any, ...] | None:
        """What must not change for a cached index to stay valid (None: cannot tell).

        The registry's inode, size and mtime (every write replaces it), the
        directory's mtime (a file added, removed or renamed in it) and each
        listed file's inode, size and mtime (one replaced or truncated in
        place). A few ``lstat`` calls instead of reading the registry and
        every file's record.
        """
        try:
            listing = os.stat(self.path)
            stamps: list[Any] = [(listing.st_ino, listing.st_mtime_ns)]
            for name in (REGISTRY_NAME, *(entry.name for entry in entries)):
                try:
                    info = os.lstat(os.path.join(self.path, name))
                except FileNotFoundError:
                    stamps.append(None)
                    continue
                stamps.append((info.st_ino, info.st_size, info.st_mtime_ns, info.st_mode))
        except OSError:
            return None
        return tuple(stamps)

    def _remember(self, state: IndexState) -> None:
        """Cache ``state`` (as it is now on disk) for listings until a fingerprint changes."""
        fingerprint = self._fingerprint(state.entries)
        self._cached = None if fingerprint is None else (fingerprint, state)

    def _forget_pending(self, written: IndexState, deleted: list[str]) -> None:
        """Cache ``written`` (this instance's last index write) without the pending names it just unlinked.

        The unlinks change the directory's fingerprint; re-reading the index
        for that (its registry and every listed file's record) would only find
        what is known here: the same entries, minus the deleted pending names.
        """
        self._remember(written._replace(pending=[name for name in written.pending if name not in deleted]))

    def _stat_adopted(self, state: IndexState) -> dict[str, tuple[int, int, RegistryEntry]]:
        adopted = {}
        for entry in state.entries:
            if entry.name in state.adopted:
                try:
                    info = os.lstat(os.path.join(self.path, entry.name))
                except OSError:
                    continue
                adopted[entry.name] = (info.st_size, info.st_mtime_ns, entry)
        return adopted

    def _write(
        self,
        entries: list[RegistryEntry],
        pending: list[str],
        state: IndexState,
        next_order: int | None = None,
        *,
        durable: bool = True,
        remember: bool = True,
    ) -> IndexState:
        """Replace the registry with this index, and cache it (the write is this instance's own).

        Args:
            remember: False: the caller changes the directory further (unlinks)
                and caches the returned index itself (:meth:`_forget_pending`),
                sparing a fingerprint that would be stale at once.

        Returns:
            The index as written.
        """
        self._cached = None
        order = max([next_order or state.next_order, state.next_order, *(entry.order + 1 for entry in entries)])
        write_registry(self.path, entries, pending, set_aside=state.set_aside, next_order=order, durable=durable)
        listed = {entry.name for entry in entries}
        written = IndexState(
            sorted(entries, key=sort_key), sorted(set(pending) - listed), state.set_aside, order, None, [], [], [], {}
        )
        if remember:
            self._remember(written)
        return written

    def excluded_files(self) -> dict[str, str]:
        """Checkpoint-named files kept in the directory but not indexed (set aside), with the reason for each."""
        return {name: str(info.get("reason", "?")) for name, info in self._index().set_aside.items()}

    def entries(self) -> list[RegistryEntry]:
        """The indexed checkpoints, sorted by step then creation order (oldest first).

        Always answers: a damaged or inconsistent index is rebuilt from the
        files (one warning naming what was repaired).
        """
        return self._index().entries

    def _path_of(self, entry: RegistryEntry) -> str:
        """The regular file of an indexed entry; CheckpointCorruptError otherwise."""
        try:
            path = resolve_inside(self.path, entry.name)
        except ValueError as exc:
            raise CheckpointCorruptError(str(exc)) from exc
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise CheckpointCorruptError(fix_message(f"{path!r} is not a regular file.", "remove it."))
        except FileNotFoundError as exc:
            raise CheckpointCorruptError(fix_message(f"{path!r} is missing.", "fall back to an older checkpoint.")) from exc
        return path

    def _note_digest_drift(self, entry: RegistryEntry, sha256: str, size: int) -> RegistryEntry:
        """The file verifies but the index held another digest: the file wins; fix the index."""
        warnings.warn(
            f"engine_kit: {entry.name} verifies but the index recorded sha256 {entry.sha256[:12]}... "
            f"(the file has {sha256[:12]}...); the file is used and the index corrected.",
            stacklevel=5,
        )
        fixed = dataclasses.replace(entry, sha256=sha256, size=size)
        if not self.read_only:
            state = self._index()
            self._write([fixed if e.name == entry.name else e for e in state.entries], state.pending, state)
        return fixed

    def _verified(self, entry: RegistryEntry) -> tuple[RegistryEntry, CheckpointRecord | None]:
        """Verify an entry's file (streaming); the entry as the file proves it, and the record."""
        info = verify_checkpoint_file(self._path_of(entry))
        if info.sha256 != entry.sha256:
            entry = self._note_digest_drift(entry, info.sha256, info.size_bytes)
        return entry, info.record

    def _loaded(self, entry: RegistryEntry, map_location: Any) -> tuple[RegistryEntry, dict[str, Any]]:
        """Load an entry's file from the verified bytes; the entry as the file proves it, and the payload."""
        path = self._path_of(entry)
        payload, _record, sha256 = load_verified(path, map_location)
        if sha256 != entry.sha256:
            entry = self._note_digest_drift(entry, sha256, os.path.getsize(path))
        return entry, payload

    def _newest(
        self, check: Callable[[RegistryEntry], tuple[RegistryEntry, Any]], run_id: str | None
    ) -> tuple[RegistryEntry, Any] | None:
        skipped = []
        found = None
        candidates = [entry for entry in self.entries() if run_id is None or entry.run_id == run_id]
        for entry in reversed(candidates):
            try:
                found = check(entry)
                break
            except CheckpointCorruptError as exc:
                skipped.append(f"{entry.name} ({str(exc).split(' To fix:')[0]})")
        if skipped:
            fallback = f"using {found[0].name}" if found else "no valid checkpoint is left"
            warnings.warn(f"engine_kit: skipped corrupt checkpoint(s) {'; '.join(skipped)}; {fallback}.", stacklevel=3)
        return found

    def newest_valid(self, *, run_id: str | None = None) -> RegistryEntry | None:
        """The newest entry (by step, then creation order) whose file verifies.

        Corrupt newer entries are skipped with one warning naming them.
        Verification streams, so this costs a read of the file, not its size in memory.

        Args:
            run_id: consider only checkpoints written by this run.
        """
        found = self._newest(self._verified, run_id)
        return None if found is None else found[0]

    def load_newest_valid(self, map_location: Any = "cpu", *, run_id: str | None = None) -> tuple[RegistryEntry, dict[str, Any]] | None:
        """Like :meth:`newest_valid`, but loads the payload in the same pass."""
        return self._newest(lambda entry: self._loaded(entry, map_location), run_id)

    def _entry(self, entry_or_name: RegistryEntry | str) -> RegistryEntry:
        name = entry_or_name.name if isinstance(entry_or_name, RegistryEntry) else validate_name(entry_or_name)
        for entry in self.entries():
            if entry.name == name:
                return entry
        raise ValueError(fix_message(f"{name!r} is not a registered checkpoint in {self.path!r}.", "pass a name from entries()."))

    def load(self, entry_or_name: RegistryEntry | str, map_location: Any = "cpu") -> dict[str, Any]:
        """Load an indexed checkpoint after verifying it.

        Raises:
            ValueError: the name is not indexed.
            CheckpointCorruptError: the file is missing, a symlink, altered,
                truncated or carries code.
        """
        return self._loaded(self._entry(entry_or_name), map_location)[1]

    def record(self, entry_or_name: RegistryEntry | str) -> CheckpointRecord | None:
        """The verified self-description of an indexed file (``None`` for a format-1 file).

        Raises:
            ValueError: the name is not indexed.
            CheckpointCorruptError: the file does not verify.
        """
        return self._verified(self._entry(entry_or_name))[1]

