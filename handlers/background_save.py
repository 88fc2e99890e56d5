"""Checkpoint writes on a background thread, for ``CheckpointRotation(async_save=True)``.

The training thread captures the payload (tensors copied to the CPU, so
training can go on changing its own) and hands the write to one writer
thread; serializing, hashing, fsyncing, indexing and rotating happen there.
At most one save is in flight: the next one waits for it. The training
thread learns the outcome at its next call of :meth:`BackgroundSaves.poll`
or :meth:`~BackgroundSaves.settle`: success runs the save's completion
(``CHECKPOINT_SAVED`` fires on the training thread, once the file is
durable); a failure is raised there as a ``CheckpointWriteError`` whose
cause is the writer's error.

>>> saves = BackgroundSaves()
>>> done = []
>>> saves.submit(lambda: None, lambda: done.append("durable"))
>>> saves.settle(); done
['durable']
>>> saves.close()
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from engine_kit.errors import CheckpointWriteError, fix_message

_REBUILT = (dict, collections.OrderedDict, list, tuple, set)


def cpu_copy(value: Any) -> Any:
    """A copy of ``value`` that shares no tensor or container with it; tensors on the CPU.

    Every tensor is copied (also CPU ones: the optimizer updates them in
    place while the writer serializes). Plain dicts, lists, tuples and sets
    are rebuilt; everything else (numbers, strings, ``torch.Size``...) is
    immutable and kept.

    >>> weights = torch.ones(2)
    >>> copy = cpu_copy({"w": weights, "steps": [1, 2]})
    >>> _ = weights.add_(1); copy["w"]
    tensor([1., 1.])
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    kind = type(value)
    if kind in (dict, collections.OrderedDict):
        return kind((key, cpu_copy(item)) for key, item in value.items())
    if kind in (list, tuple, set):
        return kind(cpu_copy(item) for item in value)
    return value


class BackgroundSaves:
    """One writer thread running at most one save at a time."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[Future[Any], Callable[[], None]] | None = None

    @property
    def pending(self) -> bool:
        """Whether a save was handed over and its outcome not yet collected."""
        return self._pending is not None

    def submit(self, write: Callable[[], Any], on_durable: Callable[[], None]) -> None:
        """Run ``write`` on the writer thread, after the previous save finished.

        Args:
            write: serializes and commits; runs on the writer thread.
            on_durable: runs on the calling thread when the outcome is
                collected and ``write`` succeeded.

        Raises:
            CheckpointWriteError: the previous save failed.
        """
        self.settle()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine_kit-checkpoint")
        self._pending = (self._executor.submit(write), on_durable)

    def poll(self) -> None:
        """Collect the outcome of a finished save, without waiting for one still running."""
        if self._pending is not None and self._pending[0].done():
            self.settle()

    def settle(self) -> None:
        """Wait for the save in flight, if any, and collect its outcome.

        Raises:
            CheckpointWriteError: it failed (the cause is chained).
        """
        if self._pending is None:
            return
        future, on_durable = self._pending
        self._pending = None
        error = future.exception()
        if error is not None:
            raise CheckpointWriteError(
                fix_message(
                    f"The background checkpoint save failed: {str(error).split(' To fix:')[0]}",
                    "fix the cause (free disk space, an unserializable payload), then resume with resume='auto'.",
                )
            ) from error
        on_durable()

    def close(self) -> None:
        """Settle the save in flight, then stop the writer thread (safe to call twice)."""
        try:
            self.settle()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
