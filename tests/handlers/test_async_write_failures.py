"""A background checkpoint write that fails: raised on the training thread at the next iteration, nothing older lost.

The run is ``tests/resume/train_script.py``'s (a save every 2 optimizer steps,
one step per iteration, ``CheckpointRotation(async_save=True)``). Once the
save of step 4 is durable the disk goes bad; the save of step 6, handed to the
writer at iteration 6, fails there. The test makes the training thread wait at
the start of each iteration for a write in flight (a wrapper around
``CheckpointDirectory.commit``), so "at the next iteration" is exactly
iteration 7. Then: the error is a ``CheckpointWriteError`` naming the file
and the cause, no temp file is left, the older checkpoints all verify, and a
rerun once the disk is good again resumes from step 4 and ends bitwise equal
to an uninterrupted run.

Real causes need mounts (root): a full small tmpfs, and a tmpfs remounted
read-only mid-run; they skip where mounting is not permitted. The same
failures injected into the writer's low-level calls run everywhere.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine_kit.checkpoint import LOCK_NAME, TEMP_PREFIX, CheckpointDirectory, streaming
from engine_kit.checkpoint.commands import verify_command
from engine_kit.errors import CheckpointWriteError, HandlerError
from handlers.checkpoint import CheckpointRotation
from tests.checkpoint.conftest import listing
from tests.resume.train_script import COMPARED, train
from tests.resume.fault_driver import shared_driver
from tests.resume.writer_faults import WRITER_THREAD, break_after_save, pace_background_writes

EPOCHS = 2  # 24 optimizer steps: the failure at step 6, the rerun past an epoch end


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return train(tmp_path_factory.mktemp("reference"), epochs=EPOCHS, async_save=False)


@pytest.fixture
def pacing(monkeypatch: pytest.MonkeyPatch) -> Callable:
    """A hook for ``train``: each iteration starts once the background write in flight (if any) is over."""
    return pace_background_writes(monkeypatch.setattr)


def check_failure(folder: Path, error_type: str, message: str, iteration: int, saved: list[int]) -> None:
    """The failed save of step 6 (handed over at iteration 6) was raised at iteration 7, naming its file."""
    assert error_type == "CheckpointWriteError", message
    assert iteration == 7, "not raised at the iteration after the failed save was handed over"
    assert saved == [2, 4]  # CHECKPOINT_SAVED was never announced for the failed save
    assert str(folder) in message and "step00000006" in message, message  # the file it could not write
    assert [n for n in os.listdir(folder) if n.startswith(TEMP_PREFIX)] == []


def run_into_failure(folder: Path, pacing: Callable, break_disk: Callable[[], None]) -> str:
    """Train (in this process) until the background save of step 6 fails; ``break_disk`` runs once step 4's is durable.

    Returns the error's message.
    """
    saved: list[int] = []
    trainers: list = []
    with pytest.raises(HandlerError) as caught:
        train(folder, epochs=EPOCHS, async_save=True, hooks=[pacing, break_after_save(4, break_disk, saved), trainers.append])
    error = caught.value.__cause__
    check_failure(folder, type(error).__name__, str(error), trainers[0].state.iteration, saved)
    assert isinstance(error.__cause__, Exception)  # the writer's own error is chained
    return str(error)


def assert_older_checkpoints_verify(folder: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert verify_command(str(folder)) == 0, capsys.readouterr().out  # what `engine-kit ckpt verify DIR` runs
    assert [e.step for e in CheckpointDirectory(folder, read_only=True).entries()] == [2, 4]


def rerun_and_compare(folder: Path, reference: dict, *, lock_left_by_a_dead_run: bool = False) -> None:
    if lock_left_by_a_dead_run:
        with pytest.warns(UserWarning, match="taking over the stale lock"):
            result = train(folder, epochs=EPOCHS, async_save=True, resume="auto")
    else:
        result = train(folder, epochs=EPOCHS, async_save=True, resume="auto")
    assert Path(result["resumed_from"]).name.startswith("step00000004")
    for key in COMPARED:
        assert result[key] == reference[key], f"{key} differs from the uninterrupted run"


# -- real causes: a full disk, a directory made read-only (mounts; root only) ------------------------------
@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs at ``tmp_path/mnt``, unmounted afterwards; skips where mounting is not permitted."""
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mount_point)],
                                 capture_output=True, text=True, timeout=30)
    except OSError as exc:  # no mount command at all
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(path: Path) -> None:
    """Write ``path`` until the filesystem is full."""
    chunk = b"\0" * 65536
    with open(path, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    # A partial page may be left: a few bytes more until nothing fits.
    with open(path, "ab", buffering=0) as f:
        try:
            while f.write(b"\0" * 512):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_a_full_disk_fails_the_background_save_and_a_rerun_with_space_resumes(
    small_tmpfs: Path, pacing: Callable, reference: dict, capsys: pytest.CaptureFixture
) -> None:
    folder, filler = small_tmpfs / "ckpt", small_tmpfs / "filler"
    message = run_into_failure(folder, pacing, lambda: fill(filler))
    assert "No space left on device" in message
    assert_older_checkpoints_verify(folder, capsys)
    filler.unlink()
    rerun_and_compare(folder, reference)


def test_a_directory_made_read_only_mid_run_fails_the_background_save_and_a_rerun_resumes(
    small_tmpfs: Path, reference: dict, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    # The failing run is a process of its own: its lock file cannot be removed from a read-only directory,
    # and only once that process is gone may the rerun take the lock over (as after a real failure).
    folder, out = small_tmpfs / "ckpt", tmp_path / "failed.json"
    remount = ["mount", "-o", "remount,ro", str(small_tmpfs)]
    try:
        reply = shared_driver()(dir=str(folder), out=str(out), config={"async_save": True, "epochs": EPOCHS}, pace_writes=True,
                                break_after_save={"step": 4, "command": remount})
        assert reply["status"] == 1, reply
        failure = json.loads(out.read_text())
        check_failure(folder, failure["error"], failure["message"], failure["iteration"], failure["saved"])
        assert "Read-only file system" in failure["message"]
        assert_older_checkpoints_verify(folder, capsys)
        # A run started now on that filesystem fails at construction, not at its first save.
        with pytest.raises(CheckpointWriteError, match="To fix:") as refused:
            CheckpointRotation(small_tmpfs / "fresh", async_save=True)
        assert str(small_tmpfs / "fresh") in str(refused.value)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], check=True, capture_output=True)
    rerun_and_compare(folder, reference, lock_left_by_a_dead_run=True)


