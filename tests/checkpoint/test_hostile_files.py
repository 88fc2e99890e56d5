"""FIFOs, devices and directories where a registry, lock or checkpoint should be: a clear error, never a hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine_kit.checkpoint import LOCK_NAME, REGISTRY_NAME, CheckpointDirectory, atomic_write, verify_checkpoint_file
from engine_kit.errors import CheckpointWriteError, NotARegularFileError
from tests.checkpoint.conftest import child_env, make_payload

DEADLINE_S = 5.0


def within_deadline(action: Callable[[], Any]) -> Any:
    """Run ``action`` in a daemon thread; fail (instead of hanging the suite) if it blocks."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outcome["value"] = action()
            outcome["warnings"] = [str(w.message) for w in caught]
        except BaseException as exc:  # reported to the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(DEADLINE_S)
    assert not worker.is_alive(), f"blocked for more than {DEADLINE_S} s"
    return outcome


def _two_checkpoints(folder: Path) -> list[str]:
    with CheckpointDirectory(folder) as ckpts:
        for step in (1, 2):
            ckpts.commit(ckpts.next_name(step), make_payload(step, numel=16), step=step, epoch=0)
        return [entry.name for entry in ckpts.entries()]


def test_fifo_at_the_registry(tmp_path: Path) -> None:
    names = _two_checkpoints(tmp_path)
    (tmp_path / REGISTRY_NAME).unlink()
    os.mkfifo(tmp_path / REGISTRY_NAME)
    read = within_deadline(lambda: CheckpointDirectory(tmp_path, read_only=True).newest_valid())
    assert read["value"].name == names[-1]
    assert any("FIFO" in message and "rebuilt the checkpoint index" in message for message in read["warnings"])
    write = within_deadline(lambda: CheckpointDirectory(tmp_path))
    assert isinstance(write["error"], CheckpointWriteError) and "is a FIFO (named pipe), not a regular file" in str(write["error"])
    assert (tmp_path / REGISTRY_NAME).is_fifo()
    assert not (tmp_path / LOCK_NAME).exists()  # the failed writer released its lock


def test_fifo_at_the_lock(tmp_path: Path) -> None:
    names = _two_checkpoints(tmp_path)
    os.mkfifo(tmp_path / LOCK_NAME)
    write = within_deadline(lambda: CheckpointDirectory(tmp_path))
    assert isinstance(write["error"], NotARegularFileError) and ".ek-lock' is a FIFO" in str(write["error"])
    assert within_deadline(lambda: CheckpointDirectory(tmp_path, read_only=True).newest_valid())["value"].name == names[-1]


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_non_file_at_an_indexed_checkpoint_name(tmp_path: Path, kind: str) -> None:
    older, newer = _two_checkpoints(tmp_path)
    (tmp_path / newer).unlink()
    os.mkfifo(tmp_path / newer) if kind == "fifo" else (tmp_path / newer).mkdir()
    read = within_deadline(lambda: CheckpointDirectory(tmp_path, read_only=True).load_newest_valid())
    assert read["value"][0].name == older
    assert any(f"{newer}: a {'FIFO' if kind == 'fifo' else 'directory'}" in message for message in read["warnings"])
    verify = within_deadline(lambda: verify_checkpoint_file(tmp_path / newer))
    assert isinstance(verify["error"], NotARegularFileError)
    assert "not a regular file" in str(verify["error"]) and "disk space" not in str(verify["error"])


def test_directory_at_a_written_name_is_not_a_disk_problem(tmp_path: Path) -> None:
    (tmp_path / "registry.json").mkdir()
    with pytest.raises(CheckpointWriteError, match="it is a directory, not a regular file") as info:
        atomic_write(tmp_path / "registry.json", lambda fileobj: fileobj.write(b"{}"))
    assert "disk space" not in str(info.value)


# The CLI, in one child process (torch imported once): each case runs main() and
# reports its exit status, output and the seconds it took; `timeout` kills a hang.
_CLI_CASES = r"""
import contextlib, io, json, sys, time
from engine_kit.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stdout(out):
        status = main(argv)
    results.append({"argv": argv, "status": status, "seconds": time.monotonic() - start, "out": out.getvalue()})
print(json.dumps(results))
"""


def test_cli_on_fifos_and_devices_finishes_with_a_clear_error(tmp_path: Path) -> None:
    fifo_file = tmp_path / "pipe.ekpt"
    os.mkfifo(fifo_file)
    registry_dir, lock_dir, ckpt_dir = tmp_path / "registry", tmp_path / "lock", tmp_path / "ckpt"
    for folder in (registry_dir, lock_dir, ckpt_dir):
        _two_checkpoints(folder)
    (registry_dir / REGISTRY_NAME).unlink()
    os.mkfifo(registry_dir / REGISTRY_NAME)
    os.mkfifo(lock_dir / LOCK_NAME)
    os.mkfifo(ckpt_dir / "step00000003-00003.ekpt")
    cases = [
        ["ckpt", "verify", str(fifo_file)],
        ["ckpt", "inspect", str(fifo_file)],
        ["ckpt", "verify", "/dev/zero"],
        ["ckpt", "inspect", str(registry_dir)],
        ["ckpt", "verify", str(lock_dir)],
        ["ckpt", "repair", str(lock_dir)],
        ["ckpt", "repair", str(registry_dir)],
        ["ckpt", "inspect", str(ckpt_dir)],
    ]
    child = subprocess.run(
        ["timeout", "120", sys.executable, "-c", _CLI_CASES, json.dumps(cases)],
        env=child_env(), capture_output=True, text=True,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    results = {" ".join(r["argv"][1:]).replace(str(tmp_path), "T"): r for r in json.loads(child.stdout)}
    for result in results.values():
        assert result["seconds"] < DEADLINE_S, result
        assert "Traceback" not in result["out"]
    for case in ("verify T/pipe.ekpt", "inspect T/pipe.ekpt"):
        assert results[case]["status"] == 1 and results[case]["out"].count("\n") == 1
        assert "is a FIFO (named pipe), not a regular file" in results[case]["out"]
    assert results["verify /dev/zero"]["status"] == 1 and "a character device" in results["verify /dev/zero"]["out"]
    # A reader rebuilds around a FIFO registry and still checks every file.
    assert results["inspect T/registry"]["status"] == 0 and "2 registered, 2 valid" in results["inspect T/registry"]["out"]
    assert "FIFO" in results["inspect T/registry"]["out"]
    assert results["verify T/lock"]["status"] == 0  # reading takes no lock
    assert results["repair T/lock"]["status"] == 1 and ".ek-lock' is a FIFO" in results["repair T/lock"]["out"]
    assert results["repair T/registry"]["status"] == 1 and "registry.json': it is a FIFO" in results["repair T/registry"]["out"]
    assert "step00000003-00003.ekpt  set aside: a FIFO" in results["inspect T/ckpt"]["out"]
