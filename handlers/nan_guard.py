"""NanGuard: stop on a non-finite loss or gradient norm, and never save such a model."""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch
from ignite.engine import Engine, Events

from engine_kit.events import StepEvents
from engine_kit.state import StepOutput
from engine_kit.stateful import add_save_veto
from handlers.base import Handler, check_positive_int
from handlers.step_window import StepWindow, Window, existing_window, read_windows


class NanGuard(Handler):
    """Stops training once a loss or a gradient norm is NaN or infinite.

    It keeps every micro-batch's loss (and, for each window that the
    optimizer stepped, the pre-clip gradient norm) as the step's own device
    tensors: no device op, no host sync. On an ``engine_kit`` trainer it takes
    them from the step when a window closes (the step records the open
    window's losses, ``TrainStep.keep_window_losses``), so it runs no handler
    per micro-batch; on any other engine it keeps each ``ITERATION_COMPLETED``
    output. They are checked together (one stack, one transfer of the
    stacked values) once ``check_every`` micro-batches have gathered (on a
    trainer, at the window that reaches them), at the end of each epoch, at
    the end of the run, and whenever a checkpoint handler asks the save veto.
    Attached after a logger of the trainer's window losses (TensorBoardLogger,
    StepLog, GradNormLogger: ``attach_standard``'s order), it checks the
    window losses and norms those loggers already read to the host: a window
    whose mean loss (summed in double precision, so finite exactly when every
    micro-batch loss is) and norm are finite costs no device op; only a
    non-finite one is read again micro-batch by micro-batch, to name its
    iteration.
    Each value keeps its iteration, so a non-finite loss at any micro-batch of
    a window is named by its own iteration, however late the check that
    finds it. Attaching the guard to a trainer sets its step's
    ``track_grad_norm``, so the norm is there to check. On the first
    non-finite value it sets ``engine.state.nan_detected``, writes
    ``engine.state.stopped_by`` (naming the iteration where it appeared),
    warns once and calls ``engine.terminate()``.

    The save veto checks at call time, including the micro-batches of the
    window in progress, so a model updated from a NaN gradient is never saved
    as "last" or "best" even between two periodic checks. fp16 steps that
    GradScaler skipped (an infinite norm is how it detects overflow) are not
    counted: the scaler already handled them.

    ``check_every`` counts iterations (micro-batches), not optimizer steps:
    with gradient accumulation over ``k`` micro-batches, ``check_every=k * n``
    checks every ``n`` optimizer steps (``attach_standard`` passes its
    ``log_every`` steps this way). A longer cadence only delays the stop, never
    a save's veto, which checks everything pending before each checkpoint.

    Args:
        check_every: iterations (micro-batches) between two host reads of the values.

    >>> import torch
    >>> from engine_kit import create_trainer
    >>> from engine_kit.stateful import save_refusal
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> trainer = create_trainer(model, opt, torch.nn.functional.mse_loss)
    >>> NanGuard(check_every=4).attach(trainer)
    >>> data = [(torch.randn(4, 2), torch.randn(4, 1)) for _ in range(3)]
    >>> data.append((torch.randn(4, 2), torch.full((4, 1), float("nan"))))
    >>> import warnings
    >>> with warnings.catch_warnings(record=True):  # NanGuard warns once when it stops the run
    ...     state = trainer.run(data * 3, max_epochs=1)
    >>> state.iteration, state.nan_detected, state.stopped_by
    (4, True, 'NanGuard: non-finite loss or gradient norm at iteration 4')
    >>> save_refusal(trainer) is not None
    True
    """

    def __init__(self, *, check_every: int = 10) -> None:
        super().__init__()
        self.check_every = check_positive_int("check_every", check_every, 10)
        # What to check and the iteration of each, read together at the next check: a trainer's
        # closed windows (``_Window``), other engines' StepOutputs whole (immutable tuples) or
        # loss and norm tensors.
        self._pending: list[_Window | StepOutput | torch.Tensor] = []
        self._iterations: list[int] = []
        self._gathered = 0  # micro-batches pending since the last check
        self._step: Any = None  # the trainer's step, whose window losses are read (None: another engine)
        self._shared: StepWindow | None = None  # the loggers' window of the trainer, whose host reads are reused
        self._taken: Any = None  # the step's list of the last window taken (the step starts a new list per window)
        self._last_output: Any = None
        self._nan_iteration: int | None = None

    @property
    def nan_iteration(self) -> int | None:
        """The iteration whose loss or gradient norm was first found non-finite (None so far)."""
        return self._nan_iteration

    @property
    def reason(self) -> str | None:
        """The ``stopped_by`` text once a non-finite value was found, else None."""
        if self._nan_iteration is None:
            return None
        return f"NanGuard: non-finite loss or gradient norm at iteration {self._nan_iteration}"

    def attach(self, engine: Engine) -> None:
        """Watch every micro-batch of ``engine`` and veto its checkpoints once a value is non-finite."""
        self._claim(engine)
        step = getattr(engine, "step", None)
        if step is not None:
            step.track_grad_norm = True  # the step computes the norm only when a handler reads it
        engine.state.nan_detected = False
        if not hasattr(engine.state, "stopped_by"):
            engine.state.stopped_by = None
        if hasattr(step, "keep_window_losses"):
            step.keep_window_losses = True  # the step records each window's losses: no handler per micro-batch
            self._step = step
            self._shared = existing_window(engine)
            for event in (StepEvents.OPTIMIZER_STEP_COMPLETED, StepEvents.OPTIMIZER_STEP_SKIPPED):
                engine.add_event_handler(event, self._window_closed)
        else:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.check)
        engine.add_event_handler(Events.COMPLETED, self.check)
        add_save_veto(engine, self.veto)

    def __call__(self, engine: Engine) -> None:
        """Keep this iteration's values (engines without a trainer's step); check every ``check_every``."""
        state = engine.state
        # The veto may look at an iteration before ITERATION_COMPLETED does; the
        # output object itself tells whether it was already kept.
        if state.output is not self._last_output:
            self._observe(state.output, state.iteration)
        if state.iteration % self.check_every == 0 or self._gathered >= self.check_every:
            self.check(engine)

    def _window_closed(self, engine: Engine) -> None:
        """Keep the window the step just closed; check once ``check_every`` micro-batches gathered."""
        self._take_closed_window(engine)
        if self._gathered >= self.check_every:
            self.check(engine)

    def _take_closed_window(self, engine: Engine) -> None:
        # Right after a window closed (position 0, no new one opened), the step's list is that window's.
        state = engine.state
        losses = self._step.window_losses
        if state.window_position != 0 or losses is self._taken or not losses:
            return
        iteration = state.iteration
        output = state.output
        norm = output.grad_norm if type(output) is StepOutput and output.stepped else None
        read = self._shared.close(engine) if self._shared is not None else None  # the loggers' Window of this step
        self._pending.append(_Window(losses, iteration, norm, read))
        self._iterations.append(iteration)
        self._gathered += len(losses)
        self._taken = losses

    def _observe(self, output: Any, iteration: int) -> None:
        # References, not copies: the step hands out fresh tensors (and outputs) each time.
        self._last_output = output
        if type(output) is StepOutput:  # unpacked at the check: one append here per micro-batch
            self._pending.append(output)
            self._iterations.append(iteration)
            self._gathered += 1
            return
        loss = getattr(output, "loss", output)
        if not isinstance(loss, torch.Tensor):
            return  # an engine whose output carries no loss: nothing to guard
        self._pending.append(loss.detach() if loss.requires_grad else loss)
        self._iterations.append(iteration)
        self._gathered += 1
        norm = getattr(output, "grad_norm", None) if getattr(output, "stepped", True) else None
        if isinstance(norm, torch.Tensor):
            self._pending.append(norm)
            self._iterations.append(iteration)

    def check(self, engine: Engine) -> bool:
        """Read the pending values (one host sync); stop ``engine`` on the first non-finite one.

        Includes the window in progress: its micro-batches so far are read now
        (and again with their window once it closes).

        Returns:
            True once a non-finite value has been seen.
        """
        state = engine.state
        if self._step is None:
            if state.output is not self._last_output:
                self._observe(state.output, state.iteration)
        else:
            self._take_closed_window(engine)
            position = state.window_position
            if position and self._step.keep_window_losses:  # the open window's micro-batches so far
                self._pending.append(_Window(self._step.window_losses[:position], state.iteration, None))
                self._iterations.append(state.iteration)
        if self._pending:
            pending, iterations = self._pending, self._iterations
            self._pending, self._iterations, self._gathered = [], [], 0
            if self._nan_iteration is None and not _read_and_finite(pending):
                values, owners = _unpack(pending, iterations)
                first = _first_non_finite(values)
                if first is not None:
                    self._stop(engine, owners[first])
        return self._nan_iteration is not None

    def _stop(self, engine: Engine, iteration: int) -> None:
        self._nan_iteration = iteration
        engine.state.nan_detected = True
        engine.state.stopped_by = self.reason
        warnings.warn(
            f"{self.reason}; stopping the run (checkpoints are refused from here on).", RuntimeWarning, stacklevel=2
        )
        engine.terminate()

    def veto(self, engine: Engine) -> str | None:
        """Save veto: a reason once a non-finite value was seen (checked now, not at the last check)."""
        if self.check(engine):
            return f"{self.reason}; the model may hold non-finite parameters."
        return None


