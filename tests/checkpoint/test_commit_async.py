"""CheckpointDirectory.commit_async: commit's file and guarantees, written on a background thread."""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from engine_kit.checkpoint import CheckpointDirectory, PendingCommit, verify_checkpoint_file
from engine_kit.checkpoint import directory as directory_module
from engine_kit.checkpoint import streaming as streaming_module
from engine_kit.checkpoint.background import WRITER_THREAD_NAME
from engine_kit.errors import CheckpointWriteError
from tests.checkpoint.conftest import make_payload, payload_matches


def _model_payload() -> dict:
    """A state with what a snapshot must keep: tied weights, a view, a state dict's metadata, plain values."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = embedding.weight
    model = torch.nn.ModuleDict({"embedding": embedding, "head": head, "norm": torch.nn.BatchNorm1d(3)})
    return {"model": model.state_dict(), "view": torch.arange(10.0)[2:7:2], "step": 3, "nested": [1, ("a", 2.5)]}


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Writes block inside the file write until the event is set; the most writes ever at once is recorded."""
    opened = threading.Event()
    real_write = streaming_module.write_sealed
    active: list[int] = []
    opened.most_at_once = 0  # type: ignore[attr-defined]

    def gated_write(*args: object) -> object:
        active.append(1)
        opened.most_at_once = max(opened.most_at_once, len(active))  # type: ignore[attr-defined]
        try:
            assert opened.wait(10), "the test never opened the gate"
            return real_write(*args)
        finally:
            active.pop()

    monkeypatch.setattr(streaming_module, "write_sealed", gated_write)
    yield opened
    opened.set()


