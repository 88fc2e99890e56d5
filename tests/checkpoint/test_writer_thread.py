"""The background writer thread: one long-lived daemon thread per BackgroundSaves, started on demand."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from engine_kit.checkpoint import CheckpointDirectory
from engine_kit.checkpoint import background as background_module
from engine_kit.checkpoint.background import WRITER_NICENESS, WRITER_THREAD_NAME, BackgroundSaves
from engine_kit.errors import CheckpointWriteError
from tests.checkpoint.conftest import make_payload, run_python


def _writer_of(saves: BackgroundSaves) -> threading.Thread:
    """Hand ``saves`` one write, collect it, and return the thread that ran it."""
    ran_on: list[threading.Thread] = []
    saves.submit(lambda serialized: ran_on.append(threading.current_thread()), lambda: None, path="a.ekpt")
    saves.settle()
    return ran_on[0]


def test_one_writer_thread_serves_every_save() -> None:
    saves = BackgroundSaves()
    writers = {_writer_of(saves) for _ in range(5)}
    assert len(writers) == 1
    (writer,) = writers
    assert writer is not threading.current_thread() and writer.name == WRITER_THREAD_NAME and writer.daemon
    assert writer.is_alive()  # waiting for the next save
    saves.stop_writer()
    writer.join(10)
    assert not writer.is_alive()


def test_saves_of_two_instances_run_on_their_own_writers() -> None:
    first, second = BackgroundSaves(), BackgroundSaves()
    assert _writer_of(first) is not _writer_of(second)
    first.stop_writer()
    second.stop_writer()


def test_an_idle_writer_exits_and_the_next_save_starts_a_new_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(background_module, "IDLE_EXIT_S", 0.05)
    saves = BackgroundSaves()
    writer = _writer_of(saves)
    writer.join(10)  # exits on its own after IDLE_EXIT_S without work
    assert not writer.is_alive()
    again = _writer_of(saves)
    assert again is not writer and again.name == WRITER_THREAD_NAME
    saves.stop_writer()


def test_stop_writer_lets_the_save_in_flight_finish_and_its_outcome_arrive() -> None:
    saves = BackgroundSaves()
    gate, announced = threading.Event(), []
    saves.submit(lambda serialized: gate.wait(10) and "written", lambda: announced.append("durable"), path="a.ekpt")
    writer = saves.job.thread
    saves.stop_writer()  # while the write is blocked
    assert writer.is_alive() and saves.writing
    gate.set()
    writer.join(10)
    assert not writer.is_alive() and saves.job.result == "written"
    saves.settle()
    assert announced == ["durable"]
    assert _writer_of(saves) is not writer  # a later save starts a new writer


def test_a_failed_write_does_not_end_the_writer_and_is_reported_once() -> None:
    saves = BackgroundSaves()

    def fail(serialized: object) -> None:
        raise SystemExit(3)  # not even this ends the writer thread: it is the write's outcome

    saves.submit(fail, lambda: None, path="broken.ekpt")
    writer = saves.job.thread
    with pytest.raises(CheckpointWriteError, match="broken.ekpt") as caught:
        saves.settle()
    assert isinstance(caught.value.__cause__, SystemExit)
    assert _writer_of(saves) is writer
    saves.stop_writer()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_the_writer_runs_at_a_lower_priority_than_training() -> None:
    saves = BackgroundSaves()
    seen: list[int] = []
    saves.submit(lambda serialized: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())), lambda: None, path="a.ekpt")
    saves.settle()
    training = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen == [min(19, training + WRITER_NICENESS)]
    saves.stop_writer()


def test_closing_a_directory_lets_its_writer_exit(tmp_path: Path) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        pending = [ckpts.commit_async(ckpts.next_name(step), make_payload(step, numel=8), step=step, epoch=0) for step in (1, 2, 3)]
        assert [commit.result().step for commit in pending] == [1, 2, 3]
        writers = {commit._job.thread for commit in pending}
        assert len(writers) == 1
    (writer,) = writers
    writer.join(background_module.IDLE_EXIT_S / 2)  # close() told it to exit: no idle wait
    assert not writer.is_alive()
    assert [e.step for e in CheckpointDirectory(tmp_path, read_only=True).entries()] == [1, 2, 3]


_IDLE_WRITER_AT_EXIT = """
import sys
from engine_kit.checkpoint import background
background.IDLE_EXIT_S = 3600.0  # the writer would wait an hour for the next save
saves = background.BackgroundSaves()
saves.submit(lambda serialized: "written", lambda: print("durable"), path=sys.argv[0])
saves.settle()
"""


def test_an_idle_writer_does_not_hold_up_the_process_exit() -> None:
    result = run_python(_IDLE_WRITER_AT_EXIT, timeout=120)  # a non-daemon writer would block the exit for an hour
    assert result.returncode == 0, result.stderr
    assert result.stdout == "durable\n" and "engine_kit" not in result.stderr  # nothing left to report at exit
