"""GuardedEngine behaves as ignite documents, and still names failing handlers (first error wins)."""

from __future__ import annotations

import pytest
from ignite.engine import Events
from ignite.handlers import HandlersTimeProfiler

from engine_kit import CheckpointWriteError, GuardedEngine, HandlerError
from engine_kit.engine import cleanup_handler


def engine_over(process=lambda engine, batch: batch):
    return GuardedEngine(process)


def test_handles_and_handler_lists_hold_the_users_callable():
    engine = engine_over()

    def on_epoch(engine):
        pass

    handle = engine.add_event_handler(Events.EPOCH_COMPLETED, on_epoch)
    assert handle.handler() is on_epoch  # ignite keeps a weak reference
    assert engine._event_handlers[Events.EPOCH_COMPLETED][0][0] is on_epoch
    assert engine.has_event_handler(on_epoch, Events.EPOCH_COMPLETED)
    handle.remove()
    assert not engine.has_event_handler(on_epoch)


def test_handlers_time_profiler_names_the_users_handlers():
    engine = engine_over()
    profiler = HandlersTimeProfiler()
    profiler.attach(engine)

    def log_every_epoch(engine):
        pass

    engine.add_event_handler(Events.EPOCH_COMPLETED, log_every_epoch)
    engine.run(range(3), max_epochs=2)
    names = [row[0] for row in profiler.get_results()]
    assert any("log_every_epoch" in name for name in names)
    assert not any("Guarded" in name for name in names)


def test_a_failing_handler_is_named_with_its_event():
    engine = engine_over()

    def save_report(engine):
        raise KeyError("accuracy")

    engine.add_event_handler(Events.EPOCH_COMPLETED, save_report)
    with pytest.raises(HandlerError, match="save_report failed on event EPOCH_COMPLETED: KeyError") as info:
        engine.run(range(2))
    assert isinstance(info.value.__cause__, KeyError)
    assert info.value.handler_name.endswith("save_report") and info.value.event == "EPOCH_COMPLETED"


def test_keyboard_interrupt_idiom_ends_the_run_gracefully():
    def process(engine, batch):
        if engine.state.iteration == 3:
            raise KeyboardInterrupt
        return batch

    engine = engine_over(process)
    saved = []

    @engine.on(Events.EXCEPTION_RAISED)
    def handle_exception(engine, e):
        if isinstance(e, KeyboardInterrupt) and engine.state.iteration > 1:
            engine.terminate()
            saved.append(engine.state.iteration)
        else:
            raise e

    state = engine.run(range(10), max_epochs=1)
    assert saved == [3] and state.iteration == 3


def test_an_exception_handler_that_re_raises_is_not_blamed():
    def process(engine, batch):
        raise ValueError("bad batch")

    engine = engine_over(process)
    engine.add_event_handler(Events.EXCEPTION_RAISED, lambda engine, e: (_ for _ in ()).throw(e))
    with pytest.raises(ValueError, match="bad batch") as info:
        engine.run(range(2))
    assert not isinstance(info.value, HandlerError)
    assert not getattr(info.value, "__notes__", None)


def test_first_error_wins_when_a_cleanup_handler_fails():
    def process(engine, batch):
        raise CheckpointWriteError("no space left on device. To fix: free disk space.")

    engine = engine_over(process)
    closed = []

    @cleanup_handler
    def flush_logs(engine, error):
        raise OSError("flush failed: no space left on device")

    engine.add_event_handler(Events.EXCEPTION_RAISED, flush_logs)
    engine.add_event_handler(Events.EXCEPTION_RAISED, cleanup_handler(lambda engine, error: closed.append(1)))
    with pytest.raises(CheckpointWriteError, match="free disk space") as info:
        engine.run(range(2))
    assert any("flush_logs failed: OSError: flush failed" in note for note in info.value.__notes__)
    assert closed == [1]  # the handlers after the failing one still ran


def test_invalid_event_message_says_engine():
    with pytest.raises(ValueError, match=r"is not a valid event for this Engine\.$"):
        engine_over().add_event_handler("not-an-event", lambda: None)


def test_an_exception_handler_may_translate_the_error_on_purpose():
    def process(engine, batch):
        raise ValueError("bad batch")

    engine = engine_over(process)

    def translate(engine, e):
        raise LookupError("while reading batch 1") from e

    engine.add_event_handler(Events.EXCEPTION_RAISED, translate)
    with pytest.raises(LookupError, match="batch 1") as info:
        engine.run(range(2))
    assert isinstance(info.value.__cause__, ValueError)


def test_a_checkpoint_write_error_survives_a_failing_tensorboard_close(tmp_path, monkeypatch):
    import torch
    import torch.nn.functional as F

    from engine_kit import StepEvents, create_trainer
    from handlers import TensorBoardLogger
    from tests.helpers import mlp, regression_batches

    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss)
    logger = TensorBoardLogger(log_dir=tmp_path)
    logger.attach(trainer)

    def disk_full_close():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(logger, "close", disk_full_close)

    def save(engine):
        raise CheckpointWriteError("checkpoint step 2: no space left on device. To fix: free disk space.")

    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED(once=2), save)
    with pytest.raises(HandlerError, match="save failed on event OPTIMIZER_STEP_COMPLETED: CheckpointWriteError") as info:
        trainer.run(regression_batches(16, 4), max_epochs=1)
    assert isinstance(info.value.__cause__, CheckpointWriteError)
    assert any("TensorBoardLogger._on_exception failed: OSError" in note for note in info.value.__notes__)
