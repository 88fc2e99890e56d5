"""``resumable_objects``: what ignite's ``Checkpoint`` needs to resume an engine_kit trainer exactly."""

from __future__ import annotations

from typing import Any

from ignite.engine import Engine

from engine_kit.errors import fix_message
from engine_kit.stateful import stateful_objects
from engine_kit.training_state import unwrap_model


def resumable_objects(trainer: Engine) -> dict[str, Any]:
    """Every object whose state makes ``trainer`` resumable, for ``ignite.handlers.Checkpoint``.

    In order: ``"trainer"`` (first, so that a state saved inside an
    accumulation window is refused before anything else is loaded),
    ``"model"`` (unwrapped from DDP), ``"optimizer"``, ``"scaler"`` (the
    GradScaler, disabled outside fp16 but always present), then every stateful
    object registered on the trainer (schedulers, engine_kit handlers) under
    its registered name. Pass the same dict to ``Checkpoint(to_save=...)`` and
    to ``Checkpoint.load_objects(to_load=...)``. With a ``ResumableLoader`` the
    data order follows from the trainer's iteration and the loader's seed; the
    RNG states are not included (``CheckpointRotation`` saves those too).

    >>> import torch
    >>> from engine_kit import create_trainer
    >>> model = torch.nn.Linear(2, 1)
    >>> trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.mse_loss)
    >>> list(resumable_objects(trainer))
    ['trainer', 'model', 'optimizer', 'scaler']
    """
    step = getattr(trainer, "step", None)
    if step is None or not hasattr(step, "optimizer"):
        raise TypeError(
            fix_message(
                f"this {type(trainer).__name__} is not a trainer from engine_kit.create_trainer.",
                "pass the engine that create_trainer(...) returned.",
            )
        )
    objects: dict[str, Any] = {
        "trainer": trainer,
        "model": unwrap_model(step.model),
        "optimizer": step.optimizer,
        "scaler": step.scaler,
    }
    for name, obj in stateful_objects(trainer).items():
        if name in objects:
            raise ValueError(
                fix_message(
                    f"a stateful object is registered under the reserved name {name!r}.",
                    "register it under another name (register_stateful(trainer, 'my_name', obj)).",
                )
            )
        objects[name] = obj
    return objects
