"""Schedulers step once per optimizer step (as a hand loop does), or on a validation metric."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from torch.optim.lr_scheduler import OneCycleLR, ReduceLROnPlateau, StepLR

import engine_kit.trainer as trainer_module
from engine_kit import HandlerError, StepEvents, create_trainer
from engine_kit.precision import Precision
from engine_kit.stateful import stateful_objects
from handlers.events import ValidationEvents
from handlers.schedulers import (
    attach_plateau_scheduler,
    attach_scheduler,
    onecycle_total_steps,
    optimizer_steps_per_epoch,
    warmup_cosine,
)
from tests.helpers import mlp, noop_engine, regression_batches

ACCUMULATION = 4
EPOCHS = 3
BATCHES = regression_batches(40, 4)  # 10 micro-batches per epoch: windows of 4, 4, 2
TOTAL = onecycle_total_steps(BATCHES, EPOCHS, ACCUMULATION)  # 9

SCHEDULERS = {
    "warmup_cosine": lambda opt: warmup_cosine(opt, warmup_steps=3, total_steps=TOTAL, min_lr=0.01),
    "onecycle": lambda opt: OneCycleLR(opt, max_lr=0.5, total_steps=TOTAL),
    "steplr": lambda opt: StepLR(opt, step_size=2, gamma=0.5),
}


def new_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # momentum: OneCycleLR cycles it


def hand_loop_lrs(make_scheduler):
    """The textbook loop: accumulate, step the optimizer, then the scheduler; lr seen by each step."""
    model = mlp(in_features=2, out=1)
    opt = new_optimizer(model)
    scheduler = make_scheduler(opt)
    lrs = []
    for _ in range(EPOCHS):
        for start in range(0, len(BATCHES), ACCUMULATION):
            window = BATCHES[start : start + ACCUMULATION]
            for x, y in window:
                (F.mse_loss(model(x), y) / len(window)).backward()
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            scheduler.step()
            opt.zero_grad()
    return lrs


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_lr_sequence_matches_a_hand_loop_under_accumulation(kind):
    expected = hand_loop_lrs(SCHEDULERS[kind])
    assert len(expected) == TOTAL == 9
    model = mlp(in_features=2, out=1)
    opt = new_optimizer(model)
    trainer = create_trainer(model, opt, F.mse_loss, accumulation_steps=ACCUMULATION)
    scheduler = SCHEDULERS[kind](opt)
    attach_scheduler(trainer, scheduler)
    lrs = []  # the lr each optimizer step uses: read when the window's gradients are ready
    trainer.add_event_handler(StepEvents.GRADIENTS_READY, lambda: lrs.append(opt.param_groups[0]["lr"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyTorch's "lr_scheduler.step() before optimizer.step()" would raise
        trainer.run(BATCHES, max_epochs=EPOCHS)
    assert lrs == pytest.approx(expected, rel=1e-12, abs=0)
    assert scheduler.last_epoch == TOTAL
    assert stateful_objects(trainer)["scheduler"] is scheduler


def test_onecycle_total_steps_is_tight():
    # One step fewer and OneCycleLR raises on its last step: the helper does not overcount either.
    model = mlp(in_features=2, out=1)
    opt = new_optimizer(model)
    trainer = create_trainer(model, opt, F.mse_loss, accumulation_steps=ACCUMULATION)
    attach_scheduler(trainer, OneCycleLR(opt, max_lr=0.5, total_steps=TOTAL - 1))
    with pytest.raises(HandlerError, match="OPTIMIZER_STEP_COMPLETED.*total steps"):
        trainer.run(BATCHES, max_epochs=EPOCHS)
    assert trainer.state.optimizer_steps == TOTAL


def test_skipped_fp16_step_does_not_advance_the_scheduler(monkeypatch):
    monkeypatch.setattr(trainer_module, "resolve_precision", lambda precision, device: Precision("fp16", "cpu"))
    model = mlp(in_features=2, out=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = create_trainer(model, opt, F.mse_loss, precision="fp16")
    scheduler = StepLR(opt, step_size=1, gamma=0.5)
    attach_scheduler(trainer, scheduler)
    x, y = BATCHES[0]
    trainer.run([(x, torch.full_like(y, float("inf"))), (x, y)], max_epochs=1)
    assert trainer.state.skipped_steps == 1 and scheduler.last_epoch == 1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_warmup_cosine_follows_its_formula():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    warmup, total, min_lr = 4, 12, 0.1
    scheduler = warmup_cosine(opt, warmup_steps=warmup, total_steps=total, min_lr=min_lr)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    expected = [(k + 1) / (warmup + 1) for k in range(warmup)] + [
        min_lr + (1 - min_lr) * (1 + math.cos(math.pi * j / (total - warmup))) / 2 for j in range(total - warmup)
    ]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert max(lrs) == pytest.approx(1.0) and min(lrs) > min_lr


def test_warmup_cosine_without_warmup_is_plain_cosine():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = warmup_cosine(opt, warmup_steps=0, total_steps=4)
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) and scheduler.T_max == 4


def test_warmup_start_factor_option():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    warmup_cosine(opt, warmup_steps=2, total_steps=4, warmup_start_factor=0.1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"warmup_steps": 5, "total_steps": 5}, ValueError, "warmup_steps=5 leaves no cosine phase"),
        ({"warmup_steps": -1, "total_steps": 5}, ValueError, "warmup_steps=-1 is below 0"),
        ({"warmup_steps": 1.5, "total_steps": 5}, TypeError, "not an integer"),
        ({"warmup_steps": 1, "total_steps": 0}, ValueError, "total_steps=0"),
        ({"warmup_steps": 1, "total_steps": 5, "min_lr": -0.1}, ValueError, "min_lr"),
        ({"warmup_steps": 1, "total_steps": 5, "min_lr": 2.0}, ValueError, "exceeds the optimizer's learning rate"),
        ({"warmup_steps": 1, "total_steps": 5, "warmup_start_factor": 0.0}, ValueError, "warmup_start_factor"),
    ],
)
def test_warmup_cosine_refuses_bad_arguments(kwargs, error, match):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(error, match=f"{match}.*To fix"):
        warmup_cosine(opt, **kwargs)


def test_step_count_helpers():
    assert optimizer_steps_per_epoch(8, 4) == 2
    assert optimizer_steps_per_epoch(9, 4) == 3  # the ragged tail is a step of its own
    assert optimizer_steps_per_epoch(3, 4) == 1
    assert onecycle_total_steps(10, epochs=2, accumulation_steps=1) == 20
    assert onecycle_total_steps(BATCHES, epochs=3, accumulation_steps=4) == 9
    with pytest.raises(TypeError, match="no length.*To fix"):
        onecycle_total_steps(iter(BATCHES), epochs=1, accumulation_steps=1)
    with pytest.raises(ValueError, match="accumulation_steps=0"):
        optimizer_steps_per_epoch(10, 0)
    with pytest.raises(ValueError, match="epochs=0"):
        onecycle_total_steps(10, epochs=0, accumulation_steps=1)


def make_trainer_and_optimizer():
    model = mlp(in_features=2, out=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return create_trainer(model, opt, F.mse_loss), opt


def test_attach_scheduler_refuses_plateau_and_foreign_objects():
    trainer, opt = make_trainer_and_optimizer()
    with pytest.raises(TypeError, match="To fix: use attach_plateau_scheduler"):
        attach_scheduler(trainer, ReduceLROnPlateau(opt))
    with pytest.raises(TypeError, match="not a torch.optim.lr_scheduler.LRScheduler"):
        attach_scheduler(trainer, object())
    other = torch.optim.SGD(mlp(in_features=2, out=1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="another optimizer"):
        attach_scheduler(trainer, StepLR(other, 1))
    with pytest.raises(RuntimeError, match="no StepEvents"):
        attach_scheduler(noop_engine(), StepLR(opt, 1))


def test_attach_scheduler_refuses_the_same_scheduler_twice():
    trainer, opt = make_trainer_and_optimizer()
    scheduler = StepLR(opt, 1)
    attach_scheduler(trainer, scheduler)
    with pytest.raises(RuntimeError, match="already attached"):
        attach_scheduler(trainer, scheduler)
    second = StepLR(opt, 2)
    attach_scheduler(trainer, second)  # a different scheduler gets its own checkpoint entry
    assert stateful_objects(trainer)["scheduler_1"] is second


def fire_validations(trainer, opt, scores, metric="val_loss"):
    """Play scripted validations on the trainer, as the Validation handler does; lr after each."""
    lrs = []
    for score in scores:
        trainer.state.val_metrics = {metric: score, "accuracy": 0.5}
        trainer.state.validations += 1
        trainer.fire_event(ValidationEvents.VALIDATION_COMPLETED)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_plateau_scheduler_lowers_lr_after_patience_validations():
    trainer = noop_engine()
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    plateau = ReduceLROnPlateau(opt, mode="min", patience=2, factor=0.5)
    attach_plateau_scheduler(trainer, plateau, metric="val_loss")
    lrs = fire_validations(trainer, opt, [1.0, 0.8, 0.9, 0.85, 0.8, 0.7, 0.7, 0.7, float("nan")])
    # best 0.8 at validation 2; three bad ones (> patience) cut at validation 5; then 0.7 improves,
    # and 0.7, 0.7, NaN are bad again (NaN never improves).
    assert lrs == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25]
    assert stateful_objects(trainer)["scheduler"] is plateau


def test_plateau_scheduler_names_the_available_metrics():
    trainer = noop_engine()
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    attach_plateau_scheduler(trainer, ReduceLROnPlateau(opt), metric="loss")
    with pytest.raises(ValueError, match=r"'loss' is not among the validation metrics \['accuracy', 'val_loss'\]"):
        fire_validations(trainer, opt, [1.0])
    with pytest.raises(TypeError, match="not a ReduceLROnPlateau"):
        attach_plateau_scheduler(noop_engine(), StepLR(opt, 1), metric="loss")
    with pytest.raises(ValueError, match="metric=''"):
        attach_plateau_scheduler(noop_engine(), ReduceLROnPlateau(opt), metric="")


def test_plateau_scheduler_on_a_real_trainer_steps_per_validation():
    trainer, opt = make_trainer_and_optimizer()
    attach_plateau_scheduler(trainer, ReduceLROnPlateau(opt, patience=0, factor=0.5), metric="val_loss")
    scores = iter([1.0, 2.0, 3.0])  # best at the first validation, worse after: cut at the 2nd and 3rd
    lr_by_epoch = {}

    @trainer.on(StepEvents.OPTIMIZER_STEP_COMPLETED)
    def record(engine):
        lr_by_epoch.setdefault(engine.state.epoch, set()).add(opt.param_groups[0]["lr"])

    @trainer.on(Events.EPOCH_COMPLETED)
    def validate(engine):
        engine.state.val_metrics = {"val_loss": next(scores)}
        engine.state.validations += 1
        engine.fire_event(ValidationEvents.VALIDATION_COMPLETED)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.run(BATCHES, max_epochs=3)
    assert lr_by_epoch == {1: {0.1}, 2: {0.1}, 3: {0.05}}  # optimizer steps never move it
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
