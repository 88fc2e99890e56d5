"""Atomic file replacement: a final name only ever holds complete, durable bytes.

The write path:

1. :func:`create_temp` in the *same* directory as the final name, with an
   engine_kit name (``.ek-tmp-<pid>-<count><random>``), write, ``flush``,
   ``os.fsync(file)``.
2. ``os.replace(tmp, final)`` (the index), or for a name that must never be
   replaced (a checkpoint) ``os.link(tmp, final)``, which fails if anything
   is there, then unlink the temp; then ``fsync`` the directory.

Any failure on the way removes the temp file and raises
:class:`~engine_kit.errors.CheckpointWriteError`; the final name keeps its
old content (or stays absent). A directory, FIFO or device at the final
name is refused up front with a message that says so.

Symlink policy: if the final name is a symlink, :func:`atomic_write` refuses.
``os.replace`` would only swap the link itself (never write through it), so
even a link planted between our check and the rename cannot make us modify
the file it points at; the refusal just makes the situation loud.

``os.fsync`` and ``os.replace`` are looked up on the ``os`` module at call
time so tests can record the syscall order by monkeypatching them.

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> atomic_write(folder / "a.bin", lambda f: f.write(b"hello"))
>>> (folder / "a.bin").read_bytes()
b'hello'
>>> sweep_stale_temps(folder)
[]
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
from collections.abc import Callable
from typing import IO, Any

from engine_kit.checkpoint.regular import describe_kind, lstat_kind
from engine_kit.errors import CheckpointExistsError, CheckpointWriteError, fix_message

TEMP_PREFIX = ".ek-tmp-"

# Filesystems that cannot fsync a directory say so with these; the rename is
# still atomic there, only its durability is the filesystem's business.
_DIR_FSYNC_UNSUPPORTED = (errno.EINVAL, errno.ENOTSUP, errno.EBADF)


_TEMP_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_TEMP_ATTEMPTS = 100
_temp_count = itertools.count()  # next() on it is atomic under the GIL: threads never share a number


def temp_prefix() -> str:
    """The temp file prefix for this process: ``.ek-tmp-<pid>-``.

    >>> temp_prefix().startswith(TEMP_PREFIX)
    True
    """
    return f"{TEMP_PREFIX}{os.getpid()}-"


def _temp_suffix() -> str:
    """A name part no other temp of this process has had; random bytes guard against a recycled pid."""
    return f"{next(_temp_count)}{os.urandom(3).hex()}"


def create_temp(directory: str) -> tuple[int, str]:
    """Create a new, empty temp file in ``directory``, readable and writable by its owner only.

    ``tempfile.mkstemp`` does the same, but draws its names through a Python
    random generator; on a background writer every microsecond of Python holds
    the interpreter lock the training thread needs. A name already taken is
    retried with the next one (``O_CREAT | O_EXCL``: an existing file is never opened).

    Args:
        directory: where to create it.

    Returns:
        ``(fd, path)``: a descriptor open for reading and writing, and the file's path.

    Raises:
        FileExistsError: every one of 100 names was taken.
        OSError: the directory is missing, not writable, full...

    >>> import tempfile
    >>> fd, path = create_temp(tempfile.mkdtemp())
    >>> os.close(fd); os.path.basename(path).startswith(temp_prefix())
    True
    """
    prefix = os.path.join(directory, temp_prefix())
    for _attempt in range(_TEMP_ATTEMPTS):
        path = prefix + _temp_suffix()
        try:
            return os.open(path, _TEMP_FLAGS, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"{_TEMP_ATTEMPTS} temp names in a row were taken", prefix)


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Make a rename or unlink inside ``path`` durable by fsyncing the directory.

    Args:
        path: the directory.

    Raises:
        OSError: the directory cannot be opened or fsynced (except on
            filesystems that do not support a directory fsync at all).

    >>> import tempfile
    >>> fsync_directory(tempfile.gettempdir())
    """
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def probe_writable(path: str, create: bool) -> None:
    """Write, fsync and delete a probe file in ``path``: fail now, not at the first save hours later.

    Raises:
        CheckpointWriteError: ``path`` cannot be created (``create``), is
            missing, or cannot take a small fsynced file (read-only, full, not
            a directory).
    """
    try:
        if create:
            os.makedirs(path, exist_ok=True)
        elif not os.path.isdir(path):
            raise FileNotFoundError(f"{path!r} does not exist")
        fd, probe = create_temp(path)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise CheckpointWriteError(
            fix_message(
                f"Checkpoint directory {path!r} is not writable: {exc!r}.",
                "choose a directory you can write to (not under a file, not on a read-only mount) with free space.",
            )
        ) from exc


def _refuse_symlink(path: str, mode: int | None) -> None:
    """Raise when ``path`` (whose ``lstat`` mode is ``mode``) is a symlink: we never write through (or at) one."""
    if mode is not None and stat.S_ISLNK(mode):
        raise CheckpointWriteError(
            fix_message(
                f"Refusing to write {path!r}: it is a symlink (to {os.readlink(path)!r}) and "
                "engine_kit never writes through links.",
                "remove the link or choose another checkpoint name.",
            )
        )


