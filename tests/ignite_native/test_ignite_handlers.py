"""ignite's own handlers on the engine create_trainer returns, attached as the README table says."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from ignite.contrib.engines.common import setup_common_training_handlers
from ignite.engine import Events
from ignite.handlers import EarlyStopping, FastaiLRFinder, ProgressBar, TensorboardLogger, TerminateOnNan
from ignite.handlers.tensorboard_logger import OutputHandler
from ignite.metrics import RunningAverage

from engine_kit import StepEvents, create_evaluator, create_trainer
from tests.helpers import mlp, regression_batches
from tests.ignite_native.common import lrs_used_by_updates, plain_ignite_trainer


def make(accumulation=1, clip=None, lr=0.1):
    model = mlp(in_features=2, out=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    trainer = create_trainer(model, optimizer, F.mse_loss, accumulation_steps=accumulation, max_grad_norm=clip)
    return model, optimizer, trainer


def with_nan_at(batches, index):
    poisoned = list(batches)
    x, y = poisoned[index]
    poisoned[index] = (x * float("nan"), y)
    return poisoned


@pytest.mark.parametrize("accumulation", [1, 4])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_terminate_on_nan_with_defaults(accumulation, clip):
    _, _, trainer = make(accumulation, clip)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, TerminateOnNan())
    state = trainer.run(regression_batches(64, 4), max_epochs=1)  # no NaN: runs to the end
    assert state.iteration == 16
    _, _, trainer = make(accumulation, clip)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, TerminateOnNan())
    state = trainer.run(with_nan_at(regression_batches(64, 4), 5), max_epochs=2)
    assert state.iteration == 6 and state.epoch == 1
    assert state.window_position == 0  # the run ended with its window closed


@pytest.mark.parametrize("accumulation", [1, 4])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_setup_common_training_handlers_with_defaults(accumulation, clip):
    _, _, trainer = make(accumulation, clip)
    setup_common_training_handlers(trainer)
    assert trainer.run(regression_batches(32, 4), max_epochs=2).iteration == 16
    _, _, trainer = make(accumulation, clip)
    setup_common_training_handlers(trainer, output_names=["loss"], with_pbars=False)
    state = trainer.run(regression_batches(32, 4), max_epochs=1)
    assert state.metrics["loss"] == pytest.approx(state.metrics["loss"]) and state.metrics["loss"] > 0


def test_running_average_and_progress_bar_with_output_transform(capsys):
    _, _, trainer = make(accumulation=2)
    RunningAverage(output_transform=lambda out: out.loss).attach(trainer, "loss")
    ProgressBar(persist=True).attach(trainer, metric_names=["loss"])
    state = trainer.run(regression_batches(32, 4), max_epochs=1)
    assert state.metrics["loss"] > 0


def test_early_stopping_on_the_evaluator_stops_the_trainer():
    model, _, trainer = make()
    evaluator = create_evaluator(model)
    scores = iter([1.0, 0.5, 0.4, 0.3])
    stopper = EarlyStopping(patience=2, score_function=lambda engine: next(scores), trainer=trainer)
    evaluator.add_event_handler(Events.COMPLETED, stopper)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda: evaluator.run(regression_batches(8, 4)))
    assert trainer.run(regression_batches(16, 4), max_epochs=10).epoch == 3


def test_ignite_tensorboard_logger_on_optimizer_steps(tmp_path):
    _, _, trainer = make(accumulation=2)
    logger = TensorboardLogger(log_dir=str(tmp_path))
    logger.attach(
        trainer,
        OutputHandler(tag="train", output_transform=lambda out: {"loss": out.loss}),
        event_name=StepEvents.OPTIMIZER_STEP_COMPLETED,
    )
    trainer.run(regression_batches(32, 4), max_epochs=1)
    logger.close()
    assert any(path.name.startswith("events.out") for path in tmp_path.iterdir())


def run_finder(trainer, model, optimizer, output_transform):
    finder = FastaiLRFinder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "completed without diverging" and, at accumulation 4, the per-step note
        with finder.attach(
            trainer, {"model": model, "optimizer": optimizer}, output_transform=output_transform,
            num_iter=10, end_lr=10.0, diverge_th=1e9,
        ) as finding:
            finding.run(regression_batches(64, 4), max_epochs=1)
    return finder.get_results()["lr"]


def test_lr_finder_at_accumulation_4_reports_only_learning_rates_that_updates_used():
    model, optimizer, trainer = make(accumulation=4)
    used = lrs_used_by_updates(optimizer)
    reported = run_finder(trainer, model, optimizer, lambda out: out.loss)
    # The learning rate is held for each window: 11 micro-batches report 3 values, 4 + 4 + 3.
    distinct = sorted(set(reported))
    assert [reported.count(lr) for lr in distinct] == [4, 4, 3]
    # As on a plain ignite trainer, the finder reports the value set for the *next* update, so
    # the last one belongs to an update that the finder's own termination prevents.
    assert set(distinct[:-1]) <= set(used)
    assert trainer.state.window_position == 0
    assert all(p.grad is None for p in model.parameters())

    # The same property on a plain ignite trainer, for comparison.
    plain_model = mlp(in_features=2, out=1)
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.1)
    plain_used = lrs_used_by_updates(plain_opt)
    plain_reported = run_finder(plain_ignite_trainer(plain_model, plain_opt), plain_model, plain_opt, lambda out: out)
    assert set(plain_reported[:-1]) <= set(plain_used) and plain_reported[-1] not in plain_used


def test_lr_finder_then_a_fresh_run_matches_a_fresh_trainer():
    model, optimizer, trainer = make(accumulation=4)
    run_finder(trainer, model, optimizer, lambda out: out.loss)  # restores model and optimizer afterwards
    trainer.run(regression_batches(32, 4), max_epochs=1)
    ref_model, _, ref_trainer = make(accumulation=4)
    ref_trainer.run(regression_batches(32, 4), max_epochs=1)
    for got, want in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(got, want)
