"""Whatever ends a run inside an accumulation window, the next run() starts from a closed window and
no gradients, and ends with the parameters the documented semantics predict: a graceful end
(terminate(), max_iters) steps the partial window, an exception discards it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

from engine_kit import HandlerError, create_trainer
from tests.helpers import mlp, regression_batches

LR = 0.1


def make(accumulation=4):
    model = mlp(in_features=2, out=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    return model, create_trainer(model, optimizer, F.mse_loss, accumulation_steps=accumulation)


def reference(windows, batches):
    """Plain PyTorch: one SGD step per window (1-based batch ranges) on the window's mean loss."""
    model = mlp(in_features=2, out=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for first, last in windows:
        chunk = batches[first - 1 : last]
        x = torch.cat([b[0] for b in chunk])
        y = torch.cat([b[1] for b in chunk])
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    return model


def assert_params_close(model, expected):
    for got, want in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def assert_clean(model, trainer):
    assert trainer.state.window_position == 0
    assert all(p.grad is None for p in model.parameters())


def test_terminate_mid_window_steps_the_partial_window_and_the_next_run_resumes_cleanly():
    batches = regression_batches(64, 4)  # 16 micro-batches
    model, trainer = make()
    handle = trainer.add_event_handler(Events.ITERATION_COMPLETED(once=6), lambda e: e.terminate())
    state = trainer.run(batches, max_epochs=1)
    handle.remove()
    assert (state.iteration, state.optimizer_steps) == (6, 2)  # windows 1-4 and the flushed 5-6
    assert_clean(model, trainer)
    assert_params_close(model, reference([(1, 4), (5, 6)], batches))
    trainer.run(batches)  # the terminated epoch was the last: ignite starts a new run
    assert_clean(model, trainer)
    assert_params_close(model, reference([(1, 4), (5, 6), (1, 4), (5, 8), (9, 12), (13, 16)], batches))


def test_max_iters_mid_window_steps_the_partial_window_and_a_fresh_run_starts_a_new_window():
    batches = regression_batches(64, 4)
    model, trainer = make()
    state = trainer.run(batches, max_iters=6)
    assert state.optimizer_steps == 2
    assert_clean(model, trainer)
    trainer.run(batches, max_iters=8)  # ignite continues to iteration 8: the list restarts
    assert_clean(model, trainer)
    assert_params_close(model, reference([(1, 4), (5, 6), (1, 2)], batches))


def test_an_exception_mid_window_discards_it_and_the_next_run_resumes_after_it():
    batches = regression_batches(64, 4)
    model, trainer = make()
    failures = []

    def fail_once(engine):
        if not failures:
            failures.append(engine.state.iteration)
            raise OSError("disk full")

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=6), fail_once)
    with pytest.raises(HandlerError, match="fail_once.*ITERATION_COMPLETED.*disk full"):
        trainer.run(batches, max_epochs=1)
    assert_clean(model, trainer)
    assert_params_close(model, reference([(1, 4)], batches))  # micro-batches 5 and 6 were discarded
    # The failed epoch was the last: a new run (ignite 0.5.5 itself would return None here).
    state = trainer.run(batches)
    assert state.iteration == 16
    assert_clean(model, trainer)
    assert_params_close(model, reference([(1, 4), (1, 4), (5, 8), (9, 12), (13, 16)], batches))


def test_epoch_length_not_a_multiple_of_the_window_closes_each_epoch():
    batches = regression_batches(64, 4)
    model, trainer = make()
    state = trainer.run(batches, max_epochs=2, epoch_length=6)
    assert state.optimizer_steps == 4  # 4 + 2 per epoch
    assert_clean(model, trainer)
    assert_params_close(model, reference([(1, 4), (5, 6), (7, 10), (11, 12)], batches))


def test_gradients_left_before_a_run_do_not_leak_into_it():
    batches = regression_batches(16, 4)
    model, trainer = make()
    F.mse_loss(model(batches[0][0]), batches[0][1]).backward()  # stray gradients from user code
    trainer.run(batches, max_epochs=1)
    assert_params_close(model, reference([(1, 4)], batches))