def _refuse_occupied(path: str, replace: bool, mode: int | None) -> None:
    """Raise when something we must not replace sits at ``path`` (whose ``lstat`` mode is ``mode``).

    A directory, FIFO or device is never replaced (and must not be reported
    as a full disk); with ``replace=False`` nothing at all is.
    """
    if mode is None:
        return
    if not replace:
        raise CheckpointExistsError(
            fix_message(
                f"Refusing to write {path!r}: {describe_kind(mode)} already exists at that name, and engine_kit never replaces it.",
                "choose a new name (CheckpointDirectory.next_name(step) gives one), or move that entry away.",
            )
        )
    if not stat.S_ISREG(mode) and not stat.S_ISLNK(mode):
        raise CheckpointWriteError(
            fix_message(
                f"Refusing to write {path!r}: it is {describe_kind(mode)}, not a regular file.",
                "remove or rename it; engine_kit only ever writes regular files there.",
            )
        )


def _move_into_place(tmp: str, final: str, replace: bool) -> None:
    """``os.replace``, or with ``replace=False`` a hard link that fails if ``final`` appeared meanwhile."""
    if replace:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise CheckpointExistsError(
            fix_message(f"Refusing to write {final!r}: something appeared at that name during the write.", "choose a new name.")
        ) from None
    except OSError:
        # No hard links on this filesystem: the check-then-rename is still
        # safe against engine_kit writers, which hold the directory lock.
        _refuse_occupied(final, False, lstat_kind(final))
        os.replace(tmp, final)
        return
    os.unlink(tmp)


def _remove_quietly(path: str) -> None:
    """Best-effort removal of our temp file; the original error matters more."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        # Left for sweep_stale_temps at the next start-up.
        pass


def atomic_write(
    path: str | os.PathLike[str],
    write_fn: Callable[[IO[bytes]], Any],
    *,
    replace: bool = True,
    sync_file: bool = True,
    sync_directory: bool = True,
) -> None:
    """Write a file so that its final name never holds partial bytes.

    Args:
        path: the final file name; its directory must exist.
        write_fn: called with a binary file object open on the temp file; it
            writes the content and returns anything (ignored).
        replace: whether an existing regular file at ``path`` is replaced
            (the registry) or the write refused (a checkpoint: never overwritten).
        sync_file: fsync the content before the rename. Only for files that
            can be rebuilt when a power loss leaves them empty or stale (the
            index) may this be False; the rename stays atomic either way.
        sync_directory: fsync the directory after the rename. False when
            the caller fsyncs it once after several renames.

    Raises:
        CheckpointExistsError: ``replace=False`` and something is at ``path``.
        CheckpointWriteError: anything failed (ENOSPC, EIO, an exception in
            ``write_fn``, a symlink, directory or FIFO at ``path``); the temp
            file is removed and the final name is untouched. The cause is
            chained as ``__cause__``.
    """
    final = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(final)
    mode = lstat_kind(final)
    _refuse_symlink(final, mode)
    _refuse_occupied(final, replace, mode)
    try:
        fd, tmp = create_temp(directory)
    except OSError as exc:
        raise CheckpointWriteError(
            fix_message(
                f"Cannot create a temp file in {directory!r} to write {final!r}: {exc!r}.",
                "make the directory exist and be writable, and check free space.",
            )
        ) from exc
    try:
        with os.fdopen(fd, "wb") as fileobj:
            write_fn(fileobj)
            fileobj.flush()
            if sync_file:
                os.fsync(fileobj.fileno())
        _move_into_place(tmp, final, replace)
    except BaseException as exc:
        _remove_quietly(tmp)
        if not isinstance(exc, Exception) or isinstance(exc, CheckpointWriteError):
            raise  # KeyboardInterrupt / SystemExit keep their meaning; write_fn's own checkpoint error says it all.
        raise CheckpointWriteError(
            fix_message(
                f"Writing {final!r} failed: {exc!r}. The previous content of that name is untouched.",
                "free disk space / fix the I/O error, or make the payload serializable, then save again.",
            )
        ) from exc
    if not sync_directory:
        return
    try:
        fsync_directory(directory)
    except OSError as exc:
        raise CheckpointWriteError(
            fix_message(
                f"{final!r} was renamed into place but fsync of its directory {directory!r} failed: "
                f"{exc!r}; the rename may not survive a power loss.",
                "check the filesystem for I/O errors, then save again.",
            )
        ) from exc


def sweep_stale_temps(directory: str | os.PathLike[str]) -> list[str]:
    """Remove engine_kit's own leftover temp files (``.ek-tmp-*``) from ``directory``.

    Only regular files and symlinks whose names start with :data:`TEMP_PREFIX`
    are removed (a link is unlinked, never followed); every other file, such
    as a user's ``tmp123``, is left alone. Call it only while holding the
    directory's lock, so a live writer's temp is never swept away.

    Args:
        directory: the checkpoint directory.

    Returns:
        The removed file names, sorted.
    """
    removed = []
    with os.scandir(os.fspath(directory)) as entries:
        for entry in entries:
            if not entry.name.startswith(TEMP_PREFIX) or entry.is_dir(follow_symlinks=False):
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(entry.name)
    return sorted(removed)
