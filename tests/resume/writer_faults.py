"""Faults injected into the checkpoint writer of a training run in a child process, and a driver that forks such runs.

Used by the async-save crash, failure and preemption tests. Everything here is
test code: it monkeypatches the child process it runs in, never the library.

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

The driver (``python -m tests.resume.writer_faults``) imports torch once and
forks one child per request: one JSON request per stdin line, one JSON reply
per stdout line (see :func:`serve`). ``python -m tests.resume.writer_faults lab
[--fault AT:ACTION:NTH:SECONDS] -- <lab arguments>`` runs the lab with async
saves and that fault (see :func:`lab_main`).
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ignite.engine import Events

from engine_kit import StepEvents
from engine_kit.checkpoint import TEMP_PREFIX, CheckpointDirectory, streaming
from engine_kit.errors import HandlerError
from handlers.preemption import PREEMPTED_EXIT_STATUS
from tests.resume.train_script import CRASH_STATUS, train

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


def _child(request: dict[str, Any], beacon: int) -> int:
    """One training run in a forked child; its exit status."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal, whatever the driver inherited
    fault = request.get("fault")
    if fault:
        install_fault(fault["at"], fault["action"], fault["nth"], beacon, fault.get("seconds", 600.0))
    hooks, saved, trainers = [lambda t: trainers.append(t)], [], []
    if request.get("random_kill"):  # the driver times its kill by these
        hooks.append(lambda t: t.add_event_handler(Events.ITERATION_COMPLETED, lambda: os.write(beacon, b"i")))
    if request.get("pace_writes"):
        hooks.append(pace_background_writes())
    if request.get("break_after_save"):
        import subprocess

        step, command = request["break_after_save"]["step"], request["break_after_save"]["command"]
        hooks.append(break_after_save(step, lambda: subprocess.run(command, check=True, capture_output=True), saved))
    try:
        result = train(request["dir"], resume="auto" if request.get("resume") else None, hooks=hooks, **request.get("config", {}))
    except HandlerError as error:  # what the run raised, for the test to judge
        with open(request["out"], "w") as f:
            json.dump({"error": type(error.__cause__).__name__, "message": str(error.__cause__),
                       "iteration": trainers[0].state.iteration, "saved": saved}, f)
        return 1
    if result is None:
        return PREEMPTED_EXIT_STATUS
    if request.get("out"):
        with open(request["out"], "w") as f:
            json.dump(result, f)
    return 0


def _read_beacon(fd: int, timeout: float) -> bytes:
    ready, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, 1) if ready else b""


def _temps(directory: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(directory) if n.startswith(TEMP_PREFIX))
    except FileNotFoundError:
        return []


def run_request(request: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Fork a child for ``request``; kill it when asked; return its exit status and what the driver saw.

    Request keys: ``dir``, ``out`` (result JSON), ``config`` (keywords of
    ``train``), ``resume``, ``fault`` (keywords of :func:`install_fault`),
    ``pace_writes`` (:func:`pace_background_writes`), ``break_after_save``
    (``{"step", "command"}``: :func:`break_after_save`; a run that fails then
    writes ``{"error", "message", "iteration", "saved"}`` to ``out`` and exits 1),
    ``kill_on_beacon`` (SIGKILL the child once its stall began), ``random_kill``
    (``[n, spread]``: SIGKILL after ``n`` iterations plus a random part of
    ``spread`` iterations' time; with ``n = 0``, during its start-up), ``timeout``.
    Reply: ``status`` (exit code, negative for a signal), ``temps`` (temp files
    in ``dir`` at the kill), ``stalled`` (whether the stall began).
    """
    beacon_r, beacon_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(beacon_r)
        os.dup2(2, 1)  # the driver's stdout carries the replies: the run prints to stderr
        status = 1
        try:
            status = _child(request, beacon_w)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    os.close(beacon_w)
    reply: dict[str, Any] = {"temps": [], "stalled": False}
    timeout = request.get("timeout", 120.0)
    if request.get("kill_on_beacon"):
        reply["stalled"] = _read_beacon(beacon_r, timeout) == b"s"
        if reply["stalled"]:
            reply["temps"] = _temps(request["dir"])
            os.kill(pid, signal.SIGKILL)
    elif request.get("random_kill"):
        iterations, spread = request["random_kill"]
        seen, first = 0, None
        while seen < iterations and _read_beacon(beacon_r, timeout):
            seen += 1
            first = first or time.monotonic()
        # The iteration time as measured between beacons; before two of them, a guess.
        per_iteration = (time.monotonic() - first) / (seen - 1) if seen >= 2 else 0.05
        time.sleep(rng.uniform(0.0, spread * per_iteration))
        reply["temps"] = _temps(request["dir"])
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(beacon_r)
    reply["status"] = os.waitstatus_to_exitcode(status)
    return reply


def serve(seed: int = 0) -> None:
    """Answer one JSON request per stdin line with one JSON reply per stdout line (``ready`` first)."""
    import torch

    torch.set_num_threads(1)  # every child alike, two of them may run side by side
    rng = random.Random(seed)
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(run_request(json.loads(line), rng)), flush=True)


@contextmanager
def driver(folder: Path, seed: int = 0) -> Iterator[Callable[..., dict[str, Any]]]:
    """Start a driver process; yield ``ask(**request) -> reply`` (see :func:`run_request`).

    Its stderr (and the runs' output) goes to ``folder/driver.err``, quoted
    in the error when a reply does not come.
    """
    import subprocess

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    log = folder / "driver.err"
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "tests.resume.writer_faults", str(seed)], cwd=root, env=env,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the fault driver did not start: {log.read_text()[-3000:]}")

            def ask(**request: Any) -> dict[str, Any]:
                process.stdin.write(json.dumps(request) + "\n")
                process.stdin.flush()
                line = process.stdout.readline()
                if not line:
                    raise RuntimeError(f"the fault driver died: {log.read_text()[-3000:]}")
                return json.loads(line)

            yield ask
        finally:
            process.stdin.close()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


_SHARED: dict[str, Any] = {}


def shared_driver() -> Callable[..., dict[str, Any]]:
    """One :func:`driver` for the whole test session: started on first use, stopped when this interpreter exits.

    Its log folder is a temp directory of its own, removed then too.
    """
    if "ask" not in _SHARED:
        import atexit
        import shutil
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="engine_kit-writer-faults-"))
        running = driver(folder)
        _SHARED["ask"] = running.__enter__()

        def stop() -> None:
            try:
                running.__exit__(None, None, None)
            finally:
                shutil.rmtree(folder, ignore_errors=True)

        atexit.register(stop)
    return _SHARED["ask"]


def shared_reference(epochs: int) -> dict[str, Any]:
    """The result of an uninterrupted run with synchronous saves (``train`` defaults otherwise), run once per session."""
    key = f"reference-{epochs}"
    if key not in _SHARED:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="engine_kit-reference-") as folder:
            out = os.path.join(folder, "out.json")
            reply = shared_driver()(dir=os.path.join(folder, "ckpt"), out=out, config={"async_save": False, "epochs": epochs})
            if reply["status"] != 0:
                raise RuntimeError(f"the reference run failed: {reply}")
            with open(out) as f:
                _SHARED[key] = json.load(f)
    return _SHARED[key]


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
    if sys.argv[1:2] == ["lab"]:
        lab_main(sys.argv[2:])
    else:
        serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
