"""Typed errors raised by engine_kit.

Every message says what happened, shows the offending value and ends with
"To fix: ..." so the user knows the next move without reading our source.
"""

from __future__ import annotations


def fix_message(problem: str, fix: str) -> str:
    """Join a problem statement and its remedy in the house style.

    >>> fix_message("accumulation_steps=0 is below 1.", "pass an integer >= 1.")
    'accumulation_steps=0 is below 1. To fix: pass an integer >= 1.'
    """
    return f"{problem} To fix: {fix}"


class HandlerError(RuntimeError):
    """An event handler raised; the message names the handler and the event.

    The original exception is kept as ``__cause__``.
    """

    def __init__(self, message: str, *, handler_name: str, event: str) -> None:
        super().__init__(message)
        self.handler_name = handler_name
        self.event = event


class CheckpointError(RuntimeError):
    """Base class of every checkpoint failure."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written; older checkpoints are untouched."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file is truncated, empty, altered or not a checkpoint."""


class CheckpointExistsError(CheckpointWriteError):
    """Something already sits at a checkpoint's name; committed names are never reused or replaced."""


class NotARegularFileError(CheckpointCorruptError):
    """A checkpoint, registry or lock path is a FIFO, device, directory or socket, not a file."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the live objects; nothing was applied."""


class CheckpointDirectoryNotEmptyError(CheckpointError):
    """A fresh run was pointed at a directory holding an earlier run's checkpoints; nothing was changed."""


class RunDirectoryError(OSError):
    """A run directory cannot be used (not a directory, not writable, path too long); nothing was written."""


class RankAgreementError(RuntimeError):
    """A step of a multi-process run failed on some rank, or the ranks disagree.

    Raised with the same message on every rank, so that all of them stop
    together instead of training apart or waiting forever on a collective.
    ``failures`` maps each failing rank to its ``"ErrorType: message"``.
    """

    def __init__(self, message: str, *, failures: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.failures = dict(failures or {})
