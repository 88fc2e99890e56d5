"""Taking over a lock left on another host, only when its writer is provably gone."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from engine_kit.checkpoint import LOCK_NAME, CheckpointDirectory, DirectoryLock
from engine_kit.errors import CheckpointWriteError
from tests.checkpoint.conftest import make_payload


def _plant(folder: Path, **fields: object) -> None:
    record = {"pid": 4242, "host": "node-that-was-requeued", "token": "theirs", "heartbeat": time.time(), **fields}
    (folder / LOCK_NAME).write_text(json.dumps(record))


def _elastic(monkeypatch: pytest.MonkeyPatch, run: str, restart: int) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", run)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restart))


def test_a_later_torchrun_restart_of_the_same_job_takes_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _plant(tmp_path, elastic_run="job-17", restart=0)
    _elastic(monkeypatch, "job-17", 1)
    with pytest.warns(UserWarning, match="taking over the stale lock.*restart 0 of torchrun job 'job-17', and this is restart 1"):
        ckpts = CheckpointDirectory(tmp_path)
    with ckpts:
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        assert (record["pid"], record["elastic_run"], record["restart"]) == (os.getpid(), "job-17", 1)


@pytest.mark.parametrize(
    ("held", "ours"),
    [
        (("job-17", 1), ("job-17", 1)),  # the same attempt: the holder may be a live sibling
        (("job-17", 2), ("job-17", 1)),  # a newer attempt holds it
        (("job-16", 0), ("job-17", 3)),  # another job
        (("none", 0), ("none", 5)),  # torchrun's default id proves nothing
    ],
    ids=["same-restart", "newer-holder", "other-job", "default-run-id"],
)
def test_other_torchrun_locks_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held: tuple, ours: tuple) -> None:
    _plant(tmp_path, elastic_run=held[0], restart=held[1])
    _elastic(monkeypatch, *ours)
    with pytest.raises(CheckpointWriteError, match="locked by pid 4242 on host 'node-that-was-requeued'"):
        CheckpointDirectory(tmp_path)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "theirs"


def test_an_expired_heartbeat_is_taken_over_only_when_opted_in(tmp_path: Path) -> None:
    _plant(tmp_path, heartbeat=time.time() - 7200)
    with pytest.raises(CheckpointWriteError, match="lock_stale_after_s="):
        CheckpointDirectory(tmp_path)
    with pytest.raises(CheckpointWriteError, match="node-that-was-requeued"):
        CheckpointDirectory(tmp_path, lock_stale_after_s=3 * 3600)  # not old enough
    with pytest.warns(UserWarning, match=r"its last heartbeat is 720\d s old \(stale_after_s=3600\)"):
        CheckpointDirectory(tmp_path, lock_stale_after_s=3600).close()
    with pytest.raises(ValueError, match="above the 30 s heartbeat interval"):
        CheckpointDirectory(tmp_path, lock_stale_after_s=5)


def test_commits_refresh_the_heartbeat_and_stop_once_the_lock_was_taken(tmp_path: Path) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        lock = ckpts._lock
        assert isinstance(lock, DirectoryLock)
        lock._record["heartbeat"] -= 3600  # as if the last commit was an hour ago
        ckpts.commit(ckpts.next_name(1), make_payload(1, numel=4), step=1, epoch=0)
        assert time.time() - json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] < 60
        assert lock.refresh() is False  # fresh: no rewrite
        # Another host decided this writer was gone and took the lock.
        _plant(tmp_path)
        lock._record["heartbeat"] -= 3600
        with pytest.raises(CheckpointWriteError, match="taken over by another writer"):
            ckpts.commit(ckpts.next_name(2), make_payload(2, numel=4), step=2, epoch=0)
        assert [entry.step for entry in ckpts.entries()] == [1]
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "theirs"  # release never removes theirs


def test_a_lock_this_process_released_but_could_not_delete_is_taken_over(tmp_path, monkeypatch) -> None:
    """A directory made read-only mid-run: the run's close() cannot unlink the lock; a retry in the same process may go on."""
    first = CheckpointDirectory(tmp_path)
    real_unlink = os.unlink

    def read_only_unlink(path, *args, **kwargs):
        if str(path).endswith(LOCK_NAME):
            raise OSError(30, "Read-only file system")
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", read_only_unlink)
    first.close()
    monkeypatch.undo()
    assert (tmp_path / LOCK_NAME).exists()  # left behind by the failed release
    with pytest.warns(UserWarning, match="released earlier but not deleted"):
        second = CheckpointDirectory(tmp_path)
    second.close()
    assert not (tmp_path / LOCK_NAME).exists()