class _Window(NamedTuple):
    """A trainer's window as the step recorded it: its micro-batch losses, its last iteration, its norm (or None).

    ``read`` is the loggers' ``Window`` of the same step, when they share one with the guard.
    """

    losses: list[tuple[torch.Tensor, Any]]
    last_iteration: int
    norm: torch.Tensor | None
    read: Window | None = None


def _read_and_finite(pending: list[_Window | StepOutput | torch.Tensor]) -> bool:
    """Whether every pending item is a shared window whose host values are finite (no device op once the loggers read them).

    False sends the check to the tensors themselves (``_unpack``): any other
    item, or a non-finite mean or norm, whose micro-batch is then named.

    >>> from handlers.step_window import Window
    >>> shared = Window(((torch.tensor(1.0), 2), (torch.tensor(3.0), 2)), [0.1], torch.tensor(0.5))
    >>> _read_and_finite([_Window(list(shared.parts), 8, shared.norm, shared)]), shared.values[0]
    (True, 2.0)
    >>> bad = Window(((torch.tensor(1.0), 2), (torch.tensor(float("inf")), 2)), [0.1], None)
    >>> _read_and_finite([_Window(list(bad.parts), 8, None, bad)])
    False
    """
    windows = [item.read for item in pending if type(item) is _Window and item.read is not None]
    if len(windows) != len(pending):
        return False
    read_windows(windows)  # the values the loggers read already: nothing is transferred again
    isfinite = math.isfinite
    for item in pending:
        loss = item.read.values[0]  # type: ignore[union-attr]
        if loss is None or not isfinite(loss):
            return False
        if item.norm is not None:
            norm = item.read.norm_value  # type: ignore[union-attr]
            if norm is None or not isfinite(norm):
                return False
    return True


