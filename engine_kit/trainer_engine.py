"""``TrainerEngine``: the ignite engine ``create_trainer`` returns, with the window kept whole across runs."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Callable

from ignite.engine import Events, EventsList
from ignite.engine.events import CallableEventWithFilter, RemovableEventHandle, State
from ignite.handlers.param_scheduler import ParamGroupScheduler, ParamScheduler
from torch.optim.lr_scheduler import LRScheduler

from engine_kit.checks import check_run_arguments
from engine_kit.engine import GuardedEngine
from engine_kit.errors import CheckpointMismatchError, fix_message

_PER_ITERATION = (Events.ITERATION_STARTED, Events.ITERATION_COMPLETED)


def _starts_a_step(engine: GuardedEngine, _: int) -> bool:
    # The same moment as StepEvents.STEP_STARTED: a window is about to open and
    # it starts a new step (not the retry of a step GradScaler skipped).
    state = engine.state
    return state.window_position == 0 and state.steps_started == state.optimizer_steps


def _completed_a_step(engine: GuardedEngine, _: int) -> bool:
    output = engine.state.output
    return engine.state.window_position == 0 and bool(getattr(output, "stepped", False))


def _is_param_scheduler(handler: Callable) -> bool:
    return isinstance(handler, (ParamScheduler, ParamGroupScheduler))


class TrainerEngine(GuardedEngine):
    """A ``GuardedEngine`` driving a ``TrainStep``: one iteration is one micro-batch.

    What it adds to ignite's ``Engine``:

    * ``run`` refuses arguments ignite would accept silently (``max_epochs``
      0, -1 or 1.5, empty data) with a "To fix" error.
    * An ignite ``ParamScheduler`` attached to ``ITERATION_STARTED`` /
      ``ITERATION_COMPLETED`` of a trainer with ``accumulation_steps > 1``
      warns, and is called once per optimizer step (at the window's first /
      last micro-batch) rather than once per micro-batch, whose values all but
      the last would never reach an update. ``StepEvents.STEP_STARTED`` is the
      documented event for them.
    * An exception discards the open window (gradients zeroed, no step) before
      the ``EXCEPTION_RAISED`` handlers run.
    * ``state_dict()`` carries ``window_position``; ``load_state_dict`` refuses a
      state taken inside a window, whose partial gradients no state dict holds.
    """

    def __init__(self, step: Callable) -> None:
        super().__init__(step)
        self.step = step  # handlers reach the objects the step drives (optimizer, scaler, model) here
        self._warned_mid_window_save = False

    def run(
        self,
        data: Any = None,
        max_epochs: int | None = None,
        max_iters: int | None = None,
        epoch_length: int | None = None,
    ) -> State:
        check_run_arguments(data, max_epochs, max_iters, epoch_length)
        return super().run(data, max_epochs=max_epochs, max_iters=max_iters, epoch_length=epoch_length)

    def add_event_handler(self, event_name: Any, handler: Callable, *args: Any, **kwargs: Any) -> RemovableEventHandle:
        event_name = self._once_per_step(event_name, handler)
        return super().add_event_handler(event_name, handler, *args, **kwargs)

    def _once_per_step(self, event_name: Any, handler: Callable) -> Any:
        accumulation = getattr(self.step, "accumulation_steps", 1)
        if accumulation == 1 or isinstance(event_name, EventsList) or event_name not in _PER_ITERATION:
            return event_name
        torch_scheduler = isinstance(getattr(handler, "__self__", None), LRScheduler)
        if not (_is_param_scheduler(handler) or torch_scheduler):
            return event_name
        filtered = isinstance(event_name, CallableEventWithFilter) and event_name.filter is not None
        gated = _is_param_scheduler(handler) and not filtered
        base = Events.ITERATION_STARTED if event_name == Events.ITERATION_STARTED else Events.ITERATION_COMPLETED
        effect = (
            "engine_kit calls it once per optimizer step (at the window's "
            f"{'first' if base == Events.ITERATION_STARTED else 'last'} micro-batch)"
            if gated
            else "it advances on every micro-batch, and only the value set at a window's last micro-batch reaches "
            "an update"
        )
        fix = (
            "use handlers.attach_scheduler(trainer, scheduler), which steps it after each optimizer step."
            if torch_scheduler
            else "attach it to StepEvents.STEP_STARTED, which fires once per optimizer step before the step's "
            "first forward (and holds on a step GradScaler skipped)."
        )
        warnings.warn(
            f"{type(getattr(handler, '__self__', handler)).__name__} attached to Events.{base.name} of a trainer with "
            f"accumulation_steps={accumulation}: {effect}. To fix: {fix}",
            UserWarning,
            stacklevel=3,  # the caller of add_event_handler
        )
        if not gated:
            return event_name
        return base(event_filter=_starts_a_step if base == Events.ITERATION_STARTED else _completed_a_step)

    def _handle_exception(self, e: BaseException) -> None:
        if self.state.window_position > 0:
            self.step.discard_window(self)
        super()._handle_exception(e)

    def state_dict(self) -> Any:
        if self.state.window_position > 0 and not self._warned_mid_window_save:
            self._warned_mid_window_save = True
            warnings.warn(
                f"trainer.state_dict() taken inside an accumulation window (window_position="
                f"{self.state.window_position}): load_state_dict will refuse it. To fix: save on "
                "StepEvents.OPTIMIZER_STEP_COMPLETED.",
                UserWarning,
                stacklevel=2,
            )
        return super().state_dict()

    def load_state_dict(self, state_dict: Mapping) -> None:
        position = state_dict.get("window_position", 0)
        if position:
            raise CheckpointMismatchError(
                fix_message(
                    f"this trainer state was saved inside an accumulation window (window_position={position} "
                    f"of accumulation_steps={getattr(self.step, 'accumulation_steps', '?')}): the window's partial "
                    "gradients are in no state dict, so resuming would silently make a different run. "
                    "Nothing was loaded.",
                    "save checkpoints on StepEvents.OPTIMIZER_STEP_COMPLETED (every=N counts optimizer steps), "
                    "or on ITERATION_COMPLETED(every=N) with N a multiple of accumulation_steps; then resume "
                    "from such a checkpoint.",
                )
            )
        completed = dict(state_dict)
        # States saved before these counters existed: at a window boundary both follow.
        completed.setdefault("window_position", 0)
        completed.setdefault("steps_started", completed.get("optimizer_steps", 0))
        super().load_state_dict(completed)
        recheck_loss = getattr(self.step, "recheck_loss", None)
        if recheck_loss is not None:
            recheck_loss()  # the loss is checked in full on the first micro-batch after a load
