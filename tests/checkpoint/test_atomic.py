"""The atomic write path: syscall order, failure cleanup, symlinks, temp sweep."""

from __future__ import annotations

import errno
import os
import pickle
import threading
from pathlib import Path

import pytest

from engine_kit.checkpoint import TEMP_PREFIX, CheckpointDirectory, atomic_write, sweep_stale_temps
from engine_kit.checkpoint import atomic as atomic_module
from engine_kit.errors import CheckpointWriteError
from tests.checkpoint.conftest import listing, make_payload


def _temps(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if name.startswith(TEMP_PREFIX)]


class _SyscallRecorder:
    """Wraps os.fsync / os.replace / os.link, recording (call, path) in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str]] = []
        real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

        def fsync(fd: int) -> None:
            self.calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def replace(src: str, dst: str) -> None:
            self.calls.append(("replace", f"{os.path.basename(src)}->{os.path.basename(dst)}"))
            real_replace(src, dst)

        def link(src: str, dst: str) -> None:
            self.calls.append(("link", f"{os.path.basename(src)}->{os.path.basename(dst)}"))
            real_link(src, dst)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "link", link)


def test_atomic_write_writes_the_bytes_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    atomic_write(target, lambda f: f.write(b"new"))
    atomic_write(target, lambda f: f.write(b"newer"))
    assert target.read_bytes() == b"newer"
    assert _temps(tmp_path) == []


def test_case6_syscall_order_fsync_tmp_then_replace_then_fsync_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = _SyscallRecorder(monkeypatch)
    atomic_write(tmp_path / "out.bin", lambda f: f.write(b"x"))
    (fsync_tmp, tmp_file), (replace, renamed), (fsync_dir, directory) = recorder.calls
    assert fsync_tmp == "fsync" and os.path.basename(tmp_file).startswith(f"{TEMP_PREFIX}{os.getpid()}-")
    assert replace == "replace" and renamed == f"{os.path.basename(tmp_file)}->out.bin"
    assert fsync_dir == "fsync" and directory == str(tmp_path)


def test_case6_commit_makes_file_durable_before_registering_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two fsyncs per commit: the file's content, then the directory once for both renames.

    The index is replaced atomically but not fsynced on its own (a power loss that
    leaves it stale or empty is detected and rebuilt from the files, see
    test_registry_damage.py); old files are deleted only after the directory fsync.
    """
    with CheckpointDirectory(tmp_path) as ckpts:
        ckpts.commit("old.ekpt", make_payload(0, numel=8), step=0, epoch=0)
        recorder = _SyscallRecorder(monkeypatch)
        monkeypatch.setattr(os, "unlink", lambda path, real=os.unlink: (recorder.calls.append(("unlink", str(path))), real(path))[1])
        ckpts.commit("a.ekpt", make_payload(1, numel=8), step=1, epoch=0, rotate_out=["old.ekpt"])
        kinds = [(call, os.path.basename(arg.split("->")[-1])) for call, arg in recorder.calls]
    tmp1 = os.path.basename(recorder.calls[0][1])
    assert kinds == [
        ("fsync", tmp1),
        ("link", "a.ekpt"),  # a no-clobber link: a committed name is never replaced
        ("unlink", tmp1),  # the temp name of the linked file
        ("replace", "registry.json"),
        ("fsync", tmp_path.name),  # covers both renames
        ("unlink", "old.ekpt"),  # rotation: only once the new file is durable
    ]
    assert [e.name for e in CheckpointDirectory(tmp_path, read_only=True).entries()] == ["a.ekpt"]

@pytest.mark.parametrize(
    "error",
    [pickle.PicklingError("cannot pickle"), TypeError("cannot pickle '_thread.lock' object"), OSError(errno.EIO, "I/O error")],
    ids=["pickling", "typeerror", "eio"],
)
def test_case3_failure_inside_write_removes_temp_and_keeps_old_content(tmp_path: Path, error: Exception) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def write(fileobj: object) -> None:
        fileobj.write(b"partial")  # type: ignore[attr-defined]
        raise error

    with pytest.raises(CheckpointWriteError, match=r"out\.bin.*To fix:") as info:
        atomic_write(target, write)
    assert info.value.__cause__ is error
    assert target.read_bytes() == b"old"
    assert _temps(tmp_path) == []


def test_case3_unpicklable_object_written_through_pickle(tmp_path: Path) -> None:
    before = listing(tmp_path)
    with pytest.raises(CheckpointWriteError, match="lock"):
        atomic_write(tmp_path / "out.bin", lambda f: pickle.dump({"lock": threading.Lock()}, f))
    assert listing(tmp_path) == before


