"""The step's per-micro-batch shortcuts keep their guarantees.

The loss is checked in full on a run's first micro-batch (and after a state
load); a loss that goes wrong later still gets the explanatory error, because
a failing backward re-runs the check. Batches already on the device are not
copied.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine_kit import create_trainer
from engine_kit.batch import default_prepare_batch
from tests.helpers import mlp, regression_batches


def _trainer(loss_fn, **kwargs):
    model = mlp(in_features=2, out=1)
    return create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, **kwargs)


def _turns_bad_at(call: int, bad):
    """A loss_fn that returns the MSE until its ``call``-th call, then ``bad(y_pred, y)``."""
    calls = []

    def loss_fn(y_pred, y):
        calls.append(1)
        return bad(y_pred, y) if len(calls) >= call else F.mse_loss(y_pred, y)

    return loss_fn


@pytest.mark.parametrize(
    "bad, error, pattern",
    [
        (lambda y_pred, y: F.mse_loss(y_pred, y, reduction="none"), ValueError, r"shape \(4, 1\), not a scalar"),
        (lambda y_pred, y: 0.5, TypeError, r"loss_fn returned a float"),
        (lambda y_pred, y: F.mse_loss(y_pred.detach(), y), ValueError, r"does not require grad"),
    ],
    ids=["not-scalar", "not-tensor", "no-grad"],
)
@pytest.mark.parametrize("accumulation_steps", [1, 3])
def test_a_loss_that_goes_wrong_mid_run_gets_the_explanatory_error(bad, error, pattern, accumulation_steps):
    trainer = _trainer(_turns_bad_at(5, bad), accumulation_steps=accumulation_steps)
    with pytest.raises(error, match=pattern + r".*To fix:") as info:
        trainer.run(regression_batches(32, 4), max_epochs=1)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert trainer.state.iteration == 5  # the fifth micro-batch failed, the four before it trained


def test_a_single_element_loss_is_refused_again_in_the_next_run():
    # A (1,)-shaped loss backpropagates without complaint in torch: only the
    # full check refuses it, so each run must check its first micro-batch.
    shape_one = []
    trainer = _trainer(lambda y_pred, y: F.mse_loss(y_pred, y).reshape(1) if shape_one else F.mse_loss(y_pred, y))
    trainer.run(regression_batches(4, 4), max_epochs=1)
    shape_one.append(True)
    with pytest.raises(ValueError, match=r"shape \(1,\), not a scalar.*To fix:"):
        trainer.run(regression_batches(4, 4), max_epochs=2)


def test_a_state_load_rechecks_the_loss():
    shape_one = []
    trainer = _trainer(lambda y_pred, y: F.mse_loss(y_pred, y).reshape(1) if shape_one else F.mse_loss(y_pred, y))
    trainer.run(regression_batches(4, 4), max_epochs=1)
    trainer.step._loss_checked = True  # as if a run were under way when the state is loaded
    trainer.load_state_dict(trainer.state_dict())
    assert trainer.step._loss_checked is False


def test_a_backward_error_that_is_not_the_loss_propagates_unchanged():
    trainer = _trainer(F.mse_loss)
    first = next(trainer.step.model.parameters())
    calls = []

    def failing_hook(grad):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("hook failed")
        return grad

    first.register_hook(failing_hook)
    with pytest.raises(RuntimeError, match="hook failed"):
        trainer.run(regression_batches(32, 4), max_epochs=1)


def test_tensors_already_on_the_device_are_passed_through_and_others_moved():
    x, y = torch.ones(2, 3), torch.zeros(2)
    same_x, same_y = default_prepare_batch((x, y), torch.device("cpu"), True)
    assert same_x is x and same_y is y
    moved_x, moved_y = default_prepare_batch(([x], {"y": y}), torch.device("meta"), False)
    assert moved_x[0].device.type == "meta" and moved_y["y"].device.type == "meta"
