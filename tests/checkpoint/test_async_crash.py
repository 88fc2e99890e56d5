"""Crash consistency with asynchronous saves: processes killed while the background writer works.

The crash cases of the storage tests (a kill at each point of a commit, a kill
between commit and deletion with keep-last = 1, SIGKILL at random moments)
run there against ``CheckpointDirectory`` alone. Here the same kills hit a
training run whose ``CheckpointRotation(async_save=True)`` writes on its
background thread, plus a kill while that write is in flight. After every
kill: each file under a checkpoint name verifies, the newest valid checkpoint
is the one the kill point allows, and a rerun with ``resume="auto"`` sweeps
the temp files and ends bitwise equal to an uninterrupted run.

Runs are children forked by one driver process (``tests.resume.fault_driver``).
The training run is ``tests/resume/train_script.py``'s, two epochs of 12
optimizer steps, a save every 2 (every 1 in the kill loops); none of that
changes the training, so one uninterrupted run is the reference for all.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine_kit.checkpoint import LOCK_NAME, REGISTRY_NAME, CheckpointDirectory, verify_checkpoint_file
from tests.resume.train_script import COMPARED, train
from tests.resume.fault_driver import shared_driver, shared_reference, temp_names as temps
from tests.resume.writer_faults import WRITER_THREAD

Ask = Callable[..., dict[str, Any]]
EPOCHS = 2


@pytest.fixture(scope="module")
def ask() -> Ask:
    return shared_driver()


@pytest.fixture(scope="module")
def reference() -> dict:
    return shared_reference(EPOCHS)


def sound_steps(folder: Path) -> list[int]:
    """Check that every file under a checkpoint name is whole; return the steps of the valid checkpoints."""
    for path in folder.glob("*.ekpt"):
        verify_checkpoint_file(path)  # a partial file under a final name fails here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a file committed just before its index update is adopted, with a warning
        return [entry.step for entry in CheckpointDirectory(folder, read_only=True).entries()]


def newest_step(folder: Path) -> int | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = CheckpointDirectory(folder, read_only=True).load_newest_valid()
    if found is None:
        return None
    entry, payload = found
    assert payload["trainer"]["iteration"] == entry.step  # accumulation 1: one optimizer step per iteration
    return entry.step


def rerun_and_compare(ask: Ask, folder: Path, reference: dict, **config: Any) -> dict:
    """Resume to the end with async saves; the temp files are gone and the result is the reference's."""
    out = folder.parent / f"{folder.name}.json"
    reply = ask(dir=str(folder), out=str(out), resume=True, config={"async_save": True, "epochs": EPOCHS, **config})
    assert reply["status"] == 0, reply
    result = json.loads(out.read_text())
    assert temps(folder) == [], "the rerun left a temp file"
    sound_steps(folder)
    for key in COMPARED:
        assert result[key] == reference[key], f"{key} differs from the uninterrupted run"
    return result


# -- a kill while the background write is in flight ----------------------------------------------------
@pytest.mark.parametrize("point", ["mid-write", pytest.param("temp-fsync", marks=pytest.mark.slow)])
def test_a_kill_during_a_background_write_keeps_the_previous_checkpoint_newest(
    ask: Ask, reference: dict, tmp_path: Path, point: str
) -> None:
    folder = tmp_path / "ckpt"
    # The writer stalls inside the third save (step 6): with bytes in the temp file, or with all of them
    # before its fsync; the training thread goes on meanwhile. The driver SIGKILLs the process then.
    stall = {"at": point, "action": "stall", "nth": 3}
    reply = ask(dir=str(folder), config={"async_save": True, "epochs": EPOCHS}, fault=stall, kill_on_beacon=True)
    assert reply["stalled"] and reply["status"] == -signal.SIGKILL, reply
    assert len(reply["temps"]) == 1, f"no temp file while the write was in flight: {reply}"
    assert temps(folder) == reply["temps"]  # a kill leaves it: only the rerun may sweep it
    if point == "mid-write":
        assert (folder / reply["temps"][0]).stat().st_size > 0
    assert sound_steps(folder) == [2, 4] and newest_step(folder) == 4
    (folder / "tmp1a2b3c").write_text("a user's file")  # the rerun's sweep removes engine_kit's temp files only
    result = rerun_and_compare(ask, folder, reference)
    assert (folder / "tmp1a2b3c").read_text() == "a user's file"
    assert Path(result["resumed_from"]).name.startswith("step00000004")


# -- through the handler: an exit at each point of a background commit (keep-last 1) --------------------------
# keep-last = 1; the third save (step 6) is cut. Newest valid after the exit: all-old (4) until the
# file has its final name, all-new (6) from then on (a whole file not yet indexed is adopted).
EXIT_POINTS = {"temp-fsync": 4, "link": 4, "after-link": 6, "index-replace": 6, "unlink": 6}
IN_THE_DEFAULT_SUITE = ("link", "unlink")  # all-old; keep-last 1 cut between commit and deletion (the rest: slow)


