"""Open only regular files, and never block doing it.

A FIFO planted at a checkpoint, registry or lock name would make a plain
``open()`` wait forever for a writer; a directory there would fail with a
confusing ``IsADirectoryError`` deep inside a read. :func:`open_regular`
opens with ``O_NONBLOCK`` (a FIFO opens at once instead of waiting), checks
the opened descriptor with ``fstat`` (so a swap between a check and the open
cannot slip through), and refuses anything but a regular file with a
:class:`~engine_kit.errors.NotARegularFileError`.

>>> import tempfile
>>> with tempfile.NamedTemporaryFile() as f, open_regular(f.name) as fileobj:
...     fileobj.read()
b''
>>> try:
...     open_regular(tempfile.gettempdir())
... except NotARegularFileError as exc:
...     print("is a directory" in str(exc))
True
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import BinaryIO

from engine_kit.errors import NotARegularFileError, fix_message

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symlink"),
)


def describe_kind(mode: int) -> str:
    """A human name for the file type in ``mode`` (``st_mode``).

    >>> describe_kind(stat.S_IFIFO)
    'a FIFO (named pipe)'
    """
    for check, name in _KINDS:
        if check(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "an unknown kind of file"


def not_regular_error(path: str, mode: int, role: str = "file") -> NotARegularFileError:
    """The error for a non-regular ``path`` (``role``: what engine_kit expected there)."""
    return NotARegularFileError(
        fix_message(
            f"{path!r} is {describe_kind(mode)}, not a regular file; engine_kit never reads or writes it as a {role}.",
            "remove or rename it (engine_kit only ever creates regular files there).",
        )
    )


def open_regular(path: str | os.PathLike[str], role: str = "file", *, append: bool = False) -> BinaryIO:
    """Open ``path`` for binary reading (or appending) if, and only if, it is a regular file.

    Args:
        path: the file (a symlink is followed; callers that must not follow
            one ``lstat`` first).
        role: what the caller expects there ("checkpoint", "registry",
            "lock"), used in the error message.
        append: open for appending instead of reading (the file must exist).

    Returns:
        A buffered binary file object (blocking mode restored).

    Raises:
        NotARegularFileError: a FIFO, socket, device or directory.
        OSError: the usual reasons (missing, permission denied).
    """
    path = os.fspath(path)
    try:
        access = os.O_WRONLY | os.O_APPEND if append else os.O_RDONLY
        fd = os.open(path, access | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        # Opening a Unix socket fails with ENXIO; say what it is rather than "no such device".
        if exc.errno == errno.ENXIO:
            raise not_regular_error(path, os.stat(path).st_mode, role) from exc
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular_error(path, mode, role)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return os.fdopen(fd, "ab" if append else "rb")
    except BaseException:
        os.close(fd)
        raise


def lstat_kind(path: str | os.PathLike[str]) -> int | None:
    """``st_mode`` of ``path`` without following a link, or None when nothing is there.

    >>> lstat_kind("/nonexistent/x") is None
    True
    """
    try:
        return os.lstat(os.fspath(path)).st_mode
    except FileNotFoundError:
        return None