def _unpack(pending: list[_Window | StepOutput | torch.Tensor], iterations: list[int]) -> tuple[list[torch.Tensor], list[int]]:
    """The tensors to check in ``pending`` and the iteration of each.

    A window gives each micro-batch's loss (its micro-batches are the
    iterations up to its last) and the step's norm; a StepOutput gives its
    loss (detached by the step) and, when it closed a window that the
    optimizer stepped, its pre-clip gradient norm.

    >>> window = _Window([(torch.tensor(6.0), 2), (torch.tensor(7.0), 2)], 8, torch.tensor(9.0))
    >>> outputs = [StepOutput(torch.tensor(1.0), None, False, 4), StepOutput(torch.tensor(2.0), torch.tensor(3.0), True, 4)]
    >>> values, owners = _unpack(outputs + [torch.tensor(5.0), window], [1, 2, 3, 8])
    >>> [v.item() for v in values], owners
    ([1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 9.0], [1, 2, 2, 3, 7, 8, 8])
    """
    values: list[torch.Tensor] = []
    owners: list[int] = []
    for item, iteration in zip(pending, iterations):
        kind = type(item)
        if kind is _Window:
            first = iteration - len(item.losses) + 1
            values += [loss for loss, _ in item.losses]
            owners += range(first, iteration + 1)
            if item.norm is not None:
                values.append(item.norm)
                owners.append(iteration)
            continue
        if kind is not StepOutput:
            values.append(item)
            owners.append(iteration)
            continue
        values.append(item.loss)
        owners.append(iteration)
        # The cheap field first: micro-batches that closed no window never reach the grad_norm property.
        norm = item.grad_norm if item.stepped else None
        if norm is not None:
            values.append(norm)
            owners.append(iteration)
    return values, owners


def _first_non_finite(values: list[torch.Tensor]) -> int | None:
    """The index of the first value holding a NaN or an infinity, with one host sync (None: all finite).

    Scalars (the usual case) are stacked and read as they are: the host tests
    the floats, so finding the first bad one costs no second device op.

    >>> _first_non_finite([torch.tensor(1.0), torch.tensor(float("inf")), torch.tensor(float("nan"))])
    1
    >>> _first_non_finite([torch.ones(2), torch.tensor([0.0, float("nan")])]), _first_non_finite([torch.ones(2)])
    (1, None)
    """
    try:
        stacked = torch.stack(values)
    except RuntimeError:  # values of different shapes or devices: one check each
        return next((i for i, value in enumerate(values) if not bool(torch.isfinite(value).all())), None)
    if stacked.dim() == 1 and stacked.is_floating_point():
        host = stacked.tolist()  # the one host sync of this check
        if all(map(math.isfinite, host)):
            return None
        return next(i for i, value in enumerate(host) if not math.isfinite(value))
    finite = torch.isfinite(stacked)
    if finite.dim() > 1:
        finite = finite.flatten(1).all(dim=1)
    flags = finite.tolist()  # the one host sync of this check
    return None if all(flags) else flags.index(False)
