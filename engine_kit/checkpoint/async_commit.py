"""``CheckpointDirectory.commit_async``: the same commit, written on a background thread.

For a loop of your own: the calling thread only copies the payload's
tensors into host buffers that the directory keeps from one commit to the
next (:class:`~engine_kit.checkpoint.snapshot.SnapshotBuffers`), so it may
change them as soon as the call returns; serializing, hashing, the atomic
write, the fsyncs, the index update and the rotation (``rotate_out``) run
on the writer thread of :mod:`engine_kit.checkpoint.background`, through
:meth:`CheckpointDirectory.commit` itself: the same file, the same
guarantees, the same refusal of an existing name. A CUDA tensor is copied
(non-blocking, into pinned memory, ordered on its stream before later
kernels) and written as that CPU copy: the file ``commit`` writes for the
payload moved to the CPU.

One commit is in flight at a time. A ``commit_async`` while the previous one
is still being written waits for it (back-pressure: counted in the
directory's ``waits``, logged on the ``engine_kit.checkpoint`` logger at the
1st, 10th, 100th... wait); any other call on the directory (``entries()``,
``next_name()``, ``commit()``...) waits for it too. A failed write is a
``CheckpointWriteError`` naming the file, the writer's error chained as its
``__cause__``; it is never lost: :meth:`PendingCommit.result` raises it,
else the next ``commit_async``, ``flush()`` or ``close()`` does (or, at
interpreter exit, it is printed). Arguments are checked on the calling
thread, except ``retag`` and ``rotate_out``, which need the index as the
writer finds it: a bad one fails the write.

>>> import tempfile, torch
>>> from engine_kit.checkpoint import CheckpointDirectory
>>> weights = torch.zeros(2)
>>> with CheckpointDirectory(tempfile.mkdtemp()) as ckpts:
...     pending = ckpts.commit_async(ckpts.next_name(1), {"w": weights}, step=1, epoch=0)
...     _ = weights.add_(1)  # at once: the snapshot was taken
...     entry = pending.result()
...     entry.step, ckpts.load(entry)["w"]
(1, tensor([0., 0.]))
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from engine_kit.checkpoint.background import BackgroundSaves, write_failure
from engine_kit.checkpoint.commit_args import checked_record
from engine_kit.checkpoint.registry import RegistryEntry
from engine_kit.checkpoint.snapshot import SnapshotBuffers
from engine_kit.errors import fix_message

if TYPE_CHECKING:
    from engine_kit.checkpoint.background import _Job
    from engine_kit.checkpoint.directory import CheckpointDirectory

_OPTIONS = frozenset({"step", "epoch", "tags", "metric", "run_id", "retag", "rotate_out"})


class PendingCommit:
    """One :meth:`CheckpointDirectory.commit_async`: wait for it and collect its outcome.

    Attributes:
        path: the checkpoint file being written.
    """

    def __init__(self, saves: BackgroundSaves, job: _Job) -> None:
        self._saves = saves
        self._job = job
        self.path = job.path

    def done(self) -> bool:
        """Whether the writer has finished (committed or failed)."""
        return self._job.done.is_set()

    def result(self, timeout: float | None = None) -> RegistryEntry:
        """Wait for the commit and return its index entry (what ``commit`` returns).

        Args:
            timeout: seconds to wait at most; ``None``: until it is done.

        Raises:
            CheckpointWriteError: the write failed (the writer's error is its ``__cause__``);
                collected: the directory does not raise it again.
            TimeoutError: still being written after ``timeout`` seconds.
        """
        if not self._job.done.wait(timeout):
            raise TimeoutError(fix_message(f"The checkpoint {self.path!r} was still being written after {timeout} s.",
                                           "wait longer (timeout=None waits until it is done), or call result() again later."))
        if self._saves.job is self._job:
            self._saves.settle()  # collects the outcome: raises a failure once, here
        elif self._job.error is not None:
            raise write_failure(self.path, self._job.error)
        return self._job.result

    def __repr__(self) -> str:
        return f"PendingCommit({self.path!r}, done={self.done()})"


class AsyncCommits:
    """A directory's background commits: one writer, one snapshot buffer set, at most one commit in flight.

    Args:
        directory: the writable directory the commits go to.
    """

    def __init__(self, directory: CheckpointDirectory) -> None:
        self._directory = directory
        self._saves = BackgroundSaves()
        self._snapshots = SnapshotBuffers()  # reused by every commit: only one is in flight

    @property
    def waits(self) -> int:
        """Commits that had to wait for the previous one."""
        return self._saves.waits

    def submit(self, name: str, payload: dict[str, Any], options: dict[str, Any]) -> PendingCommit:
        """Check the arguments, wait for the commit in flight, snapshot ``payload``, hand the commit to the writer."""
        unknown = sorted(set(options) - _OPTIONS)
        missing = sorted({"step", "epoch"} - set(options))
        if unknown or missing:
            raise TypeError(fix_message(f"commit_async() got unknown keyword(s) {unknown} or lacks {missing}.",
                                        f"pass step= and epoch=, and only keywords among {sorted(_OPTIONS)}."))
        directory = self._directory
        directory._require_writable("commit")
        tags, metric, run_id = checked_record(name, options["step"], options["epoch"], options.get("tags", ()),
                                              options.get("metric"), directory.run_id if options.get("run_id") is None else options["run_id"])
        options = {**options, "tags": tags, "metric": metric, "run_id": run_id}
        self._saves.settle(back_pressure=True)  # the buffers and the directory are the writer's until then
        snapshot = self._snapshots.capture(payload)

        def write(serialized: Any) -> RegistryEntry:
            snapshot.wait_ready()  # CUDA: the device-to-host copies have landed
            return directory.commit(name, snapshot.payload, on_serialized=serialized, **options)

        self._saves.submit(write, lambda: None, path=os.path.join(directory.path, name))
        return PendingCommit(self._saves, self._saves.job)

    def flush(self) -> None:
        """Wait for the commit in flight and collect its outcome (``CheckpointWriteError`` if it failed)."""
        self._saves.settle()

    def close(self) -> None:
        """:meth:`flush`, then let the writer thread exit (a later commit starts a new one)."""
        try:
            self.flush()
        finally:
            self._saves.stop_writer()

    def wait_unless_writer(self) -> None:
        """Block until the commit in flight is written, unless called by its writer thread (the commit itself)."""
        job = self._saves.job
        if job is not None and threading.current_thread() is not job.thread:
            job.done.wait()