def test_case7_enospc_mid_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    real_fdopen = os.fdopen

    class FullDisk:
        """A file object that accepts a few bytes, then reports a full disk."""

        def __init__(self, fileobj: object) -> None:
            self._f = fileobj

        def write(self, data: bytes) -> int:
            self._f.write(data[:3])  # type: ignore[attr-defined]
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str) -> object:
            return getattr(self._f, name)

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self._f.close()  # type: ignore[attr-defined]

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    with pytest.raises(CheckpointWriteError, match="No space left") as info:
        atomic_write(target, lambda f: f.write(b"0123456789"))
    assert info.value.__cause__.errno == errno.ENOSPC
    assert target.read_bytes() == b"old"
    assert _temps(tmp_path) == []


def test_fsync_failure_is_a_write_error_and_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(CheckpointWriteError, match="Input/output error"):
        atomic_write(tmp_path / "out.bin", lambda f: f.write(b"x"))
    assert os.listdir(tmp_path) == []


def test_keyboard_interrupt_propagates_unwrapped_and_cleans_up(tmp_path: Path) -> None:
    def interrupted(fileobj: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "out.bin", interrupted)
    assert os.listdir(tmp_path) == []


def test_case15_refuses_to_write_at_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    inner = tmp_path / "ckpts"
    inner.mkdir()
    (inner / "out.bin").symlink_to(outside)
    with pytest.raises(CheckpointWriteError, match="symlink"):
        atomic_write(inner / "out.bin", lambda f: f.write(b"evil"))
    assert outside.read_bytes() == b"precious"
    assert (inner / "out.bin").is_symlink()
    assert _temps(inner) == []


def test_case5_sweep_removes_only_engine_kit_temps(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"keep")
    folder = tmp_path / "ckpts"
    folder.mkdir()
    ours = [f"{TEMP_PREFIX}123-abcd", f"{TEMP_PREFIX}99999-zz"]
    theirs = ["tmp123", "notes.txt", "tmpk2j3l4.pt", "ek-tmp-not-ours", "a.ekpt", ".ek-lock"]
    for name in ours + theirs:
        (folder / name).write_bytes(b"data")
    (folder / f"{TEMP_PREFIX}link").symlink_to(outside)
    (folder / f"{TEMP_PREFIX}dir").mkdir()
    removed = sweep_stale_temps(folder)
    assert removed == sorted([*ours, f"{TEMP_PREFIX}link"])
    assert sorted(os.listdir(folder)) == sorted([*theirs, f"{TEMP_PREFIX}dir"])
    assert outside.read_bytes() == b"keep"  # the link was removed, not followed


def test_a_temp_name_already_taken_is_skipped_and_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = iter(["taken", "taken", "free"])
    monkeypatch.setattr(atomic_module, "_temp_suffix", lambda: next(names))
    theirs = tmp_path / f"{atomic_module.temp_prefix()}taken"
    theirs.write_bytes(b"another writer's temp")
    atomic_write(tmp_path / "out.bin", lambda f: f.write(b"new"))
    assert (tmp_path / "out.bin").read_bytes() == b"new" and theirs.read_bytes() == b"another writer's temp"
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o600  # as private as tempfile.mkstemp's files
    assert sorted(_temps(tmp_path)) == [theirs.name]


def test_when_every_temp_name_is_taken_the_write_fails_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic_module, "_temp_suffix", lambda: "taken")
    (tmp_path / f"{atomic_module.temp_prefix()}taken").write_bytes(b"x")
    (tmp_path / "out.bin").write_bytes(b"old")
    with pytest.raises(CheckpointWriteError, match="Cannot create a temp file.*To fix:") as caught:
        atomic_write(tmp_path / "out.bin", lambda f: f.write(b"new"))
    assert isinstance(caught.value.__cause__, FileExistsError)
    assert (tmp_path / "out.bin").read_bytes() == b"old"


def test_temps_made_by_several_threads_are_distinct_files_the_sweep_finds(tmp_path: Path) -> None:
    made: list[str] = []

    def make() -> None:
        for _ in range(50):
            fd, path = atomic_module.create_temp(str(tmp_path))
            os.close(fd)
            made.append(os.path.basename(path))

    threads = [threading.Thread(target=make) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(made)) == 200 and all(name.startswith(f"{TEMP_PREFIX}{os.getpid()}-") for name in made)
    assert sorted(sweep_stale_temps(tmp_path)) == sorted(made)  # the sweep finds them all
