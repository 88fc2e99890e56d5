"""CheckpointRotation: best-k/last-k, restarts, vetoes, mismatches, malicious files."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

import engine_kit.trainer as trainer_module
from engine_kit import CheckpointCorruptError, CheckpointMismatchError, CheckpointWriteError, StepEvents, create_trainer
from engine_kit.checkpoint import CheckpointDirectory, load_checkpoint_file
from engine_kit.checkpoint.fileformat import make_trailer
from engine_kit.precision import Precision
from engine_kit.stateful import add_save_veto
from engine_kit.training_state import capture_training_state, restore_training_state
from handlers.checkpoint import CheckpointRotation
from handlers.events import ValidationEvents, register_validation_events
from tests.helpers import assert_same, mlp, regression_batches

ROOT = Path(__file__).resolve().parents[2]
SCORES = [5, 2, 4, 3, 7, 1, 10, float("nan"), float("inf"), 2]


def scripted_trainer(scores, model=None):
    """One batch per epoch; after each epoch a scripted 'validation' metric."""
    model = model or mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), F.mse_loss)
    register_validation_events(trainer)

    @trainer.on(Events.EPOCH_COMPLETED)
    def validate(engine):
        engine.state.val_metrics = {"score": scores[engine.state.epoch - 1]}
        engine.state.validations += 1
        engine.fire_event(ValidationEvents.VALIDATION_COMPLETED)

    return trainer


def run_scripted(directory, scores, *, mode, epochs, resume=None):
    trainer = scripted_trainer(scores)
    rotation = CheckpointRotation(directory, keep_last=1, keep_best=3, metric="score", mode=mode, resume=resume)
    rotation.attach(trainer)
    trainer.run(regression_batches(4, 4), max_epochs=epochs)
    return trainer, rotation


def kept(directory):
    return {(e.step, None if e.metric is None or math.isnan(e.metric) else e.metric, tuple(sorted(e.tags)))
            for e in CheckpointDirectory(directory, read_only=True).entries()}


@pytest.mark.parametrize("mode, best_scores", [("max", [10.0, 7.0, 5.0]), ("min", [1.0, 2.0, 2.0])])
def test_best_k_and_last_k_with_a_restart_match_an_uninterrupted_run(tmp_path, mode, best_scores):
    run_scripted(tmp_path / "full", SCORES, mode=mode, epochs=10)
    run_scripted(tmp_path / "restart", SCORES, mode=mode, epochs=5)
    trainer, rotation = run_scripted(tmp_path / "restart", SCORES, mode=mode, epochs=10, resume="auto")
    assert trainer.state.resumed_from is not None
    assert kept(tmp_path / "full") == kept(tmp_path / "restart")
    entries = kept(tmp_path / "full")
    best = [e for e in entries if "best" in e[2]]
    assert sorted(e[1] for e in best) == sorted(best_scores)  # NaN and inf are never best
    last = [e for e in entries if "last" in e[2]]
    assert [e[0] for e in last] == [10]  # the newest is kept as "last"
    if mode == "min":
        # The final checkpoint (score 2, a tie with the older 2) is both best and last: one file.
        assert (10, 2.0, ("best", "last")) in entries or (10, 2.0, ("last",)) in entries
    on_disk = sorted(p.name for p in (tmp_path / "full").glob("*.ekpt"))
    assert len(on_disk) == len(entries)


def test_best_survives_last_k_rotation(tmp_path):
    scores = [9, 1, 1, 1, 1, 1]
    run_scripted(tmp_path, scores, mode="max", epochs=6)
    entries = kept(tmp_path)
    assert (1, 9.0, ("best",)) in entries


@pytest.mark.parametrize("async_save", [False, True])
def test_checkpoint_saved_event_and_every_steps(tmp_path, async_save):
    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), F.mse_loss, accumulation_steps=2)
    saved = []
    # A background save is announced once durable, maybe a few iterations later: the step it captured is its own.
    trainer.add_event_handler(StepEvents.CHECKPOINT_SAVED, lambda e: saved.append((e.state.last_checkpoint_step, e.state.checkpoints_saved)))
    CheckpointRotation(tmp_path, every_steps=2, at_epoch_end=True, keep_last=10, async_save=async_save).attach(trainer)
    trainer.run(regression_batches(40, 4), max_epochs=1)  # 10 batches -> 5 steps
    # Steps 2 and 4 mid-epoch; step 5 at epoch end; the event's counter is the save's own number.
    assert saved == [(2, 1), (4, 2), (5, 3)]
    assert trainer.state.checkpoints_saved == 3
    # Always at a window boundary: what each file captured.
    reader = CheckpointDirectory(tmp_path, read_only=True)
    assert [reader.load(e)["trainer"]["window_position"] for e in reader.entries()] == [0, 0, 0]


def test_save_on_the_last_iteration_waits_for_epoch_end(tmp_path):
    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), F.mse_loss)
    order = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda: order.append("epoch-end handler"))
    CheckpointRotation(tmp_path, every_steps=4, at_epoch_end=False, keep_last=5).attach(trainer)
    trainer.add_event_handler(StepEvents.CHECKPOINT_SAVED, lambda: order.append("saved"))
    trainer.run(regression_batches(16, 4), max_epochs=1)  # step 4 is the epoch's last iteration
    assert order == ["epoch-end handler", "saved"]


def test_a_vetoed_save_is_skipped(tmp_path):
    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), F.mse_loss)
    add_save_veto(trainer, lambda e: "non-finite loss" if e.state.optimizer_steps >= 3 else None)
    CheckpointRotation(tmp_path, every_steps=1, keep_last=10).attach(trainer)
    with pytest.warns(UserWarning, match="not saving at step 3: non-finite loss"):
        trainer.run(regression_batches(20, 4), max_epochs=1)
    assert [e.step for e in CheckpointDirectory(tmp_path, read_only=True).entries()] == [1, 2]


def test_unwritable_directory_fails_at_construction(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointWriteError, match="To fix:"):
        CheckpointRotation(blocker / "ckpts")


def test_second_writer_on_the_same_directory_is_refused(tmp_path):
    first = CheckpointRotation(tmp_path)
    with pytest.raises(CheckpointWriteError):
        CheckpointRotation(tmp_path)
    first.close()
    CheckpointRotation(tmp_path).close()


def trained_payload(tmp_path, model=None, optimizer_cls=torch.optim.SGD):
    model = model or mlp(in_features=2, out=1)
    trainer = create_trainer(model, optimizer_cls(model.parameters(), lr=0.01), F.mse_loss)
    CheckpointRotation(tmp_path, keep_last=1).attach(trainer)
    trainer.run(regression_batches(8, 4), max_epochs=1)
    entry = CheckpointDirectory(tmp_path, read_only=True).entries()[-1]
    return tmp_path / entry.name


def fresh_trainer(model, optimizer_cls=torch.optim.SGD, **kwargs):
    return create_trainer(model, optimizer_cls(model.parameters(), lr=0.01), F.mse_loss, **kwargs)


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "model, optimizer_cls, pattern",
    [
        (lambda: mlp(in_features=2, hidden=5, out=1), torch.optim.SGD, r"model\['0.weight'\]: checkpoint \(8, 2\) vs live \(5, 2\)"),
        (lambda: torch.nn.Sequential(torch.nn.Linear(2, 1)), torch.optim.SGD, r"unexpected model keys in the checkpoint"),
        (lambda: mlp(in_features=2, out=1), torch.optim.Adam, r"optimizer: checkpoint SGD .* vs live Adam"),
        (lambda: mlp(in_features=2, out=1), torch.optim.AdamW, r"optimizer: checkpoint SGD .* vs live AdamW"),
    ],
)
def test_mismatch_is_reported_before_anything_is_applied(tmp_path, model, optimizer_cls, pattern):
    path = trained_payload(tmp_path)
    live = model()
    before = snapshot(live)
    trainer = fresh_trainer(live, optimizer_cls)
    with pytest.raises(CheckpointMismatchError, match=pattern):
        restore_training_state(trainer, load_checkpoint_file(path))
    assert all(torch.equal(a, b) for a, b in zip(before, live.parameters()))


def test_adam_to_sgd_is_refused(tmp_path):
    path = trained_payload(tmp_path, optimizer_cls=torch.optim.Adam)
    with pytest.raises(CheckpointMismatchError, match="checkpoint Adam .* vs live SGD"):
        restore_training_state(fresh_trainer(mlp(in_features=2, out=1)), load_checkpoint_file(path))


def test_unknown_format_version_is_refused(tmp_path):
    payload = load_checkpoint_file(trained_payload(tmp_path))
    payload["meta"]["format_version"] = 99
    with pytest.raises(CheckpointMismatchError, match="format_version 99"):
        restore_training_state(fresh_trainer(mlp(in_features=2, out=1)), payload)


def test_fp16_resume_without_scaler_state_is_refused(tmp_path, monkeypatch):
    payload = load_checkpoint_file(trained_payload(tmp_path))  # an fp32 run: empty scaler state
    monkeypatch.setattr(trainer_module, "resolve_precision", lambda p, d: Precision("fp16", "cpu"))
    trainer = fresh_trainer(mlp(in_features=2, out=1), precision="fp16")
    with pytest.raises(CheckpointMismatchError, match="GradScaler but the checkpoint .* has no scaler state"):
        restore_training_state(trainer, payload)
    restore_training_state(trainer, payload, strict=False)  # explicit opt-in starts a fresh scale


def test_load_then_save_round_trip_is_idempotent(tmp_path):
    payload = load_checkpoint_file(trained_payload(tmp_path))
    model = mlp(in_features=2, out=1, seed=5)
    trainer = fresh_trainer(model)
    register_validation_events(trainer)
    trainer.state.dataloader = None
    restore_training_state(trainer, payload)
    again = capture_training_state(trainer)
    for section in ("model", "optimizer", "scaler", "trainer"):
        assert_same(payload[section], again[section])


class _Boom:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def plant_malicious_checkpoint(directory: Path, sentinel: Path) -> Path:
    """A registered, correctly sealed checkpoint whose pickle would create `sentinel`."""
    good = trained_payload(directory)
    import io
    buffer = io.BytesIO()
    torch.save({"meta": {"format_version": 1}, "model": _Boom(str(sentinel))}, buffer)
    zip_bytes = buffer.getvalue()
    evil = directory / "step00000099-00099.ekpt"
    evil.write_bytes(zip_bytes + make_trailer(zip_bytes))
    from engine_kit.checkpoint import read_registry, sha256_file, write_registry, RegistryEntry
    entries = read_registry(directory).entries
    entries.append(RegistryEntry(evil.name, sha256_file(evil), evil.stat().st_size, 99, 9, ("last",), None, 0.0))
    write_registry(directory, entries)
    assert good.exists()
    return evil


def test_malicious_checkpoint_never_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    sentinel = tmp_path / "PWNED"
    directory = tmp_path / "ckpts"
    evil = plant_malicious_checkpoint(directory, sentinel)
    evil_copy = tmp_path / "copied-away.ekpt"
    evil_copy.write_bytes(evil.read_bytes())
    with pytest.raises(CheckpointCorruptError):
        load_checkpoint_file(evil)
    # resume="auto" refuses it and falls back to the good checkpoint, with one warning.
    trainer = fresh_trainer(mlp(in_features=2, out=1))
    CheckpointRotation(directory, keep_last=1, resume="auto").attach(trainer)
    with pytest.warns(UserWarning, match="skipped corrupt checkpoint"):
        trainer.run(regression_batches(8, 4), max_epochs=1)
    assert trainer.state.resumed_from and "step00000099" not in trainer.state.resumed_from
    # An explicit path is refused outright.
    trainer = fresh_trainer(mlp(in_features=2, out=1))
    CheckpointRotation(tmp_path / "other", resume=evil_copy).attach(trainer)
    with pytest.raises(Exception, match="unusable|refused|carries"):
        trainer.run(regression_batches(8, 4), max_epochs=1)
    # The CLI refuses it too (in a subprocess, with the variable set).
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "engine_kit.cli", "ckpt", "verify", str(evil_copy)],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 1 and result.stdout.startswith("INVALID")
    inspect = subprocess.run([sys.executable, "-m", "engine_kit.cli", "ckpt", "inspect", str(evil_copy)],
                             capture_output=True, text=True, env=env, cwd=ROOT)
    assert inspect.returncode == 1
    assert not sentinel.exists()


def run_best_only(tmp_path, scores, keep_best, n_samples):
    """Validate every 2 optimizer steps with scripted scores; best-only rotation; the save steps."""
    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), F.mse_loss)
    register_validation_events(trainer)
    scores = iter(scores)

    @trainer.on(StepEvents.OPTIMIZER_STEP_COMPLETED(every=2))
    def validate(engine):
        engine.state.val_metrics = {"acc": next(scores)}
        engine.state.validations += 1
        engine.fire_event(ValidationEvents.VALIDATION_COMPLETED)

    CheckpointRotation(tmp_path, at_epoch_end=False, keep_last=0, keep_best=keep_best, metric="acc").attach(trainer)
    saved_at = []
    trainer.add_event_handler(StepEvents.CHECKPOINT_SAVED, lambda e: saved_at.append(e.state.last_checkpoint_step))
    trainer.run(regression_batches(n_samples, 4), max_epochs=1)
    return saved_at, CheckpointDirectory(tmp_path, read_only=True).entries()


def test_a_new_best_validation_triggers_a_save_between_scheduled_ones(tmp_path):
    # 11 steps: validations at 2, 4, 6, 8, 10.
    saved_at, entries = run_best_only(tmp_path, [0.5, 0.4, 0.7, 0.6, 0.9], keep_best=2, n_samples=44)
    assert saved_at == [2, 4, 6, 8, 10]  # every score entered the best two when it came
    # Those pushed out of the best two later (0.4, 0.5, 0.6) were deleted.
    assert [(e.step, e.metric) for e in entries] == [(6, 0.7), (10, 0.9)]
    assert all(e.tags == ("best",) for e in entries)


def test_a_validation_that_is_not_among_the_best_saves_nothing(tmp_path):
    # 9 steps: validations at 2, 4, 6, 8.
    saved_at, entries = run_best_only(tmp_path, [0.9, 0.8, 0.7, 0.95], keep_best=1, n_samples=36)
    assert saved_at == [2, 8]
    assert [(e.step, e.metric) for e in entries] == [(8, 0.95)]
