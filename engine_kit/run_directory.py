"""Check a run directory up front: exists or can be made, is a directory, is writable.

A script that writes logs, checkpoints and reports into one directory calls
``prepare_run_directory`` first, so that a bad path fails at once with the
path and a "To fix", not as a raw ``OSError`` from a logger minutes later.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from engine_kit.errors import RunDirectoryError, fix_message


def _describe(path: Path) -> str:
    mode = path.lstat().st_mode
    kinds = ((stat.S_ISREG, "a regular file"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a broken symlink"))
    return next((name for test, name in kinds if test(mode)), "not a directory")


def _refuse(path: Path, problem: str, fix: str) -> RunDirectoryError:
    return RunDirectoryError(fix_message(f"run directory {str(path)!r}: {problem}.", fix))


def prepare_run_directory(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and its parents) if needed and prove it is a writable directory.

    Returns:
        The path, as a ``Path``.

    Raises:
        RunDirectoryError: the path is a file (or FIFO, device ...), a parent is
            not a directory, a name is too long, or the directory is not writable;
            the message names the path and says how to fix it.

    >>> import tempfile, os
    >>> prepare_run_directory(os.path.join(tempfile.mkdtemp(), "runs", "a")).is_dir()
    True
    """
    run_dir = Path(path)
    other = "pass another run directory"
    try:
        if (run_dir.exists() or run_dir.is_symlink()) and not run_dir.is_dir():
            raise _refuse(run_dir, f"it is {_describe(run_dir)}, not a directory", f"{other}, or move that away.")
        run_dir.mkdir(parents=True, exist_ok=True)
    except RunDirectoryError:
        raise
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            longest = max((len(part) for part in run_dir.parts), default=0)
            problem = f"the path is too long for the filesystem ({len(str(run_dir))} characters, longest name {longest})"
            raise _refuse(run_dir, problem, "pass a shorter run directory.") from err
        if err.errno == errno.ENOTDIR:
            raise _refuse(run_dir, "one of its parents is a file, not a directory", f"{other}.") from err
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            problem = f"it cannot be created ({os.strerror(err.errno)})"
            raise _refuse(run_dir, problem, f"{other} in a writable place.") from err
        raise _refuse(run_dir, f"it cannot be created ({err})", f"{other}.") from err
    try:
        # os.access misses read-only mounts and ACLs: only a real write proves it.
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".ek-write-probe-"):
            pass
    except OSError as err:
        problem = f"it is not writable ({os.strerror(err.errno) if err.errno else err})"
        raise _refuse(run_dir, problem, f"make it writable (chmod u+w) or {other}.") from err
    return run_dir
