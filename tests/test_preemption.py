"""Preemption: SIGTERM finishes the window, saves, exits 75; the rerun ends bitwise equal.

The runs use tests/resume/train_script.py (48 samples, batch 4, accumulation
4: windows of 4 iterations, 3 epochs, 9 optimizer steps). The preempted run is
a subprocess that receives a real SIGTERM, sent by itself at a chosen point so
the test does not depend on timing; the uninterrupted reference and the rerun
run in this process (the same code, about a second each).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

from engine_kit import create_trainer
from engine_kit.checkpoint import CheckpointDirectory, load_checkpoint_file
from handlers.checkpoint import CheckpointRotation
from handlers.preemption import PREEMPTED_EXIT_STATUS, Preemption
from tests.helpers import mlp, regression_batches
from tests.resume.train_script import train

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "resume" / "train_script.py"
ACCUMULATION, EVERY = 4, 5
COMMON = ["--accumulation", str(ACCUMULATION), "--every-steps", str(EVERY)]


def run_script(run_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--dir", str(run_dir), "--out", str(out), *COMMON, *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return train(tmp_path_factory.mktemp("reference"), accumulation=ACCUMULATION, every_steps=EVERY)


def newest(run_dir: Path):
    entry, payload = CheckpointDirectory(run_dir, read_only=True).load_newest_valid()
    return entry, payload


def finish_and_compare(run_dir: Path, out: Path, reference: dict) -> None:
    got = train(run_dir, accumulation=ACCUMULATION, every_steps=EVERY, resume="auto", preemption=True)
    assert got["resumed_from"]
    for key in ("losses", "params", "optimizer", "scheduler", "lr", "optimizer_steps"):
        assert got[key] == reference[key], key


def test_sigterm_saves_at_the_next_window_boundary_and_the_rerun_is_exact(tmp_path, reference):
    run_dir, out = tmp_path / "ckpt", tmp_path / "out.json"
    # Iteration 22 is inside the window 21..24 (optimizer step 6); every_steps=5 would not save at 6.
    stopped = run_script(run_dir, out, "--preemption", "--signal-at-iteration", "22")
    assert stopped.returncode == PREEMPTED_EXIT_STATUS, stopped.stderr[-3000:]
    assert not out.exists()
    entry, payload = newest(run_dir)
    assert entry.step == 6 and payload["trainer"]["iteration"] == 24
    finish_and_compare(run_dir, out, reference)


@pytest.mark.slow
def test_sigterm_during_a_save_leaves_that_checkpoint_valid_and_stops_at_a_window_boundary(tmp_path, reference):
    run_dir, out = tmp_path / "ckpt", tmp_path / "out.json"
    # The first commit is step 3's (epoch end): the signal arrives while it is being written.
    stopped = run_script(run_dir, out, "--preemption", "--signal-during-save", "1")
    assert stopped.returncode == PREEMPTED_EXIT_STATUS, stopped.stderr[-3000:]
    entry, payload = newest(run_dir)
    # Background saves (the default): the writer thread raises the signal, and the training thread may handle
    # it within the saving step or at a later window boundary; the step-3 file stays valid either way.
    assert entry.step >= 3 and payload["trainer"]["iteration"] == 4 * entry.step
    steps = [e.step for e in CheckpointDirectory(run_dir, read_only=True).entries()]
    assert steps[-1] == entry.step and (3 in steps or entry.step > 4)  # keep_last=2
    finish_and_compare(run_dir, out, reference)


@pytest.mark.slow
def test_sigterm_during_a_save_without_preemption_keeps_the_previous_checkpoint(tmp_path, reference):
    run_dir, out = tmp_path / "ckpt", tmp_path / "out.json"
    stopped = run_script(run_dir, out, "--signal-during-save", "2")  # default SIGTERM: the process dies
    assert stopped.returncode == -signal.SIGTERM
    entry, _ = newest(run_dir)
    assert entry.step == 3  # step 5's commit was interrupted: the one before is the newest valid
    finish_and_compare(run_dir, out, reference)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_signal_during_a_save_lets_the_save_finish_valid_and_stops_there(tmp_path, monkeypatch, async_save):
    # A synchronous save holds the training thread, so the run stops at the step it saved; during a background
    # save (the signal comes from the writer thread) training goes on to a later window boundary, where the
    # pending write is collected and the last checkpoint written.
    original, calls = CheckpointDirectory.commit, []

    def commit(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGTERM)  # handled before the file is written
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CheckpointDirectory, "commit", commit)
    trainer = _trainer(tmp_path, every_steps=2, keep_last=1, async_save=async_save)
    trainer.run(regression_batches(40, 4), max_epochs=2)
    stop_step = trainer.state.optimizer_steps
    # Async: the writer's signal may be handled within the saving iteration (stop at 2) or some iterations later.
    assert trainer.state.preempted == "SIGTERM" and (stop_step >= 2 if async_save else stop_step == 2)
    entries = CheckpointDirectory(tmp_path, read_only=True).entries()
    assert [e.step for e in entries] == [stop_step]
    payload = load_checkpoint_file(tmp_path / entries[0].name)  # verifies and loads
    assert payload["trainer"]["iteration"] == 2 * stop_step


def _trainer(tmp_path: Path, every_steps: int = 100, keep_last: int = 0, async_save: bool = True):
    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), F.mse_loss, accumulation_steps=2)
    rotation = CheckpointRotation(tmp_path, every_steps=every_steps, keep_last=keep_last, keep_best=1, metric="m",
                                  async_save=async_save)
    rotation.attach(trainer)
    Preemption(rotation).attach(trainer)
    return trainer


def test_handlers_are_installed_only_during_the_run_and_restored_after(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    trainer = _trainer(tmp_path)
    seen = {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda: seen.setdefault("during", signal.getsignal(signal.SIGTERM)))
    trainer.run(regression_batches(16, 4), max_epochs=1)
    assert seen["during"] not in (before[signal.SIGTERM], signal.SIG_DFL)
    assert {s: signal.getsignal(s) for s in before} == before
    assert trainer.state.preempted is None


def test_a_signal_stops_in_process_with_a_kept_checkpoint_even_with_keep_last_zero(tmp_path):
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    trainer = _trainer(tmp_path)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: e.state.iteration == 3 and signal.raise_signal(signal.SIGINT))
    trainer.run(regression_batches(40, 4), max_epochs=2)  # 10 iterations per epoch
    assert trainer.state.preempted == "SIGINT"
    assert trainer.state.iteration == 4 and trainer.state.optimizer_steps == 2  # the window 3..4 was finished
    assert [e.step for e in CheckpointDirectory(tmp_path, read_only=True).entries()] == [2]
    assert "preempted by SIGINT at optimizer step 2" in trainer.state.stopped_by
    assert signal.getsignal(signal.SIGINT) is before


def test_outside_the_main_thread_the_run_warns_and_installs_nothing(tmp_path):
    trainer = _trainer(tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    caught = []

    def run():
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            trainer.run(regression_batches(8, 4), max_epochs=1)
        caught.extend(str(w.message) for w in got)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert any("not in the main thread" in m for m in caught)
    assert signal.getsignal(signal.SIGTERM) == before


def test_an_error_in_the_run_still_propagates_and_the_handlers_come_back(tmp_path):
    from engine_kit.errors import HandlerError

    before = signal.getsignal(signal.SIGTERM)
    trainer = _trainer(tmp_path)

    def fail(engine):
        if engine.state.iteration == 3:
            raise ValueError("boom")

    trainer.add_event_handler(Events.ITERATION_COMPLETED, fail)
    with pytest.raises(HandlerError, match="boom"):
        trainer.run(regression_batches(16, 4), max_epochs=1)
    assert signal.getsignal(signal.SIGTERM) == before
