"""Events that handlers add to the trainer."""

from __future__ import annotations

from ignite.engine import Engine, EventEnum


class ValidationEvents(EventEnum):
    """Fired on the *trainer* by ``Validation`` after each evaluator run.

    When it fires, ``trainer.state.val_metrics`` holds the latest metrics (a
    dict of floats) and ``trainer.state.val_history`` the list of all past
    validations. ``every=`` counts ``trainer.state.validations``.

    >>> ValidationEvents.VALIDATION_COMPLETED.value
    'validation_completed'
    """

    VALIDATION_COMPLETED = "validation_completed"


def register_validation_events(trainer: Engine) -> None:
    """Register ``ValidationEvents`` on ``trainer`` once (safe to call repeatedly)."""
    if not trainer.has_registered_events(ValidationEvents.VALIDATION_COMPLETED):
        trainer.register_events(*ValidationEvents, event_to_attr={ValidationEvents.VALIDATION_COMPLETED: "validations"})
    state = trainer.state
    for name, default in (("validations", 0), ("val_metrics", {}), ("val_history", [])):
        if not hasattr(state, name):
            setattr(state, name, default)
    # The count is saved with the trainer's counters so "new since" comparisons survive a resume.
    if "validations" not in trainer.state_dict_user_keys:
        trainer.state_dict_user_keys.append("validations")
