"""One writer per checkpoint directory: the ``.ek-lock`` file.

The lock is created exclusively (an ``O_CREAT | O_EXCL`` temp file holding
the record, hard-linked to ``.ek-lock``; ``link`` fails if the lock exists)
and holds JSON ``{"pid", "host", "start", "token", "heartbeat",
"elastic_run", "restart"}``. Another writer is refused while the holder
lives. A lock whose holder is provably gone is taken over with a warning
naming the evidence:

- same host: the pid is not running, is a zombie, or was reused by a process
  with another start time;
- another host (a requeued pod, a restarted node), under ``torchrun``: the
  holder recorded the same ``TORCHELASTIC_RUN_ID`` (the job's rendezvous id,
  which must be unique per job: ``"none"``, torchrun's default, never counts)
  and a lower ``TORCHELASTIC_RESTART_COUNT``: torchrun starts a new attempt
  only after stopping every worker of the previous one;
- another host, opted in with ``stale_after_s``: the holder's heartbeat (set at
  acquire, refreshed by :meth:`DirectoryLock.refresh` on every commit at most
  every ``HEARTBEAT_INTERVAL_S``) is older than that. Choose it well above
  the longest time between two saves: a live writer that saves less often
  than that loses its lock.

Any other lock from another host is refused (it cannot be checked). Takeover
renames the stale file aside and checks that what it moved is still the
stale lock, so two processes recovering at once cannot both end up
"holding" it. The lock is released by :meth:`DirectoryLock.release`, or at
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
import weakref

from engine_kit.checkpoint.atomic import atomic_write, create_temp, fsync_directory
from engine_kit.checkpoint.regular import open_regular
from engine_kit.errors import CheckpointWriteError, NotARegularFileError, fix_message

LOCK_NAME = ".ek-lock"
# A lock file that is still empty or garbled this long after its last write
# belongs to a writer killed between O_EXCL-create and write (a few bytes).
_UNREADABLE_LOCK_GRACE_S = 60.0
_MAX_LOCK_BYTES = 1 << 16  # a lock record is ~250 bytes
HEARTBEAT_INTERVAL_S = 30.0
# torchrun's default rendezvous id: shared by unrelated jobs, so it proves nothing.
_UNIQUE_RUN_IDS_ONLY = ("", "none")


def _elastic_identity() -> tuple[str | None, int | None]:
    """This process's torchrun job id and restart count (None outside torchrun)."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    try:
        restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    except (KeyError, ValueError):
        restart = None
    return run, restart


def _gone_from_another_host(holder: dict, stale_after_s: float | None) -> str | None:
    """Why a lock written on another host provably has no live writer (None: it may have one)."""
    run, restart = _elastic_identity()
    held_restart = holder.get("restart")
    if (
        run not in (None, *_UNIQUE_RUN_IDS_ONLY)
        and holder.get("elastic_run") == run
        and isinstance(held_restart, int)
        and restart is not None
        and held_restart < restart
    ):
        return f"restart {held_restart} of torchrun job {run!r}, and this is restart {restart}"
    heartbeat = holder.get("heartbeat")
    if stale_after_s is not None and isinstance(heartbeat, (int, float)) and time.time() - heartbeat > stale_after_s:
        return f"its last heartbeat is {time.time() - heartbeat:.0f} s old (stale_after_s={stale_after_s:g})"
    return None


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


# Locks this process released but could not delete (a directory made read-only): a later
# CheckpointDirectory of this same process may take them over, since no writer holds them.
_RELEASED_TOKENS: set[str] = set()


def _release(path: str, token: str, owner_pid: int) -> None:
    """Remove the lock file if it is still ours (never someone else's)."""
    if os.getpid() != owner_pid:
        return  # a forked child exiting must not drop its parent's lock
    _RELEASED_TOKENS.add(token)  # released, whether or not the file can go
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
        stale_after_s: take over a lock from another host whose heartbeat is
            older than this (None: never by age; see the module docstring).
    """

    def __init__(self, directory: str | os.PathLike[str], *, stale_after_s: float | None = None) -> None:
        if stale_after_s is not None and (
            isinstance(stale_after_s, bool) or not isinstance(stale_after_s, (int, float)) or not stale_after_s > HEARTBEAT_INTERVAL_S
        ):
            raise ValueError(
                fix_message(
                    f"stale_after_s={stale_after_s!r} must be a number of seconds above the {HEARTBEAT_INTERVAL_S:g} s heartbeat interval.",
                    "pass None (never take over another host's lock by age) or e.g. 3600.",
                )
            )
        self.path = os.path.join(os.fspath(directory), LOCK_NAME)
        self.stale_after_s = stale_after_s
        self._finalizer: weakref.finalize | None = None
        self._record: dict | None = None
        self._stale_reason = ""

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
        elastic_run, restart = _elastic_identity()
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": _start_time(os.getpid()),
            "token": token,
            "heartbeat": time.time(),
            "elastic_run": elastic_run,
            "restart": restart,
        }
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
            self._record = record
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
        fd, tmp = create_temp(directory)
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

    def refresh(self, *, min_interval_s: float = HEARTBEAT_INTERVAL_S) -> bool:
        """Rewrite the held lock with a new heartbeat, if the last one is older than ``min_interval_s``.

        Returns:
            Whether the lock file was rewritten.

        Raises:
            CheckpointWriteError: the lock is not held, or the file now holds
                another writer's record (it was taken over).
        """
        if not self.held or self._record is None:
            raise CheckpointWriteError(fix_message(f"Cannot refresh {self.path!r}: this object does not hold it.", "acquire() it first."))
        if time.time() - self._record["heartbeat"] < min_interval_s:
            return False
        _raw, holder = self._read()
        if holder is None or holder.get("token") != self._record["token"]:
            raise CheckpointWriteError(
                fix_message(f"The lock {self.path!r} was taken over by another writer.", "stop this run: another one owns the directory now.")
            )
        record = {**self._record, "heartbeat": time.time()}
        atomic_write(self.path, lambda fileobj: fileobj.write(json.dumps(record).encode("utf-8")))
        self._record = record
        return True

    def _is_stale(self, holder: dict | None) -> bool:
        """Whether the holder is provably gone; the evidence is kept for the takeover warning."""
        if holder is None:
            self._stale_reason = "an unreadable lock, untouched for over a minute"
            try:
                return time.time() - os.lstat(self.path).st_mtime > _UNREADABLE_LOCK_GRACE_S
            except OSError:
                return False
        who = f"pid {holder.get('pid')} on {holder.get('host')}"
        if holder.get("host") != socket.gethostname():
            reason = _gone_from_another_host(holder, self.stale_after_s)
            self._stale_reason = f"{who}: {reason}"
            return reason is not None
        if holder.get("pid") == os.getpid() and holder.get("token") in _RELEASED_TOKENS:
            self._stale_reason = f"{who} (this process), released earlier but not deleted (the directory was not writable then)"
            return True
        self._stale_reason = f"{who}, which is no longer running"
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
        warnings.warn(f"engine_kit: taking over the stale lock {self.path!r} left by {self._stale_reason}.", stacklevel=4)
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
            f"pass lock_stale_after_s= to take over a lock whose heartbeat expired, "
            f"or, if that run is certainly dead, delete {self.path!r}.",
        )
