"""Crash consistency: processes killed mid-save leave only whole, registered files.

Children run in subprocesses (``python -c``); the SIGKILL loop uses one driver
process that imports torch once and forks a fresh writer per kill, so 20+
kills fit in a few seconds on 2 cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine_kit.checkpoint import (
    LOCK_NAME,
    TEMP_PREFIX,
    CheckpointDirectory,
    read_registry,
    verify_checkpoint_file,
)
from tests.checkpoint.conftest import child_env, make_payload, payload_matches


def _name(step: int) -> str:
    return f"step-{step:06d}.ekpt"


def _assert_sound(directory: Path) -> list[int]:
    """Every final-named file is whole; every registered file matches its sha.

    Returns:
        The registered steps, oldest first.
    """
    for path in directory.glob("*.ekpt"):
        verify_checkpoint_file(path)  # raises on a partial or altered file
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the registry itself must be clean
        entries = read_registry(directory).entries
    for entry in entries:
        assert verify_checkpoint_file(directory / entry.name).sha256 == entry.sha256
    return [entry.step for entry in entries]


def _reopen(directory: Path) -> list[str]:
    """Open for writing as a resumed run would; return the warnings it gave."""
    had_lock = (directory / LOCK_NAME).exists()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ckpts = CheckpointDirectory(directory)
    messages = [str(w.message) for w in record]
    with ckpts:
        assert not [n for n in os.listdir(directory) if n.startswith(TEMP_PREFIX)]
        if had_lock:
            assert any("taking over the stale lock" in m for m in messages), messages
    assert not (directory / LOCK_NAME).exists()
    return messages


# --- case 2 and 4: os._exit at each step of commit + keep-last-1 rotation -------

_INJECT_DRIVER = r"""
import os, sys, traceback, warnings
import torch
torch.set_num_threads(1)
from engine_kit.checkpoint import CheckpointDirectory
from tests.checkpoint.conftest import make_payload

def run(directory, point):
    warnings.simplefilter("ignore")
    ckpts = CheckpointDirectory(directory)
    real_fsync, real_link, real_replace, real_unlink = os.fsync, os.link, os.replace, os.unlink
    replaces = 0

    def fsync(fd):
        if point == "after_temp_write":
            os._exit(17)
        real_fsync(fd)

    def link(src, dst):  # a checkpoint lands under its final name by a no-clobber link
        if point == "after_fsync":
            os._exit(17)
        real_link(src, dst)
        if point == "after_replace":
            os._exit(17)

    def replace(src, dst):  # the index is replaced whole
        nonlocal replaces
        replaces += 1
        real_replace(src, dst)
        if (point, replaces) == ("after_registry_update", 1):
            os._exit(17)

    def unlink(path):
        if point == "before_old_file_deletion" and not os.path.basename(path).startswith(".ek-tmp-"):
            os._exit(17)
        real_unlink(path)

    os.fsync, os.link, os.replace, os.unlink = fsync, link, replace, unlink
    ckpts.commit("step-000002.ekpt", make_payload(2), step=2, epoch=0, tags=("last",))
    ckpts.remove(["step-000001.ekpt"])  # keep-last = 1

print("ready", flush=True)
for line in sys.stdin:
    directory, point = line.rstrip("\n").split("\t")
    pid = os.fork()
    if pid == 0:
        try:
            run(directory, point)
        except BaseException:
            traceback.print_exc()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)
