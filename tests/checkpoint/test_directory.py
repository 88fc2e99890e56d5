"""CheckpointDirectory: registry, lock, names, symlinks, repair, fallback."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from engine_kit.checkpoint import (
    LOCK_NAME,
    REGISTRY_NAME,
    TEMP_PREFIX,
    CheckpointDirectory,
    RegistryEntry,
    load_checkpoint_file,
    sha256_file,
)
from engine_kit.checkpoint import atomic as atomic_module
from engine_kit.checkpoint import directory as directory_module
from engine_kit.checkpoint import reader as reader_module
from engine_kit.checkpoint import registry as registry_module
from engine_kit.errors import CheckpointCorruptError, CheckpointWriteError
from tests.checkpoint.conftest import child_env, flip_byte, listing, make_payload, payload_matches


def _commit(ckpts: CheckpointDirectory, step: int, **kwargs: object) -> RegistryEntry:
    return ckpts.commit(f"step-{step:06d}.ekpt", make_payload(step, numel=64), step=step, epoch=step // 10, **kwargs)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_commit_registers_with_sha_and_loads_back(tmp_path: Path) -> None:
    with CheckpointDirectory(tmp_path / "ckpts") as ckpts:
        first = _commit(ckpts, 1, tags=("last",), metric=0.5)
        second = _commit(ckpts, 2, tags=["best"], metric=2.5)
        assert [e.name for e in ckpts.entries()] == [first.name, second.name]
        assert first.sha256 == sha256_file(tmp_path / "ckpts" / first.name)
        assert ckpts.newest_valid() == second
        assert payload_matches(ckpts.load(first.name), 1)
        assert payload_matches(ckpts.load(second), 2)
        entry, payload = ckpts.load_newest_valid()
        assert entry == second and payload_matches(payload, 2)


def test_registry_json_is_strict_json_even_with_non_finite_metrics(tmp_path: Path) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        for step, metric in enumerate([float("nan"), float("inf"), -float("inf"), 1.5, None]):
            _commit(ckpts, step, metric=metric)
        stored = [e.metric for e in ckpts.entries()]

    def no_constants(token: str) -> None:
        raise AssertionError(f"bare {token} in registry.json")

    document = json.loads((tmp_path / REGISTRY_NAME).read_text(), parse_constant=no_constants)
    assert [e["metric"] for e in document["entries"]] == ["nan", "inf", "-inf", 1.5, None]
    assert str(stored[0]) == "nan" and stored[1:] == [float("inf"), -float("inf"), 1.5, None]


def test_committed_names_are_immutable(tmp_path: Path) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        entry = _commit(ckpts, 1)
        with pytest.raises(CheckpointWriteError, match="already committed"):
            _commit(ckpts, 1)
        assert ckpts.remove([entry.name]) == [entry.name]
        _commit(ckpts, 1)


def test_remove_unregisters_then_deletes_only_registered_names(tmp_path: Path) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        a, b = _commit(ckpts, 1), _commit(ckpts, 2)
        (tmp_path / "user.ekpt").write_bytes(b"mine")
        with pytest.raises(ValueError, match="not a registered checkpoint"):
            ckpts.remove(["user.ekpt"])
        assert ckpts.remove(a.name) == [a.name]
        assert [e.name for e in ckpts.entries()] == [b.name]
        assert not (tmp_path / a.name).exists() and (tmp_path / "user.ekpt").read_bytes() == b"mine"


def test_read_only_mode_takes_no_lock_and_refuses_writes(tmp_path: Path) -> None:
    with CheckpointDirectory(tmp_path) as writer:
        _commit(writer, 1)
        (tmp_path / f"{TEMP_PREFIX}1-x").write_bytes(b"in flight")
        reader = CheckpointDirectory(tmp_path, read_only=True)
        assert reader.newest_valid().step == 1 and payload_matches(reader.load("step-000001.ekpt"), 1)
        with pytest.raises(CheckpointWriteError, match="read_only=True"):
            _commit(reader, 2)
        assert (tmp_path / f"{TEMP_PREFIX}1-x").exists()  # a reader never sweeps
    with pytest.raises(FileNotFoundError, match="To fix:"):
        CheckpointDirectory(tmp_path / "missing", read_only=True)


def test_closed_directory_refuses_writes(tmp_path: Path) -> None:
    ckpts = CheckpointDirectory(tmp_path)
    ckpts.close()
    ckpts.close()
    with pytest.raises(CheckpointWriteError, match="closed"):
        _commit(ckpts, 1)


# --- case 8: unwritable directory ------------------------------------------


def test_case8_directory_under_a_regular_file_fails_at_construction(tmp_path: Path) -> None:
    (tmp_path / "somefile").write_text("not a directory")
    with pytest.raises(CheckpointWriteError, match=r"somefile/ckpts.*not writable.*To fix:"):
        CheckpointDirectory(tmp_path / "somefile" / "ckpts")


def test_case8_probe_write_failure_fails_at_construction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic_module, "create_temp", refuse)
    with pytest.raises(CheckpointWriteError, match="Permission denied.*To fix:"):
        CheckpointDirectory(tmp_path)
    assert not (tmp_path / LOCK_NAME).exists()


def test_case8_missing_directory_without_create(tmp_path: Path) -> None:
    with pytest.raises(CheckpointWriteError, match="does not exist"):
        CheckpointDirectory(tmp_path / "nope", create=False)


# --- case 9: one writer ------------------------------------------------------


def test_case9_second_writer_in_the_same_process_is_refused(tmp_path: Path) -> None:
    first = CheckpointDirectory(tmp_path)
    with pytest.raises(CheckpointWriteError, match=rf"locked by this process \(pid {os.getpid()}\).*To fix:"):
        CheckpointDirectory(tmp_path)
    first.close()
    with CheckpointDirectory(tmp_path):
        pass
    assert not (tmp_path / LOCK_NAME).exists()


def test_case9_writer_in_another_process_is_refused(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from engine_kit.checkpoint import CheckpointDirectory\n"
        f"d = CheckpointDirectory({str(tmp_path)!r})\n"
        "print('locked', flush=True)\n"
        "sys.stdin.readline()\n"
        "d.close()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointWriteError, match=rf"locked by pid {child.pid} on host"):
            CheckpointDirectory(tmp_path)
    finally:
        child.communicate("done\n", timeout=30)
    assert child.returncode == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean release: no takeover warning
        CheckpointDirectory(tmp_path).close()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    pid = _dead_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    with pytest.warns(UserWarning, match=rf"taking over the stale lock.*pid {pid}"):
        ckpts = CheckpointDirectory(tmp_path)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    ckpts.close()


def test_lock_of_a_reused_pid_is_stale(tmp_path: Path) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "start": "1"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(holder))
    with pytest.warns(UserWarning, match="taking over"):
        CheckpointDirectory(tmp_path).close()


def test_lock_from_another_host_is_refused(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": "some-other-host"}))
    with pytest.raises(CheckpointWriteError, match="some-other-host"):
        CheckpointDirectory(tmp_path)


def test_unreadable_lock_is_refused_when_fresh_and_taken_over_when_old(tmp_path: Path) -> None:
    lock = tmp_path / LOCK_NAME
    lock.write_bytes(b"")
    with pytest.raises(CheckpointWriteError, match="unreadable lock"):
        CheckpointDirectory(tmp_path)
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="taking over"):
        CheckpointDirectory(tmp_path).close()


# --- case 14: names ----------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../x.ekpt", "sub/../../x.ekpt", "/tmp/abs.ekpt", "a\0b.ekpt", "x" * 300 + ".ekpt", ".hidden.ekpt", "a\\b.ekpt", "noext", "", ".."],
    ids=["dotdot", "nested-dotdot", "absolute", "nul", "300-chars", "hidden", "backslash", "no-suffix", "empty", "parent"],
)
def test_case14_bad_names_are_rejected_by_commit(tmp_path: Path, name: str) -> None:
    with CheckpointDirectory(tmp_path / "ckpts") as ckpts:
        before = listing(tmp_path / "ckpts")
        with pytest.raises(ValueError, match="not a plain file name.*To fix:"):
            ckpts.commit(name, make_payload(1, numel=4), step=1, epoch=0)
        assert listing(tmp_path / "ckpts") == before and ckpts.entries() == []
    assert sorted(os.listdir(tmp_path)) == ["ckpts"]


def _forge_registry(directory: Path, edit: Callable[[dict], None]) -> None:
    """Edit registry.json and re-seal its digest, as a forger who knows the format would."""
    path = directory / REGISTRY_NAME
    document = json.loads(path.read_text())
    edit(document)
    document["digest"] = registry_module._content_digest(document)
    path.write_text(json.dumps(document))


def _hand_edit_registry(directory: Path, extra_entries: list[dict]) -> None:
    _forge_registry(directory, lambda document: document["entries"].extend(extra_entries))


def test_case14_registry_entry_pointing_outside_is_never_acted_on(tmp_path: Path) -> None:
    folder = tmp_path / "ckpts"
    outside = tmp_path / "outside.ekpt"
    outside.write_bytes(b"precious")
    with CheckpointDirectory(folder) as ckpts:
        _commit(ckpts, 1)
    forged = {"sha256": sha256_file(outside), "size": 8, "step": 99, "epoch": 9, "tags": ["last"], "metric": None, "created": 0.0}
    _hand_edit_registry(folder, [{**forged, "name": "../outside.ekpt"}, {**forged, "name": str(outside)}])
    with pytest.warns(UserWarning, match="ignoring registry entry") as record:
        reader = CheckpointDirectory(folder, read_only=True)
        assert [e.step for e in reader.entries()] == [1]
    assert len(record) >= 2
    with pytest.warns(UserWarning, match="ignoring registry entry"):
        ckpts = CheckpointDirectory(folder)  # repair rewrites the registry without them
    with ckpts:
        assert "outside" not in (folder / REGISTRY_NAME).read_text()
        for bad in ("../outside.ekpt", str(outside)):
            with pytest.raises(ValueError):
                ckpts.remove([bad])
        for step in range(2, 5):  # keep-last-1 rotation
            _commit(ckpts, step)
            ckpts.remove([e.name for e in ckpts.entries()[:-1]])
        assert ckpts.newest_valid().step == 4
    assert outside.read_bytes() == b"precious"


# --- case 15: symlinks -------------------------------------------------------


def test_case15_commit_to_a_planted_symlink_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    with CheckpointDirectory(tmp_path / "ckpts") as ckpts:
        (tmp_path / "ckpts" / "step-000001.ekpt").symlink_to(outside)
        with pytest.raises(CheckpointWriteError, match="symlink"):
            _commit(ckpts, 1)
        assert ckpts.entries() == []
    assert outside.read_bytes() == b"precious"


def test_case15_symlink_swapped_in_for_a_committed_file_is_never_followed(tmp_path: Path) -> None:
    folder = tmp_path / "ckpts"
    outside = tmp_path / "outside.ekpt"
    with CheckpointDirectory(folder) as ckpts:
        old, new = _commit(ckpts, 1), _commit(ckpts, 2)
        # The attacker swaps the newest file for a link to a valid copy outside.
        os.replace(folder / new.name, outside)
        (folder / new.name).symlink_to(outside)
        # The entry now resolves outside: dropped on read, never loaded or deleted through.
        with pytest.warns(UserWarning, match=r"ignoring registry entry.*outside the directory"):
            assert ckpts.newest_valid() == old
        with pytest.raises(ValueError, match="not a registered"):
            ckpts.load(new.name)
        with pytest.raises(ValueError, match="not a registered"):
            ckpts.remove([new.name])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        CheckpointDirectory(folder).close()  # the link stays set aside, silently
    assert record == []
    assert [e.name for e in CheckpointDirectory(folder, read_only=True).entries()] == [old.name]
    assert (folder / new.name).is_symlink()
    assert payload_matches(load_checkpoint_file(outside), 2)


def test_case15_symlink_at_a_registered_name_inside_the_directory_is_not_deleted_through(tmp_path: Path) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        one, two = _commit(ckpts, 1), _commit(ckpts, 2)
        # A link that stays inside passes the realpath check; remove must still not follow it.
        (tmp_path / two.name).unlink()
        (tmp_path / two.name).symlink_to(tmp_path / one.name)
        # The link is not a checkpoint file: set aside (kept, not indexed), so rotation cannot reach it.
        with pytest.warns(UserWarning, match="set aside.*step-000002.ekpt: a symlink"):
            assert [e.name for e in ckpts.entries()] == [one.name]
        with pytest.raises(ValueError, match="not a registered"):
            ckpts.remove([two.name])
        assert (tmp_path / two.name).is_symlink() and payload_matches(ckpts.load(one), 1)


# --- case 17: repair -----------------------------------------------------------


def test_case17_missing_file_is_dropped_and_orphans_are_reported(tmp_path: Path) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        a, b = _commit(ckpts, 1), _commit(ckpts, 2)
    (tmp_path / b.name).unlink()
    (tmp_path / "orphan.ekpt").write_bytes(b"left by a crash")
    (tmp_path / "notes.txt").write_text("user file")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ckpts = CheckpointDirectory(tmp_path)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1, messages  # one warning naming every repair
    assert "dropped entries for missing files ['step-000002.ekpt']" in messages[0]
    assert "set aside (kept in place, not indexed) orphan.ekpt" in messages[0]
    with ckpts:
        assert [e.name for e in ckpts.entries()] == [a.name]
    assert [e["name"] for e in json.loads((tmp_path / REGISTRY_NAME).read_text())["entries"]] == [a.name]
    assert (tmp_path / "orphan.ekpt").exists() and (tmp_path / "notes.txt").exists()


def test_repair_returns_a_report(tmp_path: Path) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        entry = _commit(ckpts, 1)
        (tmp_path / entry.name).unlink()
        (tmp_path / "x.ekpt").write_bytes(b"")
        with pytest.warns(UserWarning):
            report = ckpts.repair()
    assert (report.missing, report.invalid, report.finished, report.orphans) == ([entry.name], [], [], ["x.ekpt"])
    assert report.adopted == [] and "x.ekpt" in report.set_aside


def test_repair_finishes_a_rotation_killed_before_its_unlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outside = tmp_path / "outside.ekpt"
    outside.write_bytes(b"precious")
    folder = tmp_path / "ckpts"
    with CheckpointDirectory(folder) as ckpts:
        old, new = _commit(ckpts, 1), _commit(ckpts, 2)
        monkeypatch.setattr(directory_module.CheckpointDirectory, "_unlink_regular", lambda self, name, quiet=False: False)
        ckpts.remove([old.name])  # "killed" before the unlink
        monkeypatch.undo()
    assert (folder / old.name).exists()
    document = json.loads((folder / REGISTRY_NAME).read_text())
    assert document["pending_delete"] == [old.name]
    _forge_registry(folder, lambda document: document["pending_delete"].append("../outside.ekpt"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ckpts = CheckpointDirectory(folder)
    with ckpts:
        assert not (folder / old.name).exists() and [e.name for e in ckpts.entries()] == [new.name]
    assert any("ignoring pending deletion" in str(w.message) for w in record)
    assert not any("adopted" in str(w.message) for w in record)
    assert json.loads((folder / REGISTRY_NAME).read_text())["pending_delete"] == []
    assert outside.read_bytes() == b"precious"


# --- fallback over corrupt files ------------------------------------------------


def test_newest_valid_skips_corrupt_entries_with_one_warning(tmp_path: Path) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        _commit(ckpts, 1)
        two, three = _commit(ckpts, 2), _commit(ckpts, 3)
        flip_byte(tmp_path / three.name, 200)
        with open(tmp_path / two.name, "r+b") as f:
            f.truncate(100)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            newest = ckpts.newest_valid()
        assert newest.step == 1
        rebuilt, skipped = (str(w.message) for w in record)
        # The truncated file no longer matches its entry (size): set aside, kept on disk.
        assert "step-000002.ekpt: size" in rebuilt and "set aside" in rebuilt
        # The flipped byte is found by verification: skipped, with one warning.
        assert "step-000003.ekpt" in skipped and "using step-000001.ekpt" in skipped
        with pytest.raises(CheckpointCorruptError, match="step-000003"):
            ckpts.load(three)
        assert (tmp_path / two.name).exists() and (tmp_path / three.name).exists()


def test_file_replaced_by_a_copy_of_another_checkpoint_is_set_aside(tmp_path: Path) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        one, two = _commit(ckpts, 1), _commit(ckpts, 2)
        (tmp_path / two.name).write_bytes((tmp_path / one.name).read_bytes())
        # The copy's own record names step-000001: it is not the file the index listed.
        with pytest.warns(UserWarning, match=r"set aside.*step-000002.ekpt: its record names it 'step-000001.ekpt'"):
            assert ckpts.newest_valid() == one
        with pytest.raises(ValueError, match="not a registered"):
            ckpts.load(two.name)
        assert (tmp_path / two.name).exists()


def test_unknown_registry_version_and_garbage_registry_are_rebuilt(tmp_path: Path) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        entry = _commit(ckpts, 1)
    (tmp_path / REGISTRY_NAME).write_text(json.dumps({"format_version": 99, "entries": []}))
    with pytest.warns(UserWarning, match=r"rebuilt the checkpoint index.*in memory.*format_version=99"):
        assert CheckpointDirectory(tmp_path, read_only=True).entries() == [entry]
    (tmp_path / REGISTRY_NAME).write_text("{not json")
    with pytest.warns(UserWarning, match=r"rebuilt the checkpoint index.*and saved.*not JSON"):
        CheckpointDirectory(tmp_path).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CheckpointDirectory(tmp_path, read_only=True).entries() == [entry]


# --- cases 3 and 7 at the directory level ----------------------------------------


def test_case3_unserializable_payload_leaves_the_directory_unchanged(tmp_path: Path) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        _commit(ckpts, 1)
        before = listing(tmp_path)
        with pytest.raises(CheckpointWriteError, match="step-000002.ekpt"):
            ckpts.commit("step-000002.ekpt", {"lock": threading.Lock()}, step=2, epoch=0)
        assert listing(tmp_path) == before


def test_case7_enospc_during_commit_leaves_registry_and_older_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        _commit(ckpts, 1)
        before = listing(tmp_path)
        real_fdopen = os.fdopen

        def full_disk(fd: int, *args: object, **kwargs: object) -> object:
            fileobj = real_fdopen(fd, *args, **kwargs)
            real_write = fileobj.write

            class Wrapped:
                def __getattr__(self, name: str) -> object:
                    return getattr(fileobj, name)

                def write(self, data: bytes) -> int:
                    real_write(bytes(data[:100]))
                    raise OSError(errno.ENOSPC, "No space left on device")

                def __enter__(self) -> object:
                    return self

                def __exit__(self, *exc: object) -> None:
                    fileobj.close()

            return Wrapped()

        monkeypatch.setattr(os, "fdopen", full_disk)
        with pytest.raises(CheckpointWriteError, match="No space left on device"):
            _commit(ckpts, 2)
        monkeypatch.undo()
        assert listing(tmp_path) == before
        assert [e.step for e in ckpts.entries()] == [1]


def test_registry_write_failure_takes_the_new_file_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        _commit(ckpts, 1)
        before = listing(tmp_path)

        def failing(*args: object, **kwargs: object) -> None:
            raise CheckpointWriteError("disk full while writing registry.json")

        monkeypatch.setattr(reader_module, "write_registry", failing)
        with pytest.raises(CheckpointWriteError, match="registry.json"):
            _commit(ckpts, 2)
        assert listing(tmp_path) == before


def test_retag_rewrites_tags_atomically_and_keeps_pending_deletions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with CheckpointDirectory(tmp_path) as ckpts:
        one, two, three = _commit(ckpts, 1, tags=("last",)), _commit(ckpts, 2), _commit(ckpts, 3)
        monkeypatch.setattr(directory_module.CheckpointDirectory, "_unlink_regular", lambda self, name, quiet=False: False)
        ckpts.remove([three.name])  # "killed" before the unlink: three is pending
        monkeypatch.undo()
        updated = ckpts.retag({one.name: ("best",), two.name: ["last"]})
        assert [e.tags for e in updated] == [("best",), ("last",)] == [e.tags for e in ckpts.entries()]
        with pytest.raises(ValueError, match="not registered"):
            ckpts.retag({"nope.ekpt": ()})
        from engine_kit.checkpoint import write_registry

        write_registry(tmp_path, ckpts.entries())  # pending=None keeps the list
    assert json.loads((tmp_path / REGISTRY_NAME).read_text())["pending_delete"] == [three.name]
