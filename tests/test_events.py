"""Where StepEvents fire, what handlers see, and user-defined events (acceptance 3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import EventEnum, Events

from engine_kit import HandlerError, StepEvents, create_trainer
from engine_kit.engine import cleanup_handler
from tests.helpers import mlp, regression_batches


def make_trainer(accumulation=1, max_norm=None, model=None):
    model = model or mlp(in_features=2, out=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, create_trainer(model, opt, F.mse_loss, accumulation_steps=accumulation, max_grad_norm=max_norm)


def test_backward_per_micro_batch_and_step_per_window():
    _, trainer = make_trainer(accumulation=4)
    counts = {e: 0 for e in StepEvents}

    def counter(event):
        return lambda: counts.__setitem__(event, counts[event] + 1)

    for event in StepEvents:
        trainer.add_event_handler(event, counter(event))
    trainer.run(regression_batches(40, 4), max_epochs=2)  # 10 batches: windows 4, 4, 2
    assert counts[StepEvents.BACKWARD_COMPLETED] == 20
    assert counts[StepEvents.GRADIENTS_READY] == 6
    assert counts[StepEvents.OPTIMIZER_STEP_COMPLETED] == 6
    assert counts[StepEvents.OPTIMIZER_STEP_SKIPPED] == 0


def test_every_filter_counts_optimizer_steps_not_iterations():
    _, trainer = make_trainer(accumulation=2)
    fired = []
    trainer.add_event_handler(
        StepEvents.OPTIMIZER_STEP_COMPLETED(every=2), lambda e: fired.append(e.state.optimizer_steps)
    )
    trainer.run(regression_batches(32, 4), max_epochs=1)  # 8 batches -> 4 steps
    assert fired == [2, 4]


def test_gradients_ready_sees_unclipped_gradients():
    batches = regression_batches(16, 4)
    model, trainer = make_trainer(accumulation=4, max_norm=1e-3)
    reference = mlp(in_features=2, out=1)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    F.mse_loss(reference(x), y).backward()
    expected = [p.grad.clone() for p in reference.parameters()]
    seen = []
    trainer.add_event_handler(
        StepEvents.GRADIENTS_READY, lambda: seen.append([p.grad.clone() for p in model.parameters()])
    )
    trainer.run(batches, max_epochs=1)
    assert len(seen) == 1
    for got, want in zip(seen[0], expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in expected]))
    assert total > 1e-3  # so the clip did shrink them after the handler ran
    assert trainer.state.output.grad_norm == pytest.approx(total.item(), rel=1e-5)


class LabEvents(EventEnum):
    """A user-defined event, fired by one handler and consumed by another."""

    HALFWAY = "halfway"


def test_user_defined_event_fired_from_a_handler():
    _, trainer = make_trainer(accumulation=2)
    trainer.register_events(*LabEvents)
    received = []

    @trainer.on(StepEvents.OPTIMIZER_STEP_COMPLETED)
    def announce(engine):
        if engine.state.optimizer_steps % 2 == 0:
            engine.fire_event(LabEvents.HALFWAY)

    trainer.add_event_handler(LabEvents.HALFWAY, lambda e: received.append(e.state.optimizer_steps))
    trainer.run(regression_batches(32, 4), max_epochs=1)
    assert received == [2, 4]


def test_handler_error_names_handler_and_event():
    _, trainer = make_trainer()

    def broken_logger(engine):
        raise KeyError("lr")

    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, broken_logger)
    with pytest.raises(HandlerError, match="broken_logger.*OPTIMIZER_STEP_COMPLETED") as info:
        trainer.run(regression_batches(8, 4), max_epochs=1)
    assert isinstance(info.value.__cause__, KeyError)


def test_cleanup_exception_handlers_do_not_swallow_errors():
    _, trainer = make_trainer()
    cleaned = []
    trainer.add_event_handler(
        Events.EXCEPTION_RAISED, cleanup_handler(lambda e, err: cleaned.append(type(err).__name__))
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda: 1 / 0)
    with pytest.raises(HandlerError, match="ZeroDivisionError"):
        trainer.run(regression_batches(8, 4), max_epochs=1)
    assert cleaned == ["HandlerError"]


def test_user_exception_handler_decides_as_in_ignite():
    # ignite: an EXCEPTION_RAISED handler that returns ends the error's course.
    _, trainer = make_trainer()
    seen = []
    trainer.add_event_handler(Events.EXCEPTION_RAISED, lambda e, err: seen.append(type(err.__cause__).__name__))
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda: 1 / 0)
    trainer.run(regression_batches(8, 4), max_epochs=1)
    assert seen == ["ZeroDivisionError"]


def test_has_and_remove_event_handler_still_work():
    _, trainer = make_trainer()

    def handler():
        pass

    handle = trainer.add_event_handler(Events.EPOCH_COMPLETED(every=2), handler)
    assert trainer.has_event_handler(handler)
    handle.remove()
    assert not trainer.has_event_handler(handler)


def test_step_started_fires_once_per_window_before_its_first_forward():
    model, trainer = make_trainer(accumulation=4)
    seen = []
    trainer.add_event_handler(StepEvents.STEP_STARTED, lambda e: seen.append((e.state.iteration, e.state.steps_started)))
    every_other = []
    trainer.add_event_handler(StepEvents.STEP_STARTED(every=2), lambda e: every_other.append(e.state.steps_started))
    trainer.run(regression_batches(40, 4), max_epochs=1)  # 10 micro-batches: windows 4, 4, 2
    assert seen == [(1, 1), (5, 2), (9, 3)]
    assert every_other == [2]
    assert trainer.state.steps_started == trainer.state.optimizer_steps == 3
