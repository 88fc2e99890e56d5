"""Faults injected into the checkpoint writer of a training run, for the async-save tests.

Everything here is test code: it monkeypatches the process it runs in (a
child of the fault driver, ``tests/resume/fault_driver.py``, or the test
process through ``monkeypatch``), never the library.

A fault acts during the ``nth`` ``CheckpointDirectory.commit`` of the run, on
the background writer thread (``CheckpointRotation(async_save=True)``), at one
point of the write path (``POINTS``):

- ``mid-write``: inside the temp file's write, once its first bytes are on disk;
- ``temp-fsync``: the temp file is complete, before its fsync (no final name yet);
- ``link`` / ``after-link``: just before / after the file gets its final name;
- ``index-replace``: just after the index was replaced (the save is committed);
- ``unlink``: just before a rotated-out checkpoint is deleted.

and does one ``action``: ``exit`` (``os._exit(17)``), ``kill`` (SIGKILL to
itself), ``stall`` (signal the driver through the beacon pipe, then sleep
``seconds``), or ``SIGTERM`` / ``SIGINT`` (send it to itself, then stall
``seconds``, so the signal is handled while the write is in flight).

``python -m tests.resume.writer_faults lab [--fault AT:ACTION:NTH:SECONDS] --
<lab arguments>`` runs the FashionMNIST lab with async saves and that fault
(see :func:`lab_main`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ignite.engine import Events

from engine_kit import StepEvents
from engine_kit.checkpoint import TEMP_PREFIX, CheckpointDirectory, streaming
from tests.resume.train_script import CRASH_STATUS

WRITER_THREAD = "engine_kit-checkpoint"
POINTS = ("mid-write", "temp-fsync", "link", "after-link", "index-replace", "unlink")
ACTIONS = ("exit", "kill", "stall", "SIGTERM", "SIGINT")


def _on_writer() -> bool:
    return threading.current_thread().name.startswith(WRITER_THREAD)


def _is_temp_fd(fd: int) -> bool:
    try:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(TEMP_PREFIX)
    except OSError:
        return False


class _SlowFile:
    """A file proxy that fires the fault after its first write reached the disk."""

    def __init__(self, fileobj: Any, fire: Any) -> None:
        self._fileobj, self._fire = fileobj, fire

    def write(self, data: Any) -> int:
        written = self._fileobj.write(data)
        self._fileobj.flush()  # the partial bytes are in the temp file now
        self._fire()
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fileobj, name)


def install_fault(at: str, action: str, nth: int, beacon: int | None = None, seconds: float = 600.0) -> None:
    """Patch this process so that ``action`` happens at point ``at`` of the ``nth`` commit, on the writer thread."""
    if at not in POINTS or action not in ACTIONS:
        raise ValueError(f"unknown fault {at!r}/{action!r}: points {POINTS}, actions {ACTIONS}")
    commits = {"count": 0, "fired": False}
    local = threading.local()

    def fire() -> None:
        if commits["fired"] or getattr(local, "commit", None) != nth or not _on_writer():
            return
        commits["fired"] = True
        if action == "exit":
            os._exit(CRASH_STATUS)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action in ("SIGTERM", "SIGINT"):
            os.kill(os.getpid(), getattr(signal, action))
        if beacon is not None:
            os.write(beacon, b"s")
        time.sleep(seconds)

    real_commit = CheckpointDirectory.commit

    def commit(self: CheckpointDirectory, *args: Any, **kwargs: Any) -> Any:
        commits["count"] += 1
        local.commit = commits["count"]
        try:
            return real_commit(self, *args, **kwargs)
        finally:
            local.commit = None

    CheckpointDirectory.commit = commit
    if at == "mid-write":
        real_write_sealed = streaming.write_sealed
        streaming.write_sealed = lambda fileobj, *args, **kwargs: real_write_sealed(_SlowFile(fileobj, fire), *args, **kwargs)
    elif at == "temp-fsync":
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            if _is_temp_fd(fd):
                fire()
            real_fsync(fd)

        os.fsync = fsync
    elif at in ("link", "after-link"):
        real_link = os.link

        def link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if at == "link":
                fire()
            real_link(src, dst, *args, **kwargs)
            if at == "after-link":
                fire()

        os.link = link
    elif at == "index-replace":
        real_replace = os.replace

        def replace(src: Any, dst: Any) -> None:
            real_replace(src, dst)
            fire()

        os.replace = replace
    else:
        real_unlink = os.unlink

        def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
            if not os.path.basename(os.fspath(path)).startswith(TEMP_PREFIX):
                fire()
            real_unlink(path, *args, **kwargs)

        os.unlink = unlink


def pace_background_writes(patch: Callable[[Any, str, Any], None] = setattr) -> Callable[[Any], None]:
    """Patch ``CheckpointDirectory.commit`` (with ``patch``, e.g. ``monkeypatch.setattr``); return a trainer hook.

    With the hook attached, each iteration starts only once the background
    write in flight (if any) is over, so a write's outcome is collected at
    exactly the next iteration, however slow the writer is.
    """
    idle = threading.Event()
    idle.set()
    real_commit = CheckpointDirectory.commit

    def commit(self: CheckpointDirectory, *args: Any, **kwargs: Any) -> Any:
        if not _on_writer():
            return real_commit(self, *args, **kwargs)
        idle.clear()
        try:
            return real_commit(self, *args, **kwargs)
        finally:
            idle.set()

    patch(CheckpointDirectory, "commit", commit)

    def wait_for_the_writer() -> None:
        if not idle.wait(timeout=60):
            raise RuntimeError("a background checkpoint write never ended")
        time.sleep(0.02)  # the writer thread hands its outcome over just after commit returns

    return lambda trainer: trainer.add_event_handler(Events.ITERATION_STARTED, wait_for_the_writer)


def saved_step(path: str) -> int:
    """The optimizer step in a checkpoint's name (``step00000004-00002.ekpt`` -> 4)."""
    return int(os.path.basename(path)[len("step"):].split("-")[0])