"""


@pytest.fixture(scope="module")
def injector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[Path, str], int]]:
    """A driver process (torch imported once) that forks one injected child per call."""
    stderr = (tmp_path_factory.mktemp("injector") / "driver.err").open("w")
    driver = subprocess.Popen(
        [sys.executable, "-c", _INJECT_DRIVER], env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True
    )
    assert driver.stdout.readline().strip() == "ready"

    def run(folder: Path, point: str) -> int:
        driver.stdin.write(f"{folder}\t{point}\n")
        driver.stdin.flush()
        return int(driver.stdout.readline().split()[1])

    yield run
    driver.stdin.close()
    driver.wait(timeout=30)
    stderr.close()


# Steps in registry.json after the kill: all-old before the index update, all-new after.
_EXPECTED = {
    "after_temp_write": [1],
    "after_fsync": [1],
    "after_replace": [1],
    "after_registry_update": [1, 2],
    "before_old_file_deletion": [2],
}
# Steps a reader sees: a whole file under its final name is adopted even before its index update.
_INDEXED = {**_EXPECTED, "after_replace": [1, 2]}


def _kill_at(tmp_path: Path, injector: Callable[[Path, str], int], point: str) -> Path:
    folder = tmp_path / "ckpts"
    with CheckpointDirectory(folder) as ckpts:
        ckpts.commit(_name(1), make_payload(1), step=1, epoch=0, tags=("last",))
    old_bytes = (folder / _name(1)).read_bytes()
    assert injector(folder, point) == 17, "the injected exit never fired"
    steps = _assert_sound(folder)
    assert steps == _EXPECTED[point]
    if 1 in steps:
        assert (folder / _name(1)).read_bytes() == old_bytes
    return folder


@pytest.mark.parametrize("point", list(_EXPECTED))
def test_case2_exit_at_each_step_leaves_all_old_or_all_new(tmp_path: Path, injector: Callable[[Path, str], int], point: str) -> None:
    folder = _kill_at(tmp_path, injector, point)
    reader = CheckpointDirectory(folder, read_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the adoption warning, checked below
        newest, payload = reader.load_newest_valid()
    assert newest.step == max(_INDEXED[point]) and payload_matches(payload, newest.step)
    messages = _reopen(folder)
    if point == "after_replace":  # whole but not yet indexed: adopted, with one warning
        assert any("adopted verified files it did not list ['step-000002.ekpt']" in m for m in messages), messages
    else:
        assert not any("rebuilt the checkpoint index" in m for m in messages), messages
    assert [e.step for e in CheckpointDirectory(folder, read_only=True).entries()] == _INDEXED[point]
    if point == "before_old_file_deletion":  # the interrupted rotation is finished
        assert not (folder / _name(1)).exists()
    # The resumed run goes on from the newest checkpoint and saves the next step.
    ckpts = CheckpointDirectory(folder)
    with ckpts:
        step = ckpts.newest_valid().step + 1
        ckpts.commit(_name(step), make_payload(step), step=step, epoch=0)
        assert payload_matches(ckpts.load(_name(step)), step)


@pytest.mark.parametrize("point", ["after_registry_update", "before_old_file_deletion"])
def test_case4_keep_last_one_killed_between_commit_and_deletion(
    tmp_path: Path, injector: Callable[[Path, str], int], point: str
) -> None:
    folder = _kill_at(tmp_path, injector, point)
    assert CheckpointDirectory(folder, read_only=True).newest_valid() is not None


def test_case4_keep_last_one_has_a_valid_checkpoint_at_every_syscall(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process: check the on-disk state before and after every fsync/replace/unlink."""
    folder = tmp_path / "ckpts"
    ckpts = CheckpointDirectory(folder)
    ckpts.commit(_name(1), make_payload(1, numel=64), step=1, epoch=0)
    real = {name: getattr(os, name) for name in ("fsync", "replace", "unlink")}
    observed: list[list[int]] = []

    def checked(name: str) -> Callable[..., object]:
        def call(*args: object) -> object:
            observed.append(_assert_sound(folder))
            result = real[name](*args)
            observed.append(_assert_sound(folder))
            return result

        return call

    for name in real:
        monkeypatch.setattr(os, name, checked(name))
    for step in range(2, 5):
        ckpts.commit(_name(step), make_payload(step, numel=64), step=step, epoch=0)
        ckpts.remove([e.name for e in ckpts.entries() if e.step < step])
    monkeypatch.undo()
    ckpts.close()
    assert len(observed) > 20 and all(len(steps) >= 1 for steps in observed)


