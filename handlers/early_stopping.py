"""Early stopping: a patience policy, and the handler that applies it to validations."""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any, Mapping

from ignite.engine import Engine

from engine_kit.checks import check_name
from engine_kit.errors import fix_message
from engine_kit.stateful import register_stateful
from handlers.base import Handler, check_positive_int, check_state_keys
from handlers.events import ValidationEvents, register_validation_events

logger = logging.getLogger(__name__)

MODES = ("min", "max")


class EarlyStopChecker:
    """Decides when a score has stopped improving; knows nothing about engines.

    A score improves on the best so far when it is lower by more than
    ``min_delta`` (``mode="min"``) or higher by more than ``min_delta``
    (``mode="max"``); the first finite score always improves. A NaN or
    infinite score never improves: it counts as a bad validation. ``update``
    returns True once ``patience`` validations in a row have not improved.

    Args:
        patience: bad validations in a row that stop training (>= 1).
        min_delta: the margin an improvement must exceed (>= 0).
        mode: "min" when lower is better (a loss), "max" when higher is (accuracy).

    >>> checker = EarlyStopChecker(patience=2, min_delta=0.1)
    >>> [checker.update(s) for s in (1.0, 0.95, float("nan"), 0.5)]
    [False, False, True, False]
    >>> checker.best, checker.best_validation, checker.bad_validations
    (0.5, 4, 0)
    """

    state_keys = ("mode", "best", "best_validation", "bad_validations", "validations")

    def __init__(self, *, patience: int, min_delta: float = 0.0, mode: str = "min") -> None:
        patience = check_positive_int("patience", patience, 3)
        if isinstance(min_delta, bool) or not isinstance(min_delta, numbers.Real):
            raise TypeError(fix_message(f"min_delta={min_delta!r} is not a number.", "pass a float >= 0, e.g. 1e-4."))
        if not 0 <= min_delta < math.inf:
            raise ValueError(
                fix_message(f"min_delta={min_delta} is not a finite number >= 0.", "pass a float >= 0, e.g. 1e-4.")
            )
        if mode not in MODES:
            raise ValueError(
                fix_message(
                    f"mode={mode!r} is not one of {MODES}.",
                    "pass mode='min' for a loss or mode='max' for a score such as accuracy.",
                )
            )
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.mode = mode
        self.best: float | None = None
        self.best_validation = 0  # 1-based index of the validation that set `best`; 0 before any
        self.bad_validations = 0
        self.validations = 0

    def is_improvement(self, score: float) -> bool:
        """Whether ``score`` beats the best so far by more than ``min_delta``."""
        if not math.isfinite(score):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return score < self.best - self.min_delta
        return score > self.best + self.min_delta

    def update(self, score: float) -> bool:
        """Record one validation's score; True when training should stop."""
        if isinstance(score, bool):
            raise TypeError(fix_message(f"score={score!r} is a bool.", "pass the metric value as a number."))
        try:
            score = float(score)
        except (TypeError, ValueError):
            raise TypeError(
                fix_message(f"score={score!r} is not a number.", "pass the metric value as a float.")
            ) from None
        self.validations += 1
        if self.is_improvement(score):
            self.best = score
            self.best_validation = self.validations
            self.bad_validations = 0
        else:
            self.bad_validations += 1
        return self.should_stop

    @property
    def should_stop(self) -> bool:
        """True once ``patience`` validations in a row did not improve."""
        return self.bad_validations >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.state_keys}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        check_state_keys(
            "EarlyStopChecker",
            self.state_keys,
            state_dict,
            source="EarlyStopChecker.state_dict() (or EarlyStopping.state_dict())",
        )
        if state_dict["mode"] != self.mode:
            raise ValueError(
                fix_message(
                    f"the saved state was recorded with mode={state_dict['mode']!r}, "
                    f"this checker has mode={self.mode!r}.",
                    f"build the early stopping with mode={state_dict['mode']!r}, as in the run being resumed.",
                )
            )
        best = state_dict["best"]
        self.best = None if best is None else float(best)
        self.best_validation = int(state_dict["best_validation"])
        self.bad_validations = int(state_dict["bad_validations"])
        self.validations = int(state_dict["validations"])


class EarlyStopping(Handler):
    """Stops the trainer when a validation metric stops improving.

    Attached to the *trainer* (not to the evaluator, whose runs would each
    start afresh): it runs on ``ValidationEvents.VALIDATION_COMPLETED``, reads
    ``trainer.state.val_metrics[metric]``, and after ``patience`` validations
    without improvement calls ``trainer.terminate()`` and sets
    ``trainer.state.stopped_by``. Its counters are registered for checkpoints,
    so a resumed run stops where the uninterrupted one would have.

    Args:
        metric: the name of the validation metric to watch.
        patience: validations without improvement that stop training (>= 1).
        min_delta: the margin an improvement must exceed (>= 0).
        mode: "min" (a loss) or "max" (an accuracy). NaN never improves.

    >>> from ignite.engine import Engine
    >>> trainer = Engine(lambda e, b: None)
    >>> stopper = EarlyStopping(metric="loss", patience=2)
    >>> stopper.attach(trainer)
    >>> for loss in (0.5, 0.7, 0.6):
    ...     trainer.state.val_metrics = {"loss": loss}
    ...     trainer.fire_event(ValidationEvents.VALIDATION_COMPLETED)
    >>> trainer.should_terminate, trainer.state.stopped_by
    (True, "EarlyStopping: 'loss' did not improve on 0.5 for 2 validations")
    """

    state_keys = EarlyStopChecker.state_keys

    def __init__(self, *, metric: str, patience: int, min_delta: float = 0.0, mode: str = "min") -> None:
        super().__init__()
        self.metric = check_name("metric", metric, "val_loss")
        self.checker = EarlyStopChecker(patience=patience, min_delta=min_delta, mode=mode)

    def attach(self, trainer: Engine) -> None:
        """Watch ``trainer``'s validations and register the counters for checkpoints."""
        self._claim(trainer)
        register_validation_events(trainer)
        if not hasattr(trainer.state, "stopped_by"):
            trainer.state.stopped_by = None
        trainer.add_event_handler(ValidationEvents.VALIDATION_COMPLETED, self)
        register_stateful(trainer, "early_stopping", self)

    def __call__(self, trainer: Engine) -> None:
        metrics = trainer.state.val_metrics
        if self.metric not in metrics:
            raise ValueError(
                fix_message(
                    f"EarlyStopping watches metric {self.metric!r}, but the validation produced {sorted(metrics)}.",
                    "pass metric= one of those names, or add the metric to the evaluator.",
                )
            )
        if self.checker.update(metrics[self.metric]):
            checker = self.checker
            reason = (
                f"EarlyStopping: {self.metric!r} did not improve on {checker.best:.6g} "
                f"for {checker.bad_validations} validations"
                if checker.best is not None
                else f"EarlyStopping: {self.metric!r} was never finite in {checker.bad_validations} validations"
            )
            trainer.state.stopped_by = reason
            logger.info("%s; stopping at validation %d.", reason, checker.validations)
            trainer.terminate()

    def state_dict(self) -> dict[str, Any]:
        return self.checker.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.checker.load_state_dict(state_dict)
