"""CheckpointRotation(async_save=True): the same checkpoints as synchronous saves, written off the training thread."""

from __future__ import annotations

import os
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

from engine_kit import CheckpointWriteError, StepEvents, create_trainer
from engine_kit.errors import HandlerError
from engine_kit.checkpoint import CheckpointDirectory, directory as directory_module
from handlers.checkpoint import CheckpointRotation
from tests.helpers import mlp, regression_batches

ROOT = Path(__file__).resolve().parents[2]


def _run(folder: Path, *, async_save: bool, epochs: int = 3, resume: str | None = None) -> tuple[dict, list[tuple[str, bool]]]:
    torch.manual_seed(0)
    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.AdamW(model.parameters(), lr=0.01), F.mse_loss)
    rotation = CheckpointRotation(folder, every_steps=2, keep_last=2, resume=resume, async_save=async_save)
    rotation.attach(trainer)
    saved: list[tuple[str, bool]] = []
    # Where CHECKPOINT_SAVED fires, and whether the file it names is already complete then.
    trainer.add_event_handler(
        StepEvents.CHECKPOINT_SAVED,
        lambda engine: saved.append((threading.current_thread().name, os.path.isfile(engine.state.last_checkpoint))),
    )
    trainer.run(regression_batches(8, 4), max_epochs=epochs)
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}, saved


def _payloads(folder: Path) -> list[tuple[int, dict]]:
    reader = CheckpointDirectory(folder, read_only=True)
    return [(entry.step, reader.load(entry)) for entry in reader.entries()]


def _same(a: object, b: object) -> bool:
    """Bitwise equality of nested payloads (tensors by bytes and dtype), ignoring the run's identity and times."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
    if isinstance(a, dict):
        skip = {"run_id", "created", "time", "saved_at"}
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a if k not in skip)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def test_async_saves_write_the_same_checkpoints_and_resume_the_same(tmp_path: Path) -> None:
    sync_model, sync_saved = _run(tmp_path / "sync", async_save=False)
    async_model, async_saved = _run(tmp_path / "async", async_save=True)
    assert all(_same(sync_model[k], async_model[k]) for k in sync_model)
    sync_files, async_files = _payloads(tmp_path / "sync"), _payloads(tmp_path / "async")
    assert [step for step, _ in sync_files] == [step for step, _ in async_files] == [4, 6]
    for (_, expected), (_, actual) in zip(sync_files, async_files):
        assert _same(expected["model"], actual["model"]) and _same(expected["optimizer"], actual["optimizer"])
    # CHECKPOINT_SAVED fires on the training thread, once per save, with the file complete.
    main = threading.current_thread().name
    assert len(async_saved) == len(sync_saved) == 3 and all(entry == (main, True) for entry in async_saved)
    # Resuming from the async run's checkpoint continues exactly like resuming from the sync run's.
    resumed_sync, _ = _run(tmp_path / "sync", async_save=False, epochs=5, resume="auto")
    resumed_async, _ = _run(tmp_path / "async", async_save=True, epochs=5, resume="auto")
    assert all(_same(resumed_sync[k], resumed_async[k]) for k in resumed_sync)


def test_a_failed_background_save_is_raised_on_the_training_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(path: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(directory_module, "fsync_directory", failing)
    torch.manual_seed(0)
    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), F.mse_loss)
    rotation = CheckpointRotation(tmp_path, every_steps=2, keep_last=1, async_save=True)
    rotation.attach(trainer)
    iterations: list[int] = []
    trainer.add_event_handler(StepEvents.CHECKPOINT_SAVED, lambda engine: pytest.fail("a failed save was announced"))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: iterations.append(e.state.iteration))
    with pytest.raises(HandlerError) as caught:  # engine_kit names the handler; the typed error is the cause
        trainer.run(regression_batches(8, 4), max_epochs=2)
    error = caught.value.__cause__
    assert isinstance(error, CheckpointWriteError) and "background write of the checkpoint" in str(error) and str(tmp_path) in str(error) and "No space left" in str(error)
    assert isinstance(error.__cause__, CheckpointWriteError)  # the writer thread's own error, with its OSError
    assert iterations[-1] <= 4  # raised at an iteration after the failed save (step 2), not at the run's end


def test_the_run_waits_for_the_pending_save_on_an_error(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), F.mse_loss)
    rotation = CheckpointRotation(tmp_path, every_steps=1, keep_last=1, async_save=True)
    rotation.attach(trainer)

    @trainer.on(Events.ITERATION_COMPLETED)  # after the rotation's handler: the step-1 save was just handed over
    def crash(engine: object) -> None:
        if engine.state.optimizer_steps == 1:
            assert rotation._background.pending
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):  # the run's own error, not the wait
        trainer.run(regression_batches(8, 4), max_epochs=2)
    assert not rotation._background.pending  # collected before the error left run()
    assert [e.step for e in CheckpointDirectory(tmp_path, read_only=True).entries()] == [1]


_KILL_DRIVER = r"""
import os, signal, sys, threading
import torch, torch.nn.functional as F
torch.set_num_threads(1)
from engine_kit import create_trainer
from handlers.checkpoint import CheckpointRotation
from tests.helpers import mlp, regression_batches

folder, point, at_save = sys.argv[1], sys.argv[2], int(sys.argv[3])
real = {"link": os.link, "replace": os.replace, "fsync": os.fsync}
commits = 0

def killer(name):
    def call(*args):
        global commits
        on_writer = threading.current_thread().name.startswith("engine_kit-checkpoint")
        if on_writer and name == "link":
            commits += 1
        if on_writer and commits == at_save and name == point:
            os.kill(os.getpid(), signal.SIGKILL)
        return real[name](*args)
    return call

for name in real:
    setattr(os, name, killer(name))
torch.manual_seed(0)
model = mlp(in_features=2, out=1)
trainer = create_trainer(model, torch.optim.AdamW(model.parameters(), lr=0.01), F.mse_loss)
CheckpointRotation(folder, every_steps=1, keep_last=1, async_save=True).attach(trainer)
trainer.run(regression_batches(8, 4), max_epochs=3)
"""


@pytest.mark.parametrize(("point", "newest"), [("link", 2), ("replace", 3), ("fsync", 3)])
def test_sigkill_during_an_async_save_leaves_a_valid_newest_checkpoint(tmp_path: Path, point: str, newest: int) -> None:
    """Killed on the writer thread during the third save (step 3): before its link, before the index's rename, at the directory fsync."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", _KILL_DRIVER, str(tmp_path), point, "3"], cwd=ROOT, env=env, timeout=120,
                            capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the adoption of a file killed before its index update
        entry, payload = CheckpointDirectory(tmp_path, read_only=True).load_newest_valid()
    assert entry.step == newest and isinstance(payload["model"], dict)
