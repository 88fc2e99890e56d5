"""Validation: run the evaluator every N epochs or optimizer steps and keep the history."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable
from typing import Any, Mapping

import torch
from ignite.engine import Engine, Events

from engine_kit.doctor.data_checks import footprint as _footprint  # the checks the loop doctor runs too
from engine_kit.doctor.data_checks import shared_samples, shuffle_reason
from engine_kit.errors import fix_message
from engine_kit.events import StepEvents
from engine_kit.stateful import register_stateful
from handlers.base import Handler
from handlers.events import ValidationEvents, register_validation_events


def _check_every(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(fix_message(f"{name}={value!r} is not an integer.", f"pass {name}=1 or another integer >= 1."))
    if value < 1:
        raise ValueError(fix_message(f"{name}={value} is below 1.", f"pass {name}=1 or another integer >= 1."))
    return int(value)


def _as_number(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value  # non-scalar metrics (a confusion matrix...) are kept as computed


class Validation(Handler):
    """Runs ``evaluator.run(loader)`` every N epochs or every N optimizer steps.

    After each run it sets ``trainer.state.val_metrics`` (the evaluator's
    metrics, scalars as floats), appends ``{"validation": k, "epoch": e,
    "optimizer_steps": s, **metrics}`` to ``trainer.state.val_history``,
    increments ``trainer.state.validations`` and fires
    ``ValidationEvents.VALIDATION_COMPLETED`` on the trainer, where
    EarlyStopping, ReduceLROnPlateau, checkpoints and loggers pick it up. The
    evaluator puts the model back in train mode when it finishes.

    The history round-trips through checkpoints (registered as "validation");
    loading it also restores ``val_history``, ``val_metrics`` and
    ``validations`` on the trainer, so ``every=`` filters keep counting.

    A shuffled validation loader is refused: metrics do not need it, and it
    usually means the training loader was passed by mistake. Validation data
    that shares samples with the training data raises a ``UserWarning``: the
    same dataset object, or ``Subset``s (nested too) of one base dataset with
    common indices. The training data is ``train_data`` when given (checked
    at construction), else the data of each ``trainer.run(...)`` (checked when
    the run starts, warned once).

    Args:
        evaluator: the engine from ``engine_kit.create_evaluator``.
        loader: the validation data, in a fixed order.
        every_epochs: validate at the end of every N-th epoch.
        every_steps: validate after every N-th optimizer step (instead of epochs).
            With neither given, validation runs every epoch; both is an error.
        train_data: the training loader or dataset, for the overlap check.

    >>> from ignite.metrics import MeanSquaredError
    >>> from engine_kit import create_evaluator, create_trainer
    >>> model = torch.nn.Linear(2, 1)
    >>> trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                          torch.nn.functional.mse_loss)
    >>> evaluator = create_evaluator(model, metrics={"mse": MeanSquaredError()})
    >>> data = [(torch.randn(4, 2), torch.randn(4, 1)) for _ in range(3)]
    >>> validation = Validation(evaluator, data[:1], every_steps=2)
    >>> validation.attach(trainer)
    >>> state = trainer.run(data, max_epochs=2)
    >>> [(v["epoch"], v["optimizer_steps"]) for v in state.val_history], model.training
    ([(1, 2), (2, 4), (2, 6)], True)
    """

    state_keys = ("history",)

    def __init__(
        self,
        evaluator: Engine,
        loader: Any,
        *,
        every_epochs: int | None = None,
        every_steps: int | None = None,
        train_data: Any = None,
    ) -> None:
        super().__init__()
        if not isinstance(evaluator, Engine):
            raise TypeError(
                fix_message(
                    f"evaluator is a {type(evaluator).__name__}, not an ignite Engine.",
                    "pass the engine that engine_kit.create_evaluator(model, metrics=...) returned.",
                )
            )
        every_epochs, every_steps = _check_every("every_epochs", every_epochs), _check_every("every_steps", every_steps)
        if every_epochs is not None and every_steps is not None:
            raise ValueError(
                fix_message(
                    f"every_epochs={every_epochs} and every_steps={every_steps} were both given.",
                    "pass one of them: every_epochs=N validates after every N-th epoch, "
                    "every_steps=N after every N-th optimizer step.",
                )
            )
        if every_epochs is None and every_steps is None:
            every_epochs = 1
        if not isinstance(loader, Iterable) or isinstance(loader, (str, bytes)):
            raise TypeError(
                fix_message(
                    f"loader is a {type(loader).__name__}, not an iterable of batches.",
                    "pass the validation DataLoader (shuffle=False) or a list of (x, y) batches.",
                )
            )
        reason = shuffle_reason(loader)
        if reason is not None:
            raise ValueError(
                fix_message(
                    f"the validation loader shuffles: {reason}.",
                    "build the validation loader with shuffle=False (validation needs no random order; "
                    "a shuffled one is usually the training loader passed by mistake).",
                )
            )
        self.evaluator = evaluator
        self.loader = loader
        self.every_epochs = every_epochs
        self.every_steps = every_steps
        self.train_data = train_data
        self.history: list[dict[str, Any]] = []
        self._trainer: Engine | None = None
        self._overlap_warned = False
        if train_data is not None:
            self._check_overlap(train_data)

    def attach(self, trainer: Engine) -> None:
        """Validate on ``trainer``'s schedule and register the history for checkpoints."""
        if self.every_steps is not None and not trainer.has_registered_events(StepEvents.OPTIMIZER_STEP_COMPLETED):
            raise RuntimeError(
                fix_message(
                    f"every_steps={self.every_steps} needs a trainer that fires "
                    f"StepEvents.OPTIMIZER_STEP_COMPLETED; this {type(trainer).__name__} does not.",
                    "attach to the engine that engine_kit.create_trainer(...) returned, or use every_epochs.",
                )
            )
        self._claim(trainer)
        self._trainer = trainer
        register_validation_events(trainer)
        if self.every_steps is not None:
            trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED(every=self.every_steps), self)
        else:
            trainer.add_event_handler(Events.EPOCH_COMPLETED(every=self.every_epochs), self)
        if self.train_data is None:
            trainer.add_event_handler(Events.STARTED, self._check_run_data)
        register_stateful(trainer, "validation", self)

    def __call__(self, trainer: Engine) -> None:
        """Run the evaluator once, record its metrics and fire VALIDATION_COMPLETED."""
        self.evaluator.run(self.loader)
        metrics = {name: _as_number(value) for name, value in self.evaluator.state.metrics.items()}
        state = trainer.state
        state.validations += 1
        entry = {
            "validation": state.validations,
            "epoch": state.epoch,
            "optimizer_steps": getattr(state, "optimizer_steps", None),
            **metrics,
        }
        state.val_metrics = metrics
        state.val_history.append(entry)
        self.history.append(dict(entry))
        trainer.fire_event(ValidationEvents.VALIDATION_COMPLETED)

    @property
    def latest(self) -> dict[str, Any] | None:
        """The newest history entry (a copy), or None before the first validation."""
        return dict(self.history[-1]) if self.history else None

    def _check_run_data(self, trainer: Engine) -> None:
        if trainer.state.dataloader is not None:
            self._check_overlap(trainer.state.dataloader)

    def _check_overlap(self, train_data: Any) -> None:
        if self._overlap_warned:
            return
        shared = shared_samples(train_data, self.loader)
        if shared is None:
            return
        self._overlap_warned = True
        base, _ = _footprint(self.loader)
        warnings.warn(
            f"validation and training data overlap: {shared} validation samples are also training samples "
            f"(both draw from the same {type(base).__name__} at {id(base):#x}), so validation metrics "
            "overstate generalization. Split the dataset into disjoint parts, e.g. "
            "torch.utils.data.random_split(dataset, [0.8, 0.2]), and validate on the held-out one.",
            UserWarning,
            stacklevel=3,
        )

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = [dict(entry) for entry in self.history]
        if self._trainer is None:
            return
        # Put the trainer where the checkpointed run was, so every= filters and
        # metric-driven handlers continue from the restored validation count.
        state = self._trainer.state
        state.val_history = [dict(entry) for entry in self.history]
        state.validations = self.history[-1]["validation"] if self.history else 0
        last = self.history[-1] if self.history else {}
        state.val_metrics = {k: v for k, v in last.items() if k not in ("validation", "epoch", "optimizer_steps")}

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(entry) for entry in self.history]}
