"""CheckpointRotation(async_save=True): the same checkpoints as synchronous saves, written off the training thread."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from engine_kit import CheckpointWriteError, StepEvents, create_trainer
from engine_kit.errors import HandlerError
import engine_kit.training_state as training_state_module
from engine_kit.checkpoint import CheckpointDirectory, directory as directory_module, streaming as streaming_module, verify_checkpoint_file
from engine_kit.checkpoint.commands import verify_command
from engine_kit.checkpoint.snapshot import SnapshotBuffers
from engine_kit.checkpoint.background import BackgroundSaves
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


def _async_sgd_run(folder: Path, **rotation_options: object) -> tuple[Engine, CheckpointRotation]:
    """A seeded SGD trainer on the small MLP with an asynchronous ``CheckpointRotation`` attached."""
    torch.manual_seed(0)
    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), F.mse_loss)
    rotation = CheckpointRotation(folder, async_save=True, **rotation_options)
    rotation.attach(trainer)
    return trainer, rotation


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
    trainer, _ = _async_sgd_run(tmp_path, every_steps=2, keep_last=1)
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
    trainer, rotation = _async_sgd_run(tmp_path, every_steps=1, keep_last=1)

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


@pytest.mark.parametrize(("point", "newest"), [
    pytest.param("link", 2, marks=pytest.mark.slow), ("replace", 3), pytest.param("fsync", 3, marks=pytest.mark.slow),
])
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


# -- the write itself: same bytes, verified, snapshots consistent and reused ------------------------------------


def _fixed_clock_run(folder: Path, monkeypatch: pytest.MonkeyPatch, **rotation_options: object) -> CheckpointRotation:
    """A run whose checkpoints differ only if the write path does: fixed clock, fixed run id, BatchNorm buffers."""
    monkeypatch.setattr(training_state_module.time, "time", lambda: 1.0e9)
    monkeypatch.setattr(directory_module.time, "time", lambda: 1.0e9)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    trainer = create_trainer(model, torch.optim.AdamW(model.parameters(), lr=0.01), F.mse_loss)
    mode = rotation_options.pop("snapshot_mode", "inline")
    rotation = CheckpointRotation(folder, every_steps=2, keep_last=3, **rotation_options)
    rotation.run_id = "fixed-run-id"
    _set_capture(rotation, mode)
    rotation.attach(trainer)
    trainer.run(regression_batches(24, 4), max_epochs=1)
    return rotation


def _set_capture(rotation: CheckpointRotation, mode: str) -> None:
    """"inline": the default for a small CPU state (serialized on the training thread); "copy", "fence": snapshot modes."""
    if mode == "inline":
        assert rotation.snapshot_mode == "copy" and rotation.inline_limit_bytes > 0
        return
    rotation.snapshot_mode = mode
    rotation.inline_limit_bytes = 0  # this small state would otherwise be serialized inline


@pytest.mark.parametrize("mode", ["inline", "copy", "fence"])
def test_async_files_are_byte_identical_to_sync_files_and_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    _fixed_clock_run(tmp_path / "sync", monkeypatch, async_save=False)
    _fixed_clock_run(tmp_path / "async", monkeypatch, async_save=True, snapshot_mode=mode)
    names = sorted(p.name for p in (tmp_path / "sync").glob("*.ekpt"))
    assert names == sorted(p.name for p in (tmp_path / "async").glob("*.ekpt")) and len(names) == 3
    for name in names:
        assert (tmp_path / "sync" / name).read_bytes() == (tmp_path / "async" / name).read_bytes(), name
        assert verify_checkpoint_file(tmp_path / "async" / name).record.name == name
    assert not list((tmp_path / "async").glob(".ek-tmp-*"))
    assert verify_command(str(tmp_path / "async")) == 0  # what `engine-kit ckpt verify DIR` runs


def test_snapshot_bytes_equal_the_live_payload_bytes_with_tied_weights_and_views() -> None:
    embedding = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = embedding.weight  # tied: one storage, saved once
    model = torch.nn.ModuleDict({"embedding": embedding, "head": head, "norm": torch.nn.BatchNorm1d(3)})
    payload = {"model": model.state_dict(), "view": torch.arange(10.0)[2:7:2], "rng": torch.get_rng_state(), "nested": [1, ("a", 2.5)]}
    payload["again"] = payload["nested"]  # a container referenced twice stays one container
    live, copied = io.BytesIO(), io.BytesIO()
    torch.save(payload, live)
    snapshot = SnapshotBuffers().capture(payload)
    torch.save(snapshot.payload, copied)
    assert live.getvalue() == copied.getvalue()
    shared = snapshot.payload["model"]
    assert shared["embedding.weight"].untyped_storage().data_ptr() == shared["head.weight"].untyped_storage().data_ptr()


@pytest.mark.parametrize("mode", ["inline", "copy", "fence"])
def test_snapshot_buffers_are_reused_and_a_snapshot_is_not_disturbed_by_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """A slow writer: training runs on while the file is written, yet the file holds the state of its save step.

    In fence mode the weights are not copied: the next optimizer step waits until they are serialized.
    """
    real_write = streaming_module.write_sealed

    def slow_write(*args: object) -> object:
        time.sleep(0.2)
        return real_write(*args)

    monkeypatch.setattr(streaming_module, "write_sealed", slow_write)
    torch.manual_seed(0)
    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.AdamW(model.parameters(), lr=0.1), F.mse_loss)
    rotation = CheckpointRotation(tmp_path, every_steps=3, at_epoch_end=False, keep_last=6, async_save=True)
    _set_capture(rotation, mode)
    at_save: dict[int, dict[str, torch.Tensor]] = {}
    storages: list[int] = []

    @trainer.on(Events.ITERATION_COMPLETED)  # before the rotation's handler: the state it is about to capture
    def remember(engine: object) -> None:
        if engine.state.optimizer_steps % 3 == 0:
            at_save[engine.state.optimizer_steps] = {k: v.clone() for k, v in model.state_dict().items()}

    rotation.attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: storages.extend(
        b.data_ptr() for b in rotation._snapshots._buffers) if e.state.optimizer_steps % 3 == 0 else None)
    trainer.run(regression_batches(40, 2), max_epochs=1)  # 20 steps: saves at 3, 6, ..., 18
    reader = CheckpointDirectory(tmp_path, read_only=True)
    entries = reader.entries()
    assert [e.step for e in entries] == [3, 6, 9, 12, 15, 18]
    for entry in entries:
        saved = reader.load(entry)["model"]
        assert all(torch.equal(saved[k], at_save[entry.step][k]) for k in saved), entry.step
    # The same host buffers serve every save: allocated at the first, reused by the next five.
    per_save = len(rotation._snapshots._buffers)
    assert rotation._snapshots.allocations == per_save and len(set(storages)) == per_save
    # Inline: the archive serialized at the save step is the snapshot; the copy modes use buffers.
    assert (per_save == 0) == (mode == "inline")
    assert rotation.waits >= 1 and trainer.state.checkpoint_waits == rotation.waits  # 0.2 s writes, saves 3 steps apart
    if mode == "fence":
        assert rotation._fence.waited_s > 0 and not rotation._fence._hooked  # held steps back; disarmed at the end


def test_interrupt_and_keyboard_interrupt_wait_for_the_write_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = streaming_module.write_sealed
    monkeypatch.setattr(streaming_module, "write_sealed", lambda *args: (time.sleep(0.3), real_write(*args))[1])
    trainer, rotation = _async_sgd_run(tmp_path, every_steps=2, at_epoch_end=False, keep_last=5)
    announced: list[int] = []
    trainer.add_event_handler(StepEvents.CHECKPOINT_SAVED, lambda e: announced.append(e.state.last_checkpoint_step))

    @trainer.on(Events.ITERATION_COMPLETED)
    def stop(engine: object) -> None:
        if engine.state.optimizer_steps == 2:
            assert rotation._background.writing
            engine.interrupt()
        if engine.state.optimizer_steps == 4:
            assert rotation._background.writing
            raise KeyboardInterrupt

    trainer.run(regression_batches(40, 4), max_epochs=1)
    assert announced == [2] and not rotation._background.pending  # run() returned once the file was durable
    with pytest.raises(KeyboardInterrupt):
        trainer.run(regression_batches(40, 4), max_epochs=1)  # resumes after the interrupt
    assert not rotation._background.pending
    assert [e.step for e in CheckpointDirectory(tmp_path, read_only=True).entries()] == [2, 4]


def test_a_failure_deferred_for_the_ranks_is_raised_at_the_next_settle(tmp_path: Path) -> None:
    saves = BackgroundSaves(defer_failures=True)
    saves.submit(lambda serialized: (_ for _ in ()).throw(OSError(5, "Input/output error")), lambda: None, path=str(tmp_path / "a.ekpt"))
    while saves.writing:
        time.sleep(0.01)
    saves.poll()  # multi-process: not at an iteration, where the other ranks could not follow
    assert saves.pending
    with pytest.raises(CheckpointWriteError, match=r"a\.ekpt.*Input/output error.*To fix:"):
        saves.settle()
    assert not saves.pending


# -- two processes: rank 0 writes in the background, a failure reaches every rank ------------------------------


def _two_rank_worker(local_rank: int, folder: str) -> None:
    import ignite.distributed as idist

    from engine_kit.data_order import ResumableLoader
    from engine_kit.errors import RankAgreementError

    rank = idist.get_rank()
    real_write = streaming_module.write_sealed
    calls: list[int] = []

    def first_write_fails(*args: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real_write(*args)

    streaming_module.write_sealed = first_write_fails  # this process only
    torch.manual_seed(0)
    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), F.mse_loss)
    rotation = CheckpointRotation(os.path.join(folder, "ckpts"), every_steps=2, at_epoch_end=False, keep_last=2)
    rotation.attach(trainer)
    gen = torch.Generator().manual_seed(5)
    samples = [(torch.randn(2, generator=gen), torch.randn(1, generator=gen)) for _ in range(32)]  # the same on every rank
    data = ResumableLoader(samples, batch_size=2, shuffle=False, seed=0)  # 8 batches per rank
    outcome: dict = {"rank": rank}
    try:
        trainer.run(data, max_epochs=1)
    except HandlerError as exc:
        cause = exc.__cause__
        outcome.update(error=type(cause).__name__, message=str(cause), iteration=trainer.state.iteration,
                       async_on=rotation._background is not None)
    except RankAgreementError as exc:
        outcome.update(error=type(exc).__name__, message=str(exc), iteration=trainer.state.iteration)
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(outcome, f)


@pytest.mark.timeout(240)
def test_two_ranks_a_background_failure_reaches_every_rank_at_the_next_save(tmp_path: Path) -> None:
    from tests.distributed.spawn import spawn_two

    spawn_two(_two_rank_worker, str(tmp_path))
    outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for outcome in outcomes:
        # Rank 0's step-2 write failed; both ranks stop together at the step-4 save's agreement, none hangs.
        assert outcome.get("error") == "RankAgreementError", outcome
        assert "No space left on device" in outcome["message"] and "step00000002" in outcome["message"]
        assert outcome["iteration"] == 4
    assert outcomes[0]["async_on"] is True


_ESCAPING_DRIVER = r"""
import sys, time
from engine_kit.checkpoint.background import BackgroundSaves