@pytest.mark.parametrize("point", [p if p in IN_THE_DEFAULT_SUITE else pytest.param(p, marks=pytest.mark.slow) for p in EXIT_POINTS])
def test_an_exit_at_each_point_of_a_background_commit_leaves_all_old_or_all_new(
    ask: Ask, reference: dict, tmp_path: Path, point: str
) -> None:
    folder = tmp_path / "ckpt"
    config = {"async_save": True, "keep_last": 1, "epochs": EPOCHS}
    reply = ask(dir=str(folder), config=config, fault={"at": point, "action": "exit", "nth": 3})
    assert reply["status"] == 17, reply
    steps = sound_steps(folder)
    assert steps and newest_step(folder) == EXIT_POINTS[point]  # never zero valid checkpoints with keep-last = 1
    assert set(steps) <= {4, 6}
    rerun_and_compare(ask, folder, reference, keep_last=1)


# -- through the handler: SIGKILL at random moments of an async training run -----------------------------------
def kill_loop(ask: Ask, folder: Path, reference: dict, kills: int, seed: int, epochs: int = EPOCHS) -> None:
    """SIGKILL an async run (a save every step, keep-last 1 or 2) at random moments, resuming each time."""
    rng = random.Random(seed)
    newest, completed, killed = 0, False, 0
    for kill in range(kills):
        config = {"async_save": True, "every_steps": 1, "keep_last": rng.choice([1, 2]), "epochs": epochs}
        # After 0-3 iterations plus a random fraction of 2 iterations' time: start-up, resume, training, any write.
        reply = ask(dir=str(folder), config=config, resume=kill > 0, random_kill=[rng.randint(0, 3), 2.0])
        if reply["status"] == 0:  # the run ended before the kill
            completed = True
            break
        assert reply["status"] == -signal.SIGKILL, (kill, reply)
        killed += 1
        steps = sound_steps(folder)
        step = newest_step(folder)
        if newest:
            assert step is not None and step >= newest, f"kill {kill}: committed progress went back ({steps}, was {newest})"
        newest = step or 0
    assert killed >= min(kills, 4), f"only {killed} kills: the run completed first"
    if kills >= 10:  # a few kills may all land before the first write is durable; many may not
        assert newest > 0 or completed, "no save ever became durable between the kills"
    rerun_and_compare(ask, folder, reference, every_steps=1, epochs=epochs)


@pytest.mark.timeout(120)
def test_sigkill_at_random_moments_of_an_async_run(ask: Ask, reference: dict, tmp_path: Path) -> None:
    kill_loop(ask, tmp_path / "ckpt", reference, kills=4, seed=5)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_at_random_moments_of_an_async_run_many_times(ask: Ask, tmp_path: Path) -> None:
    longer = shared_reference(6)  # 72 steps: room for 30 kills
    for seed in range(2):  # each loop ends with a bitwise rerun
        kill_loop(ask, tmp_path / f"ckpt{seed}", longer, kills=30, seed=100 + seed, epochs=6)


# -- through the handler: the write path's syscall order, all of it on the writer thread ------------------------
def test_background_saves_keep_the_durable_syscall_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str, tuple[str, ...]]] = []  # (thread, call, base names: "<dir>" for a directory fd)

    def recorded(name: str) -> Callable[..., Any]:
        real = getattr(os, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if name == "fsync":
                target = os.readlink(f"/proc/self/fd/{args[0]}")
                names = ("<dir>" if os.path.isdir(target) else os.path.basename(target),)
            else:
                names = tuple(os.path.basename(os.fspath(a)) for a in args[:2])
            calls.append((threading.current_thread().name, name, names))
            return real(*args, **kwargs)

        return call

    for name in ("fsync", "link", "replace", "unlink"):
        monkeypatch.setattr(os, name, recorded(name))
    result = train(tmp_path / "ckpt", epochs=1, every_steps=4, keep_last=1, async_save=True)
    monkeypatch.undo()
    assert result["optimizer_steps"] == 12
    start = max(i for i, (_, _, names) in enumerate(calls) if names[-1:] == (LOCK_NAME,))  # the lock was taken
    saves = [names[1] for _, call, names in calls if call == "link" and names[1].endswith(".ekpt")]
    assert [int(n[4:12]) for n in saves] == [4, 8, 12]
    for thread, call, names in calls[start + 1:]:
        if names[-1] != LOCK_NAME:  # the lock is released by the training thread at the end
            assert thread.startswith(WRITER_THREAD), f"{call}{names} ran on {thread}, not on the writer"
    for number, final in enumerate(saves):
        where = {(call, names): i for i, (_, call, names) in enumerate(calls)}
        linked = next(i for i, (_, call, names) in enumerate(calls) if call == "link" and names[1] == final)
        temp = calls[linked][2][0]
        index_replaced = next(i for i in range(linked, len(calls)) if calls[i][1] == "replace" and calls[i][2][1] == REGISTRY_NAME)
        dir_synced = next(i for i in range(index_replaced, len(calls)) if calls[i][1:] == ("fsync", ("<dir>",)))
        # fsync(temp) -> its final name -> the index -> fsync(directory) -> only then the rotated-out file goes.
        assert where[("fsync", (temp,))] < linked < index_replaced < dir_synced, (final, calls)
        if number:
            assert where[("unlink", (saves[number - 1],))] > dir_synced, (final, calls)