# -- the same failures injected into the writer's low-level calls (no mount needed) -------------------------
def inject(monkeypatch: pytest.MonkeyPatch, cause: int) -> Callable[[], None]:
    """Return a switch that makes the writer thread's checkpoint file writes fail with ``cause`` from then on.

    ENOSPC: the temp file's fsync fails after its bytes were written (where a
    full disk shows on filesystems that allocate late); EROFS: the temp file
    cannot be created.
    """
    armed = threading.Event()
    real_open, real_fsync = os.open, os.fsync

    def on_writer() -> bool:
        return armed.is_set() and threading.current_thread().name.startswith(WRITER_THREAD)

    def is_temp(fd: int) -> bool:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(TEMP_PREFIX)

    def fsync(fd: int) -> None:
        if cause == errno.ENOSPC and on_writer() and is_temp(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    def open_(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if cause == errno.EROFS and on_writer() and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "open", open_)
    return armed.set


@pytest.mark.parametrize(("cause", "text"), [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")])
def test_an_injected_write_failure_is_raised_at_the_next_iteration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pacing: Callable,
    reference: dict, capsys: pytest.CaptureFixture, cause: int, text: str,
) -> None:
    folder = tmp_path / "ckpt"
    message = run_into_failure(folder, pacing, inject(monkeypatch, cause))
    assert text in message
    assert_older_checkpoints_verify(folder, capsys)
    monkeypatch.undo()  # the disk is good again (this also drops the pacing hook: not needed for the rerun)
    rerun_and_compare(folder, reference)


def test_an_exception_while_serializing_leaves_the_directory_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pacing: Callable, reference: dict, capsys: pytest.CaptureFixture
) -> None:
    """An exception while serializing in the background: the writer fails inside torch.save's stream, after some bytes."""
    folder, before = tmp_path / "ckpt", {}
    armed = threading.Event()
    real_write_sealed = streaming.write_sealed

    def write_sealed(fileobj: object, *args: object, **kwargs: object) -> object:
        if armed.is_set():
            fileobj.write(b"PK\x03\x04 the first bytes of an archive")
            raise pickle.PicklingError("cannot pickle 'generator' object")
        return real_write_sealed(fileobj, *args, **kwargs)

    def arm() -> None:
        before.update(listing(folder))
        armed.set()

    monkeypatch.setattr(streaming, "write_sealed", write_sealed)
    message = run_into_failure(folder, pacing, arm)
    assert "cannot pickle 'generator' object" in message
    after = listing(folder)
    before.pop(LOCK_NAME, None), after.pop(LOCK_NAME, None)  # the lock's heartbeat may be rewritten meanwhile
    assert after == before  # names and bytes: no new file, no changed index, nothing rotated out
    assert_older_checkpoints_verify(folder, capsys)
    monkeypatch.undo()
    rerun_and_compare(folder, reference)