def slow_failing_write(serialized):
    time.sleep(0.5)
    raise OSError(5, "Input/output error")

saves = BackgroundSaves()
saves.submit(slow_failing_write, lambda: print("announced"), path=sys.argv[1])
raise KeyboardInterrupt  # escapes everything while the write is in flight
"""


def test_a_write_in_flight_when_the_process_exits_is_awaited_and_its_failure_printed(tmp_path: Path) -> None:
    path = str(tmp_path / "step00000004-00002.ekpt")
    result = subprocess.run([sys.executable, "-c", _ESCAPING_DRIVER, path], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "KeyboardInterrupt" in result.stderr
    # Never lost: the exit waited for the writer and printed its outcome, naming the file and the cause.
    assert f"waiting up to 120 s for the checkpoint write of {path!r}" in result.stderr
    assert "The background write of the checkpoint" in result.stderr and "Input/output error" in result.stderr


def test_a_failed_write_during_a_failing_run_is_a_note_on_the_run_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def slow_failing_write(*args: object) -> None:
        time.sleep(0.2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(streaming_module, "write_sealed", slow_failing_write)
    trainer, rotation = _async_sgd_run(tmp_path, every_steps=1, keep_last=1)

    @trainer.on(Events.ITERATION_COMPLETED)
    def crash(engine: object) -> None:
        if engine.state.optimizer_steps == 1:
            raise RuntimeError("boom")  # while the step-1 write is still in flight

    with pytest.raises(RuntimeError, match="boom") as caught:  # the first error wins
        trainer.run(regression_batches(8, 4), max_epochs=1)
    notes = " ".join(getattr(caught.value.__cause__ or caught.value, "__notes__", []) + getattr(caught.value, "__notes__", []))
    assert "CheckpointWriteError" in notes and "step00000001" in notes and "No space left on device" in notes
    assert not rotation._background.pending and not list(tmp_path.glob(".ek-tmp-*"))


def test_an_unknown_snapshot_mode_is_refused_when_set(tmp_path: Path) -> None:
    rotation = CheckpointRotation(tmp_path, every_steps=2, keep_last=1)
    with pytest.raises(ValueError, match="snapshot_mode='fenced'.*To fix"):
        rotation.snapshot_mode = "fenced"
    assert rotation.snapshot_mode == "copy"
    rotation.snapshot_mode = "fence"
    assert rotation.snapshot_mode == "fence"


def test_the_run_end_lets_the_writer_thread_exit(tmp_path: Path) -> None:
    from engine_kit.checkpoint import background as background_module

    trainer, rotation = _async_sgd_run(tmp_path, every_steps=2, keep_last=1)
    writers: list[threading.Thread] = []
    trainer.add_event_handler(StepEvents.CHECKPOINT_SAVED, lambda engine: writers.append(rotation._background._writer._thread))
    trainer.run(regression_batches(8, 4), max_epochs=2)
    (writer,) = {thread for thread in writers if thread is not None}  # one writer served every save
    writer.join(background_module.IDLE_EXIT_S / 2)  # close() at COMPLETED told it to exit: no idle wait
    assert not writer.is_alive()


def test_a_bad_inline_limit_is_refused_when_set(tmp_path: Path) -> None:
    rotation = CheckpointRotation(tmp_path, every_steps=2)
    for bad in (-1, 1.5, "4MB", True):
        with pytest.raises((TypeError, ValueError), match="inline_limit_bytes.*To fix"):
            rotation.inline_limit_bytes = bad
    rotation.inline_limit_bytes = 0  # never serialize on the training thread
    assert rotation.inline_limit_bytes == 0
