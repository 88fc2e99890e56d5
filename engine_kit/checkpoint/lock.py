"""One writer per checkpoint directory: the ``.ek-lock`` file.

The lock is created exclusively (an ``O_CREAT | O_EXCL`` temp file holding
the record, hard-linked to ``.ek-lock``; ``link`` fails if the lock exists)
and holds JSON ``{"pid", "host", "start", "token"}``. Another writer is refused while the
holder lives. A lock whose holder is gone (same host; pid not running, a
zombie, or a pid reused by a process with another start time) is taken over
with a warning. Takeover renames the stale file aside and checks that what
it moved is still the stale lock, so two processes recovering at once cannot
both end up "holding" it. A lock on another host cannot be checked and is
always refused. The lock is released by :meth:`DirectoryLock.release`, or at
interpreter exit if the owner forgot.

>>> import tempfile
>>> lock = DirectoryLock(tempfile.mkdtemp())
>>> lock.acquire()
>>> lock.release()
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
import warnings
import tempfile
import weakref

from engine_kit.checkpoint.atomic import fsync_directory, temp_prefix
from engine_kit.checkpoint.regular import open_regular
from engine_kit.errors import CheckpointWriteError, NotARegularFileError, fix_message

LOCK_NAME = ".ek-lock"
# A lock file that is still empty or garbled this long after its last write
# belongs to a writer killed between O_EXCL-create and write (a few bytes).
_UNREADABLE_LOCK_GRACE_S = 60.0
_MAX_LOCK_BYTES = 1 << 16  # a lock record is ~150 bytes


def _start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is field 3 (state); starttime is field 22.
    return fields[19] if len(fields) > 19 else None


def _holder_alive(pid: int, start: str | None) -> bool:
    """Whether the process that wrote a lock on this host still runs."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False  # killed, not yet reaped: it can never write again
    except (OSError, IndexError):
        pass
    current = _start_time(pid)
    return start is None or current is None or current == start


def _release(path: str, token: str, owner_pid: int) -> None:
    """Remove the lock file if it is still ours (never someone else's)."""
    if os.getpid() != owner_pid:
        return  # a forked child exiting must not drop its parent's lock
    try:
        with open_regular(path, "lock") as fileobj:
            if json.loads(fileobj.read(_MAX_LOCK_BYTES).decode("utf-8")).get("token") != token:
                return
        os.unlink(path)
    except (OSError, ValueError, AttributeError, NotARegularFileError):
        pass


class DirectoryLock:
    """The exclusive writer lock of one directory.

    Args:
        directory: the directory to lock.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = os.path.join(os.fspath(directory), LOCK_NAME)
        self._finalizer: weakref.finalize | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._finalizer is not None and self._finalizer.alive

    def acquire(self) -> None:
        """Take the lock, taking over a dead holder's lock with a warning.

        Raises:
            CheckpointWriteError: a live writer (this process included) holds
                it, it is held from another host, or it cannot be created.
            NotARegularFileError: a FIFO, directory or device sits at the lock's name.
        """
        token = uuid.uuid4().hex
        record = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()), "token": token}
        content = json.dumps(record).encode("utf-8")
        for attempt in range(3):
            try:
                self._create(content)
            except FileExistsError:
                if not os.path.lexists(self.path):
                    continue  # released between our create and our read
                raw, holder = self._read()
                if attempt < 2 and self._is_stale(holder):
                    if self._take_over(raw, holder):
                        continue
                raise CheckpointWriteError(self._refusal(holder)) from None
            except OSError as exc:
                raise CheckpointWriteError(
                    fix_message(f"Cannot create the lock {self.path!r}: {exc!r}.", "make the directory writable.")
                ) from exc
            self._finalizer = weakref.finalize(self, _release, self.path, token, os.getpid())
            return
        raise CheckpointWriteError(self._refusal(self._read()[1]))

    def _create(self, content: bytes) -> None:
        """Create the lock exclusively, never visible without its content.

        The record is written to an O_CREAT|O_EXCL temp file, then hard-linked
        to the lock name (``link`` fails with EEXIST when the lock exists), so
        a writer killed mid-acquire leaves a sweepable temp, not an empty
        lock nobody can attribute. Filesystems without hard links fall back
        to O_CREAT|O_EXCL on the lock name itself.

        Raises:
            FileExistsError: the lock is held.
        """
        directory = os.path.dirname(self.path)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=temp_prefix())
        try:
            with os.fdopen(fd, "wb") as fileobj:
                fileobj.write(content)
                fileobj.flush()
                os.fsync(fileobj.fileno())
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                raise
            except OSError:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), 0o644)
                with os.fdopen(fd, "wb") as fileobj:
                    fileobj.write(content)
                    fileobj.flush()
                    os.fsync(fileobj.fileno())
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass  # swept by the lock's holder while it started up
        fsync_directory(directory)

    def release(self) -> None:
        """Give the lock back; safe to call twice."""
        if self._finalizer is not None:
            self._finalizer()

    def _read(self) -> tuple[bytes, dict | None]:
        """The lock's bytes and parsed record; NotARegularFileError for a FIFO, directory..."""
        try:
            with open_regular(self.path, "lock") as fileobj:
                raw = fileobj.read(_MAX_LOCK_BYTES)
        except NotARegularFileError:
            raise
        except OSError:
            return b"", None
        try:
            holder = json.loads(raw.decode("utf-8"))
        except ValueError:
            return raw, None
        return raw, holder if isinstance(holder, dict) else None

    def _is_stale(self, holder: dict | None) -> bool:
        if holder is None:
            try:
                return time.time() - os.lstat(self.path).st_mtime > _UNREADABLE_LOCK_GRACE_S
            except OSError:
                return False
        if holder.get("host") != socket.gethostname():
            return False
        return not _holder_alive(holder.get("pid"), holder.get("start"))

    def _take_over(self, raw: bytes, holder: dict | None) -> bool:
        aside = f"{self.path}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)
        except OSError:
            return False  # another process is recovering it first: it wins
        try:
            with open_regular(aside, "lock") as fileobj:
                moved = fileobj.read(_MAX_LOCK_BYTES)
        except (OSError, NotARegularFileError):
            moved = None
        if moved != raw:
            # We moved a fresh lock another process just took: put it back.
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            os.unlink(aside)
            return False
        os.unlink(aside)
        who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "an unreadable lock"
        warnings.warn(f"engine_kit: taking over the stale lock {self.path!r} left by {who}, which is no longer running.", stacklevel=4)
        return True

    def _refusal(self, holder: dict | None) -> str:
        if holder is None:
            who = "an unreadable lock file"
        elif holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            who = f"this process (pid {os.getpid()}): another CheckpointDirectory on it is still open"
        else:
            who = f"pid {holder.get('pid')} on host {holder.get('host')!r}"
        return fix_message(
            f"Checkpoint directory {os.path.dirname(self.path)!r} is locked by {who}; two writers would corrupt its rotation.",
            f"stop the other run or close() its CheckpointDirectory, use read_only=True to inspect, "
            f"or, if that run is certainly dead, delete {self.path!r}.",
        )