def _fail_writes(monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    """Let ``after`` file writes succeed, then fail every one with ENOSPC, as a full disk would."""
    real_write = streaming_module.write_sealed
    calls: list[int] = []

    def full_disk(*args: object) -> object:
        calls.append(1)
        if len(calls) > after:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(*args)

    monkeypatch.setattr(streaming_module, "write_sealed", full_disk)


def test_commit_async_writes_the_file_commit_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(directory_module.time, "time", lambda: 1.0e9)  # the record's creation time: the only other difference
    payload = _model_payload()
    with CheckpointDirectory(tmp_path / "sync", run_id="run") as sync, CheckpointDirectory(tmp_path / "async", run_id="run") as background:
        expected = sync.commit("step-3.ekpt", payload, step=3, epoch=1, tags=("last",), metric=0.5)
        pending = background.commit_async("step-3.ekpt", payload, step=3, epoch=1, tags=("last",), metric=0.5)
        assert isinstance(pending, PendingCommit) and pending.path == str(tmp_path / "async" / "step-3.ekpt")
        assert pending.result(timeout=30) == expected and pending.done()
        assert background.entries() == sync.entries()
    assert (tmp_path / "async" / "step-3.ekpt").read_bytes() == (tmp_path / "sync" / "step-3.ekpt").read_bytes()
    assert verify_checkpoint_file(tmp_path / "async" / "step-3.ekpt").sha256 == expected.sha256
    assert not list((tmp_path / "async").glob(".ek-tmp-*"))


def test_the_caller_may_change_its_tensors_as_soon_as_commit_async_returns(tmp_path: Path, gate: threading.Event) -> None:
    payload = make_payload(1, numel=256)
    with CheckpointDirectory(tmp_path) as ckpts:
        first = ckpts.commit_async("step-1.ekpt", payload, step=1, epoch=0)
        payload["weights"].fill_(99.0)  # training goes on while the file is still being written
        payload["index"].add_(1000)
        assert not first.done()
        gate.set()
        first.result()
        second = ckpts.commit_async("step-2.ekpt", make_payload(2, numel=256), step=2, epoch=0)
        second.result()
        assert ckpts._commits._snapshots.allocations == 2  # one buffer a storage, reused by the second commit
        assert payload_matches(ckpts.load("step-1.ekpt"), 1) and payload_matches(ckpts.load("step-2.ekpt"), 2)


def test_one_commit_in_flight_the_next_call_waits_and_is_counted(
    tmp_path: Path, gate: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        first = ckpts.commit_async("step-1.ekpt", make_payload(1, numel=64), step=1, epoch=0)
        threading.Timer(0.3, gate.set).start()
        started = time.perf_counter()
        with caplog.at_level(logging.WARNING, logger="engine_kit.checkpoint"):
            second = ckpts.commit_async("step-2.ekpt", make_payload(2, numel=64), step=2, epoch=0)
        assert time.perf_counter() - started >= 0.2 and first.done()  # it waited for the first write
        assert ckpts.waits == 1 and "still being written" in caplog.text and "step-1.ekpt" in caplog.text
        assert [entry.name for entry in ckpts.entries()] == ["step-1.ekpt", "step-2.ekpt"]  # a listing waits for the writer
        assert second.done() and gate.most_at_once == 1  # type: ignore[attr-defined]
        ckpts.flush()
    assert ckpts.waits == 1


def test_a_listing_waits_for_the_commit_in_flight(tmp_path: Path, gate: threading.Event) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        pending = ckpts.commit_async(ckpts.next_name(1), make_payload(1, numel=64), step=1, epoch=0)
        threading.Timer(0.2, gate.set).start()
        assert [entry.step for entry in ckpts.entries()] == [1] and pending.done()
        assert ckpts.next_name(2) == "step00000002-00002.ekpt"  # the order after the committed one's


def _collect_by(how: str, ckpts: CheckpointDirectory, pending: PendingCommit) -> Callable[[], object]:
    return {
        "result": pending.result,
        "flush": ckpts.flush,
        "next call": lambda: ckpts.commit_async("step-3.ekpt", make_payload(3, numel=64), step=3, epoch=0),
        "close": ckpts.close,
    }[how]


@pytest.mark.parametrize("how", ["result", "flush", "next call", "close"])
def test_a_full_disk_surfaces_with_the_path_and_older_files_still_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    _fail_writes(monkeypatch, after=1)
    ckpts = CheckpointDirectory(tmp_path)
    ckpts.commit_async("step-1.ekpt", make_payload(1, numel=64), step=1, epoch=0).result()
    before = (tmp_path / "step-1.ekpt").read_bytes()
    pending = ckpts.commit_async("step-2.ekpt", make_payload(2, numel=64), step=2, epoch=0)
    while not pending.done():
        time.sleep(0.01)
    with pytest.raises(CheckpointWriteError, match=r"step-2\.ekpt.*No space left on device.*To fix:") as caught:
        _collect_by(how, ckpts, pending)()
    cause = caught.value.__cause__
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
    assert cause is not None and cause.errno == errno.ENOSPC  # the writer's own error, chained
    ckpts.flush()  # collected once: not raised again
    with pytest.raises(CheckpointWriteError, match="No space left"):
        pending.result()  # the pending commit keeps saying what happened to it
    ckpts.close()
    assert (tmp_path / "step-1.ekpt").read_bytes() == before and verify_checkpoint_file(tmp_path / "step-1.ekpt")
    assert not (tmp_path / "step-2.ekpt").exists() and not list(tmp_path.glob(".ek-tmp-*"))
    reopened = CheckpointDirectory(tmp_path, read_only=True)  # the lock was released, even by a failing close()
    assert [entry.name for entry in reopened.entries()] == ["step-1.ekpt"]


def test_close_waits_for_the_commit_in_flight(tmp_path: Path, gate: threading.Event) -> None:
    ckpts = CheckpointDirectory(tmp_path)
    pending = ckpts.commit_async("step-1.ekpt", make_payload(1, numel=64), step=1, epoch=0)
    threading.Timer(0.2, gate.set).start()
    ckpts.close()
    assert pending.done() and verify_checkpoint_file(tmp_path / "step-1.ekpt")
    with CheckpointDirectory(tmp_path) as again:  # the lock is free
        assert [entry.name for entry in again.entries()] == ["step-1.ekpt"]


def test_a_failure_while_the_block_is_failing_is_a_note_on_its_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_writes(monkeypatch, after=0)
    with pytest.raises(KeyError) as caught:
        with CheckpointDirectory(tmp_path) as ckpts:
            ckpts.commit_async("step-1.ekpt", make_payload(1, numel=64), step=1, epoch=0)
            raise KeyError("the loop's own error")
    assert "CheckpointWriteError" in " ".join(caught.value.__notes__) and "step-1.ekpt" in " ".join(caught.value.__notes__)


def test_rotate_out_deletes_the_older_file_once_the_new_one_is_durable(tmp_path: Path) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        for step in (1, 2, 3):
            older = [entry.name for entry in ckpts.entries()][:-1]  # keep the newest two
            ckpts.commit_async(f"step-{step}.ekpt", make_payload(step, numel=64), step=step, epoch=0, rotate_out=older, tags=("last",))
        ckpts.flush()
        assert [entry.name for entry in ckpts.entries()] == ["step-2.ekpt", "step-3.ekpt"]
    assert sorted(path.name for path in tmp_path.glob("*.ekpt")) == ["step-2.ekpt", "step-3.ekpt"]


def test_bad_arguments_are_refused_on_the_calling_thread_before_anything_is_written(tmp_path: Path) -> None:
    writers_before = {t for t in threading.enumerate() if t.name == WRITER_THREAD_NAME}  # idle ones of earlier tests
    with CheckpointDirectory(tmp_path) as ckpts:
        with pytest.raises(ValueError, match="step"):
            ckpts.commit_async("step-1.ekpt", make_payload(1, numel=8), step=-1, epoch=0)
        with pytest.raises(TypeError, match="lacks \\['epoch'\\]"):
            ckpts.commit_async("step-1.ekpt", make_payload(1, numel=8), step=1)
        with pytest.raises(TypeError, match="unknown"):
            ckpts.commit_async("step-1.ekpt", make_payload(1, numel=8), step=1, epoch=0, on_serialized=print)
        with pytest.raises(ValueError):
            ckpts.commit_async("../escape.ekpt", make_payload(1, numel=8), step=1, epoch=0)
        assert ckpts.entries() == [] and not {t for t in threading.enumerate() if t.name == WRITER_THREAD_NAME} - writers_before
    with pytest.raises(CheckpointWriteError, match="closed"):
        ckpts.commit_async("step-1.ekpt", make_payload(1, numel=8), step=1, epoch=0)
    with pytest.raises(CheckpointWriteError, match="read_only"):
        CheckpointDirectory(tmp_path, read_only=True).commit_async("step-1.ekpt", make_payload(1, numel=8), step=1, epoch=0)


def test_an_existing_name_is_never_clobbered(tmp_path: Path) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        ckpts.commit("step-1.ekpt", make_payload(1, numel=8), step=1, epoch=0)
        before = (tmp_path / "step-1.ekpt").read_bytes()
        pending = ckpts.commit_async("step-1.ekpt", make_payload(2, numel=8), step=2, epoch=0)
        with pytest.raises(CheckpointWriteError, match="already committed") as caught:
            pending.result()
        assert type(caught.value.__cause__).__name__ == "CheckpointExistsError"
    assert (tmp_path / "step-1.ekpt").read_bytes() == before
