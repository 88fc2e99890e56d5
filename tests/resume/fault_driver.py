"""A driver process that forks training runs with injected writer faults, for the async-save tests.

``python -m tests.resume.fault_driver [SEED]`` imports torch once and forks one
child per request: one JSON request per stdin line, one JSON reply per stdout
line (see :func:`run_request`); a child costs a fraction of a second instead of
a fresh interpreter's seconds. Each child runs ``tests/resume/train_script.py``'s
``train`` with the faults of :mod:`tests.resume.writer_faults`, and the driver
can SIGKILL it at a stall or at a random moment. Tests share one driver per
session (:func:`shared_driver`).
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ignite.engine import Events

from engine_kit.checkpoint import TEMP_PREFIX
from engine_kit.errors import HandlerError
from handlers.preemption import PREEMPTED_EXIT_STATUS
from tests.resume.train_script import exit_child, train
from tests.resume.writer_faults import break_after_save, install_fault, pace_background_writes

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


def temp_names(directory: str | Path) -> list[str]:
    """The sorted names of the checkpoint temp files in ``directory``."""
    return sorted(n for n in os.listdir(directory) if n.startswith(TEMP_PREFIX))


def _temps(directory: str) -> list[str]:
    try:
        return temp_names(directory)
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
        exit_child(lambda: _child(request, beacon_w))
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
        process = subprocess.Popen([sys.executable, "-m", "tests.resume.fault_driver", str(seed)], cwd=root, env=env,
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


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
