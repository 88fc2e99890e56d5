"""Checkpoint writes on a background thread: the machinery of every asynchronous save.

``CheckpointDirectory.commit_async`` and ``CheckpointRotation(async_save=True)``
both use it. The calling (training) thread captures a snapshot and hands the
write to a writer thread; serializing, hashing, fsyncing, indexing and
rotating happen there.
At most one save is in flight: the next one waits for it (back-pressure,
counted in :attr:`BackgroundSaves.waits` and logged now and then).
The training thread learns the outcome at its next call of
:meth:`BackgroundSaves.poll` or :meth:`~BackgroundSaves.settle`: success
runs the save's completion (``CHECKPOINT_SAVED`` fires on the training
thread, once the file is durable); a failure is raised there as a
``CheckpointWriteError`` naming the checkpoint and the cause, chained to the
writer's own error. An outcome is never dropped: one that no call collected
by the time the process exits is printed to stderr.

One writer thread serves all the saves of a :class:`BackgroundSaves`: it is
started by the first save and fed through a queue, so a save costs the
training thread a queue put, not a thread start (whose hand-over blocks the
caller until the new thread runs). It exits after :data:`IDLE_EXIT_S`
without work, or at :meth:`BackgroundSaves.stop_writer`; the next save
starts a new one.

The writer is a daemon thread, so a hung disk cannot keep a dead process
alive: the exit waits at most :data:`EXIT_WAIT_S` for a write in flight.
A process that dies mid-write leaves the previous checkpoint the newest
valid one (the commit's ordering guarantees it) and a temp file that the
next opening of the directory sweeps.

>>> saves = BackgroundSaves()
>>> done = []
>>> saves.submit(lambda serialized: None, lambda: done.append("durable"), path="ckpts/step1.ekpt")
>>> saves.settle(); done
['durable']
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

from engine_kit.errors import CheckpointWriteError, fix_message

WRITER_THREAD_NAME = "engine_kit-checkpoint-writer"
WRITER_NICENESS = 5
"""How much lower than training the writer thread runs (Linux nice levels): a save slows steps less."""
EXIT_WAIT_S = 120.0
"""How long the interpreter's exit waits for a write in flight (the run's own end waits for it fully)."""
IDLE_EXIT_S = 2.0
"""How long the writer thread waits for the next save before it exits (saves that keep coming reuse it: no thread start each)."""

_LOG_AT = frozenset({1, 10, 100, 1000, 10000})  # back-pressure is logged at the 1st, 10th, 100th... wait
_log = logging.getLogger("engine_kit.checkpoint")


def _lower_priority() -> None:
    """Give training threads the larger CPU share while a write is in flight (hashing is CPU work).

    On Linux a thread has its own nice value; elsewhere this does nothing.
    """
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + WRITER_NICENESS))
    except (AttributeError, OSError):
        pass


class _Job:
    """One save handed to the writer: its outcome (``result`` or ``error``), the fence it lifts, the thread running it."""

    def __init__(self, path: str, write: Callable[[Callable[[], None]], Any], on_durable: Callable[[], None]) -> None:
        self.path = path
        self.on_durable = on_durable
        self.result: Any = None  # what ``write`` returned
        self.error: BaseException | None = None
        self.serialized = threading.Event()  # the payload's tensors are no longer read
        self.done = threading.Event()
        self.thread: threading.Thread | None = None  # the writer thread, set before the job is queued
        self._write: Callable[[Callable[[], None]], Any] | None = write

    def _run(self) -> None:
        """Run the write on the writer thread and record its outcome; never raises."""
        write, self._write = self._write, None  # the payload it holds is not kept past the write
        try:
            if write is not None:
                self.result = write(self.serialized.set)
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread, never lost
            self.error = exc
        finally:
            self.serialized.set()
            self.done.set()


class _Writer:
    """The daemon thread that runs one ``BackgroundSaves``' jobs in turn, started on demand.

    Each thread has its own queue: a thread that exits (idle, or told to stop)
    drops its queue under the lock, so a job is never put where no thread reads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[_Job | None] | None = None

    def hand_over(self, job: _Job) -> None:
        """Queue ``job`` for the writer thread, starting one if none is running (``job.thread`` names it)."""
        with self._lock:
            thread, jobs = self._thread, self._jobs
            if thread is None or jobs is None or not thread.is_alive():  # not alive: e.g. in a forked child
                jobs = queue.SimpleQueue()
                thread = threading.Thread(target=self._serve, args=(jobs,), name=WRITER_THREAD_NAME, daemon=True)
                self._thread, self._jobs = thread, jobs
                thread.start()
            job.thread = thread  # before the job can run: the writer recognizes itself by it
            jobs.put(job)

    def stop(self) -> None:
        """Let the thread exit once the jobs already queued are done; a later job starts a new one."""
        with self._lock:
            if self._jobs is not None:
                self._jobs.put(None)
            self._thread = self._jobs = None

    def _serve(self, jobs: queue.SimpleQueue[_Job | None]) -> None:
        _lower_priority()
        while True:
            try:
                job = jobs.get(timeout=IDLE_EXIT_S)
            except queue.Empty:
                with self._lock:
                    if not jobs.empty():
                        continue  # handed over just now
                    if self._jobs is jobs:
                        self._thread = self._jobs = None
                    return
            if job is None:
                return
            job._run()
            job = None  # its outcome belongs to the training thread now


