"""NanGuard: stops within check_every iterations and never lets a NaN model be saved."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

import engine_kit.trainer as trainer_module
import handlers.nan_guard as nan_guard_module
from engine_kit import StepEvents, create_trainer
from engine_kit.precision import Precision
from engine_kit.stateful import save_refusal
from handlers.nan_guard import NanGuard
from tests.helpers import mlp, noop_engine, regression_batches

BATCHES = regression_batches(80, 4)  # 20 micro-batches per epoch


def nan_from(k):
    """mse_loss that turns NaN from the k-th call (micro-batch) on."""
    calls = []

    def loss_fn(y_pred, y):
        calls.append(None)
        loss = F.mse_loss(y_pred, y)
        return loss + float("nan") if len(calls) >= k else loss

    return loss_fn


def make_trainer(loss_fn, accumulation=1):
    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn,
                             accumulation_steps=accumulation)
    return model, trainer


@pytest.mark.parametrize("nan_at, check_every, accumulation, stop_at", [
    (7, 5, 1, 10),   # found at the periodic check after it
    (10, 5, 1, 10),  # found by the check of its own iteration
    (6, 4, 4, 8),    # NaN inside an accumulation window
    (18, 50, 1, 20), # check_every longer than the epoch: the epoch end checks
])
def test_stops_within_check_every_iterations(nan_at, check_every, accumulation, stop_at):
    _, trainer = make_trainer(nan_from(nan_at), accumulation)
    NanGuard(check_every=check_every).attach(trainer)
    with pytest.warns(RuntimeWarning, match=f"at iteration {nan_at}") as record:
        state = trainer.run(BATCHES, max_epochs=3)
    assert len(record) == 1  # warned once
    assert state.iteration == stop_at and state.epoch == 1
    assert state.nan_detected is True
    assert state.stopped_by == f"NanGuard: non-finite loss or gradient norm at iteration {nan_at}"


def test_save_veto_holds_from_the_nan_iteration_and_no_nan_model_is_saved():
    model, trainer = make_trainer(nan_from(7))
    NanGuard(check_every=50).attach(trainer)
    saved, refused = [], []

    @trainer.on(StepEvents.OPTIMIZER_STEP_COMPLETED)
    def save_last(engine):  # a stand-in for CheckpointRotation's "last" save
        reason = save_refusal(engine)
        if reason is None:
            assert all(torch.isfinite(p).all() for p in model.parameters())
            saved.append(engine.state.iteration)
        else:
            refused.append((engine.state.iteration, reason))

    with pytest.warns(RuntimeWarning):
        state = trainer.run(BATCHES, max_epochs=1)
    assert saved == list(range(1, 7))
    assert [it for it, _ in refused] == [7]  # the veto read the flag at call time, before any periodic check
    assert "at iteration 7" in refused[0][1]
    assert state.iteration == 7  # the veto's read also stopped the run
    assert save_refusal(trainer) is not None  # and it keeps refusing


def test_veto_sees_a_nan_micro_batch_earlier_in_the_window():
    _, trainer = make_trainer(nan_from(2), accumulation=4)
    NanGuard(check_every=100).attach(trainer)
    refusals = []
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, lambda e: refusals.append(save_refusal(e)))
    with pytest.warns(RuntimeWarning, match="at iteration 2"):
        trainer.run(BATCHES, max_epochs=1)
    assert len(refusals) == 1 and refusals[0] is not None


def test_veto_between_periodic_checks_without_a_step_event():
    _, trainer = make_trainer(nan_from(3))
    guard = NanGuard(check_every=100)
    guard.attach(trainer)
    seen = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def probe(engine):  # runs after NanGuard's own ITERATION_COMPLETED handler
        seen.append((engine.state.iteration, save_refusal(engine) is not None))

    with warnings.catch_warnings(record=True):
        trainer.run(BATCHES, max_epochs=1)
    assert seen == [(1, False), (2, False), (3, True)]
    assert guard.nan_iteration == 3


def test_a_finite_run_is_untouched():
    _, trainer = make_trainer(F.mse_loss)
    NanGuard(check_every=3).attach(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = trainer.run(BATCHES, max_epochs=2)
    assert state.iteration == 40 and state.nan_detected is False and state.stopped_by is None
    assert save_refusal(trainer) is None


def test_skipped_fp16_steps_are_not_mistaken_for_nan(monkeypatch):
    monkeypatch.setattr(trainer_module, "resolve_precision", lambda precision, device: Precision("fp16", "cpu"))
    model = mlp(in_features=2, out=1)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, precision="fp16")
    NanGuard(check_every=1).attach(trainer)
    x, y = BATCHES[0]
    huge = (x * 1e4, y * 1e4)  # finite fp32 loss, gradients overflow fp16 at the initial scale
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = trainer.run([huge, (x, y)], max_epochs=1)
    assert state.skipped_steps >= 1 and state.nan_detected is False and state.iteration == 2


def test_options_attach_and_state():
    with pytest.raises(ValueError, match="check_every=0.*To fix"):
        NanGuard(check_every=0)
    with pytest.raises(TypeError, match="check_every='5'.*To fix"):
        NanGuard(check_every="5")
    guard = NanGuard()
    engine = noop_engine()
    guard.attach(engine)
    with pytest.raises(RuntimeError, match="already attached"):
        guard.attach(engine)
    engine.run([1, 2], max_epochs=1)  # an output without a loss is ignored
    assert engine.state.nan_detected is False and guard.veto(engine) is None
    assert guard.state_dict() == {}
    guard.load_state_dict({})


def test_a_non_finite_gradient_norm_with_a_finite_loss_is_caught():
    calls = []

    def loss_fn(y_pred, y):
        calls.append(None)
        loss = F.mse_loss(y_pred, y)
        if len(calls) == 3:  # finite loss, NaN gradient: sqrt'(0) = inf, times 0
            loss = loss + 0.0 * torch.sqrt((y_pred * 0).sum())
        return loss

    model, trainer = make_trainer(loss_fn)
    guard = NanGuard(check_every=100)
    guard.attach(trainer)
    assert trainer.step.track_grad_norm is True  # attaching asks the step for the norm
    refusals = []
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, lambda e: refusals.append(save_refusal(e)))
    with pytest.warns(RuntimeWarning, match="at iteration 3"):
        state = trainer.run(BATCHES, max_epochs=1)
    assert refusals[:2] == [None, None] and refusals[2] is not None and state.iteration == 3


def test_values_are_checked_together_not_per_iteration(monkeypatch):
    _, trainer = make_trainer(F.mse_loss, accumulation=2)
    NanGuard(check_every=5).attach(trainer)
    calls = []
    first_non_finite = nan_guard_module._first_non_finite
    monkeypatch.setattr(nan_guard_module, "_first_non_finite",
                        lambda values: calls.append(len(values)) or first_non_finite(values))
    # 20 iterations in windows of 2: a check at the window that reaches 5 micro-batches (6, 12, 18),
    # then the epoch end's (19-20); the run end finds nothing new.
    trainer.run(BATCHES, max_epochs=1)
    # One read per check over every loss and norm since the last one (6 losses + 3 norms, then 2 + 1).
    assert calls == [9, 9, 9, 3]


def test_a_trainer_runs_no_handler_per_micro_batch():
    _, trainer = make_trainer(F.mse_loss, accumulation=4)
    NanGuard(check_every=8).attach(trainer)
    assert not trainer._event_handlers.get(Events.ITERATION_COMPLETED)  # the step records the window's losses
    assert trainer.step.keep_window_losses is True


def test_veto_inside_a_window_sees_its_micro_batches_so_far():
    _, trainer = make_trainer(nan_from(6), accumulation=4)
    NanGuard(check_every=100).attach(trainer)
    seen = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def probe(engine):
        seen.append((engine.state.iteration, save_refusal(engine) is not None))

    with pytest.warns(RuntimeWarning, match="at iteration 6"):
        trainer.run(BATCHES, max_epochs=1)
    assert seen == [(1, False), (2, False), (3, False), (4, False), (5, False), (6, True)]


def test_a_run_ended_inside_a_window_checks_that_window():
    _, trainer = make_trainer(nan_from(6), accumulation=4)
    guard = NanGuard(check_every=100)
    guard.attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=6), lambda engine: engine.terminate())
    with pytest.warns(RuntimeWarning, match="at iteration 6"):
        state = trainer.run(BATCHES, max_epochs=1)  # stopped at 6, the second window half done
    assert state.iteration == 6 and guard.nan_iteration == 6 and state.nan_detected is True


@pytest.mark.parametrize("values, first", [
    ([1.0, 2.0, 3.0], None),
    ([1.0, float("nan"), float("inf")], 1),
    ([float("-inf"), 1.0], 0),
    ([1e38, 1e38, 1e38], None),  # finite values whose sum would overflow are still finite
])
def test_first_non_finite_over_scalars(values, first):
    assert nan_guard_module._first_non_finite([torch.tensor(v) for v in values]) == first


def test_first_non_finite_over_mixed_dtypes():
    # fp16/bf16 losses next to fp32 norms: the stack promotes them, nothing is misread.
    values = [torch.tensor(6e4, dtype=torch.float16), torch.tensor(2.0), torch.tensor(float("inf"), dtype=torch.bfloat16)]
    assert nan_guard_module._first_non_finite(values) == 2
    assert nan_guard_module._first_non_finite(values[:2]) is None


def test_first_non_finite_over_mixed_shapes_and_non_float_values():
    check = nan_guard_module._first_non_finite
    assert check([torch.tensor([1.0]), torch.tensor([float("nan")])]) == 1  # shape (1,) values
    assert check([torch.tensor(1.0), torch.ones(3), torch.tensor([1.0, float("inf")])]) == 2  # one check each
    assert check([torch.tensor(3), torch.tensor(4)]) is None  # integers are always finite


def test_without_a_norm_only_the_loss_is_checked():
    _, trainer = make_trainer(nan_from(4))
    guard = NanGuard(check_every=2)
    guard.attach(trainer)
    trainer.step.track_grad_norm = False  # a step that hands out no norm
    with pytest.warns(RuntimeWarning, match="at iteration 4"):
        state = trainer.run(BATCHES, max_epochs=1)
    assert state.iteration == 4 and guard.nan_iteration == 4
