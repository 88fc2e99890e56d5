"""ignite's ParamSchedulers on StepEvents.STEP_STARTED at accumulation 4 give, step for step, the
learning rates they give a plain ignite trainer at accumulation 1 with 4x larger batches."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from ignite.handlers import (
    CosineAnnealingScheduler,
    LRScheduler,
    PiecewiseLinear,
    create_lr_scheduler_with_warmup,
)

import engine_kit.trainer as trainer_module
from engine_kit import StepEvents, create_trainer
from engine_kit.precision import Precision
from engine_kit.stateful import stateful_objects
from handlers import attach_scheduler
from tests.helpers import mlp, regression_batches
from tests.ignite_native.common import lrs_used_by_updates, plain_ignite_trainer

SCHEDULERS = {
    "PiecewiseLinear": lambda opt: PiecewiseLinear(opt, "lr", [(0, 0.0), (4, 0.1), (10, 0.01)]),
    "CosineAnnealingScheduler": lambda opt: CosineAnnealingScheduler(opt, "lr", 0.1, 0.001, cycle_size=5),
    "LRScheduler(StepLR)": lambda opt: LRScheduler(torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)),
    "create_lr_scheduler_with_warmup": lambda opt: create_lr_scheduler_with_warmup(
        torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5), warmup_start_value=0.0, warmup_duration=3
    ),
}


def plain_ignite_lrs(make_scheduler, batches, epochs):
    model = mlp(in_features=2, out=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = plain_ignite_trainer(model, optimizer)
    trainer.add_event_handler(Events.ITERATION_STARTED, make_scheduler(optimizer))
    used = lrs_used_by_updates(optimizer)
    trainer.run(batches, max_epochs=epochs)
    return used


def engine_kit_lrs(make_scheduler, batches, epochs, accumulation=4):
    model = mlp(in_features=2, out=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = create_trainer(model, optimizer, F.mse_loss, accumulation_steps=accumulation)
    trainer.add_event_handler(StepEvents.STEP_STARTED, make_scheduler(optimizer))
    used = lrs_used_by_updates(optimizer)
    trainer.run(batches, max_epochs=epochs)
    return used


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_step_started_matches_a_plain_trainer_with_4x_batches(name):
    micro = regression_batches(64, 4)  # 16 micro-batches: 4 windows of 4 per epoch
    large = regression_batches(64, 16)  # the same samples in 4 batches
    expected = plain_ignite_lrs(SCHEDULERS[name], large, epochs=3)
    got = engine_kit_lrs(SCHEDULERS[name], micro, epochs=3)
    assert len(got) == len(expected) == 12
    assert got == pytest.approx(expected, abs=1e-12)
    assert len(set(expected)) > 2  # the schedule really moves


@pytest.mark.parametrize("event", [Events.ITERATION_STARTED, Events.ITERATION_COMPLETED])
def test_param_scheduler_on_iteration_events_warns_and_advances_per_step(event):
    micro = regression_batches(64, 4)
    model = mlp(in_features=2, out=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = create_trainer(model, optimizer, F.mse_loss, accumulation_steps=4)
    with pytest.warns(UserWarning, match=r"PiecewiseLinear attached to Events\.ITERATION_.*accumulation_steps=4.*"
                                         r"To fix: attach it to StepEvents\.STEP_STARTED") as record:
        trainer.add_event_handler(event, SCHEDULERS["PiecewiseLinear"](optimizer))
    assert record[0].filename == __file__  # the warning points at the attaching line
    used = lrs_used_by_updates(optimizer)
    trainer.run(micro, max_epochs=3)
    reference = engine_kit_lrs(SCHEDULERS["PiecewiseLinear"], micro, epochs=3)
    if event == Events.ITERATION_STARTED:  # the same moment as STEP_STARTED
        assert used == pytest.approx(reference)
    else:  # ignite's ITERATION_COMPLETED convention: one step later, but once per step
        assert used[1:] == pytest.approx(reference[:-1])


def test_attach_scheduler_runs_an_ignite_scheduler_on_step_started():
    micro = regression_batches(64, 4)
    model = mlp(in_features=2, out=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = create_trainer(model, optimizer, F.mse_loss, accumulation_steps=4)
    scheduler = SCHEDULERS["create_lr_scheduler_with_warmup"](optimizer)
    attach_scheduler(trainer, scheduler)
    used = lrs_used_by_updates(optimizer)
    trainer.run(micro, max_epochs=2)
    assert used == pytest.approx(engine_kit_lrs(SCHEDULERS["create_lr_scheduler_with_warmup"], micro, epochs=2))
    assert stateful_objects(trainer)["scheduler"] is scheduler  # saved with checkpoints


def test_no_warning_at_accumulation_1():
    model = mlp(in_features=2, out=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = create_trainer(model, optimizer, F.mse_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.add_event_handler(Events.ITERATION_STARTED, SCHEDULERS["PiecewiseLinear"](optimizer))


def test_step_started_holds_on_a_step_gradscaler_skipped(monkeypatch):
    # fp16 with a GradScaler, forced onto the CPU (the public API refuses fp16 there).
    monkeypatch.setattr(trainer_module, "resolve_precision", lambda precision, device: Precision("fp16", "cpu"))
    model = mlp(in_features=2, out=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = create_trainer(model, optimizer, F.mse_loss, precision="fp16", accumulation_steps=2)
    trainer.add_event_handler(StepEvents.STEP_STARTED, SCHEDULERS["PiecewiseLinear"](optimizer))
    lrs = []
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, lambda e: lrs.append(("step", optimizer.param_groups[0]["lr"])))
    trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_SKIPPED, lambda e: lrs.append(("skip", optimizer.param_groups[0]["lr"])))
    batches = regression_batches(32, 4)
    x, y = batches[3]
    batches[3] = (x, torch.full_like(y, float("inf")))  # overflows the second window: GradScaler skips it
    trainer.run(batches, max_epochs=1)
    assert [kind for kind, _ in lrs] == ["step", "skip", "step", "step"]
    # The retried window uses the skipped step's value; the schedule then resumes where it was.
    assert [lr for _, lr in lrs] == pytest.approx([0.0, 0.025, 0.025, 0.05])
    assert trainer.state.steps_started == 3 and trainer.state.optimizer_steps == 3


def test_a_torch_scheduler_step_on_iterations_warns_toward_attach_scheduler():
    model = mlp(in_features=2, out=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = create_trainer(model, optimizer, F.mse_loss, accumulation_steps=4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    with pytest.warns(UserWarning, match=r"StepLR attached to Events\.ITERATION_COMPLETED.*every micro-batch.*"
                                         r"To fix: use handlers\.attach_scheduler"):
        trainer.add_event_handler(Events.ITERATION_COMPLETED, scheduler.step)