class BackgroundSaves:
    """At most one checkpoint write in flight, on a daemon writer thread.

    Args:
        defer_failures: keep a failed write's error for :meth:`settle`
            instead of raising it at :meth:`poll` (multi-process runs: the
            error must surface at a point every rank reaches together).
    """

    def __init__(self, *, defer_failures: bool = False) -> None:
        self.defer_failures = defer_failures
        self.job: _Job | None = None  # the save handed over whose outcome is not collected yet
        self.waits = 0  # saves that found the previous one still writing
        self.waited_s = 0.0  # training time spent in those waits
        self._writer = _Writer()
        _watch_at_exit(self)

    @property
    def pending(self) -> bool:
        """Whether a save was handed over and its outcome not yet collected."""
        return self.job is not None

    @property
    def writing(self) -> bool:
        """Whether the writer is still busy with the save in flight."""
        return self.job is not None and not self.job.done.is_set()

    def submit(self, write: Callable[[Callable[[], None]], Any], on_durable: Callable[[], None], *, path: str) -> None:
        """Run ``write`` on a writer thread, after the previous save's outcome was collected.

        Args:
            write: serializes and commits; runs on the writer thread. It gets a
                callable to call once the payload's tensors are serialized (the fence).
            on_durable: runs on the calling thread when the outcome is
                collected and ``write`` succeeded.
            path: the checkpoint being written, named in errors.

        Raises:
            CheckpointWriteError: the previous save failed.
        """
        self.settle(back_pressure=True)
        job = _Job(path, write, on_durable)
        self._writer.hand_over(job)
        self.job = job

    def stop_writer(self) -> None:
        """Let the writer thread exit once the save in flight, if any, is written (the next save starts a new one).

        The outcome is still collected as usual (:meth:`settle`, or printed at exit).
        """
        self._writer.stop()

    def wait_serialized(self) -> None:
        """Block until the save in flight no longer reads its payload's tensors (the fence)."""
        job = self.job
        if job is not None:
            job.serialized.wait()

    def finish(self) -> None:
        """Wait for the write in flight, then collect its outcome as :meth:`poll` would (a deferred failure stays)."""
        job = self.job
        if job is not None:
            job.done.wait()
            self.poll()

    def poll(self) -> None:
        """Collect the outcome of a finished save, without waiting for one still running."""
        job = self.job
        if job is None or not job.done.is_set():
            return
        if job.error is not None and self.defer_failures:
            return  # kept for the next settle(), which every rank reaches
        self.settle()

    def settle(self, *, back_pressure: bool = False, timeout_s: float | None = None) -> None:
        """Wait for the save in flight, if any, and collect its outcome.

        Args:
            back_pressure: a new save is due; count and now and then warn
                when it has to wait for the previous one.
            timeout_s: give up waiting after this long (the run is failing
                anyway): a warning says the write goes on in the background.

        Raises:
            CheckpointWriteError: it failed (the writer's error is chained).
        """
        job = self.job
        if job is None:
            return
        if not job.done.is_set():
            started = time.perf_counter()
            if not job.done.wait(timeout_s):
                warnings.warn(
                    f"engine_kit: gave up waiting after {timeout_s:.0f} s for the checkpoint write of {job.path!r}; "
                    "it goes on in the background until the process exits. The previous checkpoint stays the newest "
                    "valid one if it does not finish.", stacklevel=2,
                )
                return
            if back_pressure:
                self._count_wait(job, time.perf_counter() - started)
        self.job = None
        if job.error is not None:
            raise write_failure(job.path, job.error)
        job.on_durable()

    def _count_wait(self, job: _Job, waited_s: float) -> None:
        self.waits += 1
        self.waited_s += waited_s
        if self.waits in _LOG_AT:
            _log.warning(
                "engine_kit: a checkpoint save was due while the previous one (%r) was still being written; training "
                "waited %.2f s for it (%d such wait(s) so far, %.1f s in all). If that adds up, save less often (with "
                "CheckpointRotation: a larger every_steps) or to a faster disk.", job.path, waited_s, self.waits, self.waited_s,
            )


def write_failure(path: str, error: BaseException) -> CheckpointWriteError:
    """The training thread's error for a background write of ``path`` that raised ``error``."""
    cause = str(error).split(" To fix:")[0] or type(error).__name__
    failure = CheckpointWriteError(
        fix_message(
            f"The background write of the checkpoint {path!r} failed: {cause} The older checkpoints are untouched.",
            "fix the cause (free disk space, make the directory writable, store only tensors, numbers and strings "
            "in the saved state), then run again with resume='auto': it continues from the newest valid checkpoint.",
        )
    )
    failure.__cause__ = error
    return failure


_LIVE: weakref.WeakSet[BackgroundSaves] = weakref.WeakSet()


def _watch_at_exit(saves: BackgroundSaves) -> None:
    if not _LIVE:
        atexit.unregister(_report_at_exit)  # registered once, at the first instance (nothing at import)
        atexit.register(_report_at_exit)
    _LIVE.add(saves)


def _report_at_exit() -> None:
    """At interpreter exit: wait (bounded) for writes in flight and print outcomes nobody collected."""
    for saves in list(_LIVE):
        job = saves.job
        if job is None:
            continue
        if not job.done.is_set():
            print(f"engine_kit: waiting up to {EXIT_WAIT_S:.0f} s for the checkpoint write of {job.path!r} ...", file=sys.stderr)
            if not job.done.wait(EXIT_WAIT_S):
                print(f"engine_kit: the checkpoint write of {job.path!r} did not finish; the previous checkpoint stays "
                      "the newest valid one.", file=sys.stderr)
                continue
        if job.error is not None:
            print(f"engine_kit: {write_failure(job.path, job.error)}", file=sys.stderr)
        else:
            print(f"engine_kit: the checkpoint {job.path!r} was written completely (its run ended before it could say so).",
                  file=sys.stderr)

