"""SIGTERM and SIGINT while a background checkpoint write is in flight (async saves, issue 13 acceptance 4).

The signal is sent by the writer thread itself, from inside the third save
(step 6) of ``tests/resume/train_script.py``'s run (two epochs of 12 steps), once the temp file is
written and before it gets its name; the writer then stalls for a second,
so the training thread handles the signal while the write is in flight.
Whatever happens, the newest valid checkpoint is either that new one,
complete, or the previous one (step 4); a rerun with ``resume="auto"``
leaves no temp file and ends bitwise equal to an uninterrupted run:

- with ``Preemption``: the window is finished, the write in flight completes,
  a last checkpoint is saved (unless the step in flight is already that
  window's), the process exits 75;
- without it, SIGINT (Ctrl-C) raises KeyboardInterrupt and the run's end
  waits for the write in flight: step 6 is complete;
- without it, SIGTERM kills the process at once: step 4 stays the newest,
  the temp file is left for the rerun to sweep.

The lab (examples/fashion_mnist.py, which attaches Preemption) gets the same
signals during a background write in the slow tests.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine_kit.checkpoint import CheckpointDirectory, verify_checkpoint_file
from handlers.preemption import PREEMPTED_EXIT_STATUS
from tests.resume.fault_driver import shared_driver, shared_reference, temp_names as temps
from tests.resume.train_script import COMPARED

ROOT = Path(__file__).resolve().parents[1]
Ask = Callable[..., dict[str, Any]]


@pytest.fixture(scope="module")
def ask() -> Ask:
    return shared_driver()


@pytest.fixture(scope="module")
def reference() -> dict:
    return shared_reference(2)


def checkpoints(folder: Path) -> tuple[list[int], int]:
    """Every file under a checkpoint name verifies; the valid steps and the newest one."""
    for path in folder.glob("*.ekpt"):
        verify_checkpoint_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = CheckpointDirectory(folder, read_only=True)
        entry, _ = reader.load_newest_valid()
        return [e.step for e in reader.entries()], entry.step


# signal, Preemption attached -> (exit status, newest valid step after the signal or None: the preemption's own)
CASES = {
    "SIGTERM-preemption": ("SIGTERM", True, PREEMPTED_EXIT_STATUS, None),
    "SIGINT-preemption": ("SIGINT", True, PREEMPTED_EXIT_STATUS, None),
    "SIGINT-no-preemption": ("SIGINT", False, 1, 6),
    "SIGTERM-no-preemption": ("SIGTERM", False, -signal.SIGTERM, 4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_signal_during_a_background_write(ask: Ask, reference: dict, tmp_path: Path, case: str) -> None:
    signame, preemption, status, newest = CASES[case]
    folder = tmp_path / "ckpt"
    config = {"async_save": True, "keep_last": 3, "preemption": preemption, "epochs": 2}
    fault = {"at": "temp-fsync", "action": signame, "nth": 3, "seconds": 1.0}
    reply = ask(dir=str(folder), out=str(tmp_path / "first.json"), config=config, fault=fault)
    assert reply["status"] == status, reply
    steps, newest_step = checkpoints(folder)
    if newest is None:
        # Preempted: step 6's write completed; the last save is at the window boundary where the signal was seen
        # (step 6 itself when it was seen in the iteration that handed step 6 over).
        assert 6 in steps and newest_step >= 6, steps
        assert temps(folder) == []
    else:
        assert newest_step == newest, steps
        assert 6 not in steps or newest == 6
        assert (temps(folder) != []) == (newest == 4)  # only a killed process leaves its temp file
    out = tmp_path / "rerun.json"
    rerun = ask(dir=str(folder), out=str(out), resume=True, config={**config, "preemption": True})
    assert rerun["status"] == 0, rerun
    assert temps(folder) == [], "a temp file survived the rerun"
    result = json.loads(out.read_text())
    assert result["resumed_from"]
    for key in COMPARED:
        assert result[key] == reference[key], f"{case}: {key} differs from the uninterrupted run"


# -- the lab (slow: four lab runs) ---------------------------------------------------------------------------
def run_lab(run_dir: Path, *, fault: str | None = None) -> subprocess.CompletedProcess:
    """The quick lab with async saves forced on (and a writer fault), as tests/test_lab.py runs it."""
    options = ["--fault", fault] if fault else []
    lab = ["--run-dir", str(run_dir), "--quick", "--dataset", "digits", "--seed", "3"]
    return subprocess.run([sys.executable, "-m", "tests.resume.writer_faults", "lab", *options, "--", *lab], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def straight_lab(tmp_path_factory: pytest.TempPathFactory) -> dict:
    run_dir = tmp_path_factory.mktemp("lab") / "straight"
    done = run_lab(run_dir)
    assert done.returncode == 0 and "async rotations: 1" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_during_a_background_write_of_the_lab(straight_lab: dict, tmp_path: Path, signame: str) -> None:
    run_dir = tmp_path / "lab"
    # Signalled from inside the second save (step 8, a checkpoint every 4 steps), the writer stalled for a second.
    stopped = run_lab(run_dir, fault=f"temp-fsync:{signame}:2:1.0")
    assert stopped.returncode == PREEMPTED_EXIT_STATUS, stopped.stdout[-2000:] + stopped.stderr[-3000:]
    assert f"preempted by {signame}" in stopped.stdout
    steps, newest = checkpoints(run_dir / "checkpoints")
    assert 8 in steps and newest >= 8 and temps(run_dir / "checkpoints") == []  # the write in flight completed
    rerun = run_lab(run_dir)
    assert rerun.returncode == 0 and "resumed from" in rerun.stdout, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert temps(run_dir / "checkpoints") == []
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_params_sha256"] == straight_lab["final_params_sha256"]
    assert checkpoints(run_dir / "checkpoints")[1] == summary["optimizer_steps"] == 16