# --- case 1: SIGKILL at random moments ---------------------------------------------

_DRIVER = r"""
import os, random, signal, sys, time, traceback, warnings
import torch
torch.set_num_threads(1)
from engine_kit.checkpoint import CheckpointDirectory
from tests.checkpoint.conftest import make_payload
directory, rng = sys.argv[1], random.Random(int(sys.argv[2]))

def writer(beacon):
    warnings.simplefilter("ignore")
    ckpts = CheckpointDirectory(directory)  # takes over the dead writer's lock
    newest = ckpts.newest_valid()
    step = newest.step + 1 if newest else 1
    os.write(beacon, b"r")
    while True:
        ckpts.commit(f"step-{step:06d}.ekpt", make_payload(step), step=step, epoch=0, tags=("last",))
        ckpts.remove([e.name for e in ckpts.entries() if e.step < step])  # keep-last = 1
        os.write(beacon, b"c")
        step += 1

# Kill times adapt to the machine's load: wait for 0-2 whole commits, then a
# random fraction of one commit's measured duration, so kills land at every
# point of the save cycle; 15% of kills hit start-up (take-over, sweep, repair).
cycle = 0.01
print("ready", flush=True)
for line in sys.stdin:
    beacon_r, beacon_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(beacon_r)
        try:
            writer(beacon_w)
        except BaseException:
            traceback.print_exc()
        os._exit(1)
    os.close(beacon_w)
    if rng.random() < 0.15:
        time.sleep(rng.uniform(0.0, 0.03))
    elif os.read(beacon_r, 1):
        for _ in range(rng.choice([0, 1, 1, 2])):
            start = time.monotonic()
            if not os.read(beacon_r, 1):
                break
            cycle = 0.7 * cycle + 0.3 * (time.monotonic() - start)
        time.sleep(rng.uniform(0.0, 1.2 * cycle))
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(beacon_r)
    print(f"status {status}", flush=True)
"""


def _sigkill_loop(tmp_path: Path, kills: int, seed: int) -> None:
    folder = tmp_path / "ckpts"
    folder.mkdir()
    stderr = (tmp_path / "driver.err").open("w")
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(folder), str(seed)],
        env=child_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    newest = 0
    try:
        assert driver.stdout.readline().strip() == "ready"
        for kill in range(kills):
            driver.stdin.write("kill\n")
            driver.stdin.flush()
            status = int(driver.stdout.readline().split()[1])
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            assert killed, f"writer died on its own at kill {kill}: {(tmp_path / 'driver.err').read_text()}"
            _assert_sound(folder)
            reader = CheckpointDirectory(folder, read_only=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a commit cut before its index update is adopted
                steps = [entry.step for entry in reader.entries()]
                found = reader.load_newest_valid()
            if newest:
                # keep-last = 1 never leaves zero, and committed progress never goes back.
                assert steps and steps[-1] >= newest, (kill, steps, newest)
            if steps:
                newest = steps[-1]
                entry, payload = found
                assert entry.step == newest and payload_matches(payload, newest)
            if kill % 2 == 0:
                _reopen(folder)  # odd kills leave the stale lock and temps to the next writer
                # Interrupted rotations are finished: at most the one file of a
                # commit cut before its registry update is left unregistered.
                unregistered = {p.name for p in folder.glob("*.ekpt")} - {_name(step) for step in _assert_sound(folder)}
                assert len(unregistered) <= 1, unregistered
    finally:
        driver.stdin.close()
        driver.wait(timeout=30)
        stderr.close()
    assert newest >= kills // 3, f"only {newest} commits in {kills} kills: the kills never let a save finish"


@pytest.mark.timeout(120)
def test_case1_sigkill_during_saves(tmp_path: Path) -> None:
    _sigkill_loop(tmp_path, kills=24, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_case1_sigkill_during_saves_200_kills(tmp_path: Path) -> None:
    _sigkill_loop(tmp_path, kills=200, seed=2)