def break_after_save(step: int, action: Callable[[], None], saved: list[int]) -> Callable[[Any], None]:
    """A trainer hook: call ``action`` once the save of ``step`` is durable (``saved`` collects the durable steps)."""

    def on_saved(engine: Any) -> None:
        saved.append(saved_step(engine.state.last_checkpoint))  # it may fire an iteration after the save
        if saved[-1] == step:
            action()

    return lambda trainer: trainer.add_event_handler(StepEvents.CHECKPOINT_SAVED, on_saved)


def lab_main(argv: list[str]) -> None:
    """Run the FashionMNIST lab with async saves forced on and, optionally, a writer fault.

    ``argv``: ``[--fault AT:ACTION:NTH:SECONDS] -- <lab arguments>``. Every
    ``CheckpointRotation`` the lab builds gets ``async_save=True``; at exit the
    process prints ``async rotations: N`` (how many were built with a background writer).
    """
    import atexit
    import functools
    import runpy

    from handlers.checkpoint import CheckpointRotation

    if "--" not in argv:
        raise SystemExit("usage: python -m tests.resume.writer_faults lab [--fault AT:ACTION:NTH:SECONDS] -- <lab arguments>")
    split = argv.index("--")
    options, lab_args = argv[:split], argv[split + 1:]
    if options[:1] == ["--fault"]:
        at, action, nth, seconds = options[1].split(":")
        install_fault(at, action, int(nth), None, float(seconds))
    built: list[Any] = []
    real_init = CheckpointRotation.__init__

    @functools.wraps(real_init)
    def init(self: CheckpointRotation, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **{**kwargs, "async_save": True})
        built.append(self)

    CheckpointRotation.__init__ = init
    atexit.register(lambda: print(f"async rotations: {sum(r._background is not None for r in built)}", flush=True))
    lab = Path(__file__).resolve().parents[2] / "examples" / "fashion_mnist.py"
    sys.argv = [str(lab), *lab_args]
    runpy.run_path(str(lab), run_name="__main__")


if __name__ == "__main__":
    lab_main(sys.argv[2:] if sys.argv[1:2] == ["lab"] else sys.argv[1:])
