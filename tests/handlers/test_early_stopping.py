"""EarlyStopping: patience over validations, NaN never improves, state survives resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

from engine_kit import HandlerError, create_trainer
from engine_kit.stateful import stateful_objects
from handlers.early_stopping import EarlyStopChecker, EarlyStopping
from handlers.events import ValidationEvents
from tests.helpers import mlp, noop_engine, regression_batches

NAN, INF = math.nan, math.inf

# (options, scores, 1-based validation at which training stops)
SCRIPTS = [
    # min: 0.95 is within min_delta of 1.0 (bad), 0.85 improves, 0.8 and NaN are bad.
    ({"patience": 2, "min_delta": 0.1, "mode": "min"}, [1.0, 0.95, 0.85, 0.8, NAN, 0.1], 5),
    # min: -inf is no improvement either.
    ({"patience": 2, "mode": "min"}, [1.0, -INF, 0.5, 0.5, 0.6], 5),
    # max: inf and NaN are bad; 0.709 is within min_delta of 0.7.
    ({"patience": 3, "min_delta": 0.01, "mode": "max"}, [0.5, 0.6, 0.605, INF, 0.7, 0.705, NAN, 0.709, 0.9], 8),
    # a run that is NaN from the start stops after `patience` validations.
    ({"patience": 2}, [NAN, NAN, 1.0], 2),
]


def first_stop(checker, scores):
    for index, score in enumerate(scores, start=1):
        if checker.update(score):
            return index
    return None


@pytest.mark.parametrize("options, scores, stop_at", SCRIPTS)
def test_checker_stops_at_the_right_validation(options, scores, stop_at):
    assert first_stop(EarlyStopChecker(**options), scores) == stop_at


def test_checker_tracks_the_best():
    checker = EarlyStopChecker(patience=3, mode="max")
    for score in (0.2, 0.4, NAN, 0.3):
        checker.update(score)
    assert (checker.best, checker.best_validation, checker.bad_validations, checker.validations) == (0.4, 2, 2, 4)
    assert not checker.should_stop
    checker.update(torch.tensor(0.1))  # a 0-dim tensor is accepted as a number
    assert checker.should_stop


@pytest.mark.parametrize("options, scores, stop_at", SCRIPTS)
def test_resumed_checker_stops_where_the_uninterrupted_one_does(options, scores, stop_at):
    for split in range(1, stop_at):
        first = EarlyStopChecker(**options)
        assert first_stop(first, scores[:split]) is None
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)  # the state must survive a weights_only checkpoint
        buffer.seek(0)
        resumed = EarlyStopChecker(**options)
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        assert resumed.state_dict() == first.state_dict()
        assert split + first_stop(resumed, scores[split:]) == stop_at


def test_checker_state_dict_checks_keys_and_mode():
    checker = EarlyStopChecker(patience=2)
    checker.update(1.0)
    state = checker.state_dict()
    assert state == {"mode": "min", "best": 1.0, "best_validation": 1, "bad_validations": 0, "validations": 1}
    with pytest.raises(ValueError, match=r"missing keys \['validations'\].*To fix"):
        EarlyStopChecker(patience=2).load_state_dict({k: v for k, v in state.items() if k != "validations"})
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        EarlyStopChecker(patience=2).load_state_dict({**state, "extra": 0})
    with pytest.raises(ValueError, match="mode='min'.*To fix: build the early stopping with mode='min'"):
        EarlyStopChecker(patience=2, mode="max").load_state_dict(state)


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"patience": 0}, ValueError, "patience=0"),
        ({"patience": 1.5}, TypeError, "patience=1.5"),
        ({"patience": True}, TypeError, "patience=True"),
        ({"patience": 2, "min_delta": -0.1}, ValueError, "min_delta=-0.1"),
        ({"patience": 2, "min_delta": NAN}, ValueError, "min_delta=nan"),
        ({"patience": 2, "mode": "lower"}, ValueError, "mode='lower'"),
    ],
)
def test_bad_options_are_refused(options, error, match):
    with pytest.raises(error, match=f"{match}.*To fix"):
        EarlyStopChecker(**options)
    with pytest.raises(error, match=f"{match}.*To fix"):
        EarlyStopping(metric="val_loss", **options)


def test_handler_refuses_a_bad_metric_name():
    for metric in ("", None, 3):
        with pytest.raises((TypeError, ValueError), match="metric.*To fix"):
            EarlyStopping(metric=metric, patience=2)
    with pytest.raises(TypeError, match="score='high' is not a number"):
        EarlyStopChecker(patience=1).update("high")


def make_trainer():
    model = mlp(in_features=2, out=1)
    return create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss)


def validate_with(trainer, scores, metric="val_loss"):
    """An epoch-end 'validation' that publishes scripted scores, as the Validation handler does."""
    scores = iter(scores)

    @trainer.on(Events.EPOCH_COMPLETED)
    def validate(engine):
        engine.state.val_metrics = {metric: next(scores), "accuracy": 0.5}
        engine.state.validations += 1
        engine.fire_event(ValidationEvents.VALIDATION_COMPLETED)


BATCHES = regression_batches(16, 4)


def test_stops_the_trainer_at_the_right_epoch():
    trainer = make_trainer()
    stopper = EarlyStopping(metric="val_loss", patience=2, min_delta=0.01)
    stopper.attach(trainer)
    validate_with(trainer, [1.0, 0.9, 0.895, NAN, 0.1, 0.1])
    state = trainer.run(BATCHES, max_epochs=6)
    assert state.epoch == 4 and state.iteration == 16
    assert state.stopped_by == "EarlyStopping: 'val_loss' did not improve on 0.9 for 2 validations"
    # one checker across every validation: no reset per evaluation
    assert stopper.checker.validations == 4 and stateful_objects(trainer)["early_stopping"] is stopper


def test_state_survives_a_resume_through_the_registry():
    uninterrupted = make_trainer()
    EarlyStopping(metric="acc", patience=2, mode="max").attach(uninterrupted)
    scores = [0.5, 0.6, 0.55, 0.7, 0.65, 0.6, 0.9]
    validate_with(uninterrupted, scores, metric="acc")
    assert uninterrupted.run(BATCHES, max_epochs=7).epoch == 6

    first = make_trainer()
    EarlyStopping(metric="acc", patience=2, mode="max").attach(first)
    validate_with(first, scores[:5], metric="acc")
    first.run(BATCHES, max_epochs=5)  # "killed" after epoch 5, with one bad validation pending
    saved = {name: obj.state_dict() for name, obj in stateful_objects(first).items()}

    resumed = make_trainer()
    EarlyStopping(metric="acc", patience=2, mode="max").attach(resumed)
    stateful_objects(resumed)["early_stopping"].load_state_dict(saved["early_stopping"])
    validate_with(resumed, scores[5:], metric="acc")
    state = resumed.run(BATCHES, max_epochs=2)
    assert state.epoch == 1  # the first validation after the resume is the second bad one
    assert state.stopped_by == uninterrupted.state.stopped_by


def test_missing_metric_names_the_available_ones():
    trainer = make_trainer()
    EarlyStopping(metric="val_los", patience=2).attach(trainer)
    validate_with(trainer, [1.0])
    with pytest.raises(HandlerError, match=r"'val_los'.*\['accuracy', 'val_loss'\].*To fix"):
        trainer.run(BATCHES, max_epochs=1)


def test_attach_once_and_state_round_trip_on_a_noop_engine():
    engine = noop_engine()
    stopper = EarlyStopping(metric="loss", patience=3)
    stopper.attach(engine)
    with pytest.raises(RuntimeError, match="already attached"):
        stopper.attach(engine)
    engine.state.val_metrics = {"loss": 0.3}
    engine.fire_event(ValidationEvents.VALIDATION_COMPLETED)
    copy = EarlyStopping(metric="loss", patience=3)
    copy.load_state_dict(stopper.state_dict())
    assert copy.state_dict() == stopper.state_dict() and copy.checker.best == 0.3
