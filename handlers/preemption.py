"""Preemption: on SIGTERM or SIGINT, finish the window, save, stop, and say so.

A cluster scheduler sends SIGTERM some seconds before it kills a job. With
``Preemption`` attached, the signal only sets a flag; the run finishes the
accumulation window in progress, writes a checkpoint through
``CheckpointRotation`` (whatever ``every_steps`` says), stops, and leaves
``trainer.state.preempted`` set to the signal's name. The script then exits
with ``PREEMPTED_EXIT_STATUS`` (75, ``EX_TEMPFAIL``: "try again later"); the
next run with ``resume="auto"`` continues from that checkpoint exactly.

The signal handlers are installed only while the run goes, only in the main
thread (elsewhere Python refuses them: the run then keeps the default
behaviour and says so once), and the previous handlers come back when the
run ends however it ends. A second signal while the run winds down is passed
to the previous handler: SIGINT twice interrupts at once.
"""

from __future__ import annotations

import signal
import threading
import warnings
from typing import Any, Callable

from ignite.engine import Engine, Events

from engine_kit.distributed import any_rank_every
from engine_kit.engine import cleanup_handler
from engine_kit.errors import fix_message
from handlers.base import Handler
from handlers.checkpoint import CheckpointRotation

PREEMPTED_EXIT_STATUS = 75
"""Exit status of a run stopped by ``Preemption`` after saving (BSD ``EX_TEMPFAIL``)."""

_Handler = Callable[[int, Any], Any] | int | None


AGREE_EVERY_WINDOWS = 8
"""Multi-process: how many optimizer windows apart the ranks compare their stop requests."""


def ranks_agree_to_stop(requested: bool, engine: Engine, *, at_epoch_end: bool = False) -> bool:
    """Whether the run stops at this window boundary, the same answer on every rank.

    Under torchrun a signal may reach the ranks at different windows (or only
    one of them); a rank that stopped alone would leave the others waiting in
    their next collective. So the ranks compare their flags (an all-reduce,
    a host sync) every ``AGREE_EVERY_WINDOWS`` windows and at every epoch end,
    points every rank reaches together: all save the same step and stop
    together, at most that many windows after the signal. One process decides
    alone, at once.
    """
    return any_rank_every(requested, engine.state.windows, AGREE_EVERY_WINDOWS, now=at_epoch_end)


class Preemption(Handler):
    """Stop at the next window boundary after SIGTERM/SIGINT, with a checkpoint.

    Attach it after ``rotation`` (it runs after the rotation's own saves).

    Args:
        rotation: the run's ``CheckpointRotation``: the final checkpoint goes through it.
        signals: the signals that request the stop.

    >>> import tempfile, torch
    >>> from engine_kit import create_trainer
    >>> model = torch.nn.Linear(2, 1)
    >>> trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.mse_loss)
    >>> rotation = CheckpointRotation(tempfile.mkdtemp(), keep_last=1); rotation.attach(trainer)
    >>> Preemption(rotation).attach(trainer)
    >>> data = [(torch.randn(4, 2), torch.randn(4, 1))] * 3
    >>> trainer.run(data, max_epochs=1).preempted is None
    True
    """

    def __init__(self, rotation: CheckpointRotation, *, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        super().__init__()
        if not isinstance(rotation, CheckpointRotation):
            problem = f"rotation is a {type(rotation).__name__}, not a CheckpointRotation."
            raise TypeError(fix_message(problem, "pass the CheckpointRotation attached to the same trainer."))
        if not signals or not all(isinstance(s, int) for s in signals):
            raise ValueError(fix_message(f"signals={signals!r} is not a non-empty tuple of signal numbers.",
                                         "pass e.g. signals=(signal.SIGTERM,)."))
        self.rotation = rotation
        self.signals = tuple(signals)
        self.requested: str | None = None
        self._previous: dict[int, _Handler] = {}

    def attach(self, trainer: Engine) -> None:
        """Register on ``trainer`` after ``rotation``."""
        self._claim(trainer)
        trainer.state.preempted = None
        trainer.add_event_handler(Events.STARTED, self._install)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch_completed)
        trainer.add_event_handler(Events.COMPLETED, self._restore)
        trainer.add_event_handler(Events.EXCEPTION_RAISED, self._restore_after_error)

    # -- signals -----------------------------------------------------------
    def _install(self, engine: Engine) -> None:
        self.requested = None
        engine.state.preempted = None
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("Preemption: the run is not in the main thread, where signal handlers live; "
                          "SIGTERM/SIGINT keep their default behaviour.", stacklevel=2)
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _restore(self, *_: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    @cleanup_handler  # puts the handlers back; never decides the error's fate
    def _restore_after_error(self, engine: Engine, error: BaseException) -> None:
        self._restore()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only a flag here: the step, or a checkpoint being written, runs on undisturbed.
        self.requested = signal.Signals(signum).name
        previous = self._previous.get(signum)
        if signum in self._previous:
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)  # a second one acts at once

    # -- stopping ----------------------------------------------------------
    def __call__(self, engine: Engine) -> None:
        state = engine.state
        last_of_epoch = state.epoch_length is not None and state.iteration % state.epoch_length == 0
        if state.window_position == 0 and not last_of_epoch:
            self._stop_if_requested(engine)

    def _on_epoch_completed(self, engine: Engine) -> None:
        self._stop_if_requested(engine, at_epoch_end=True)  # the epoch's last window is closed and validated by now

    def _stop_if_requested(self, engine: Engine, at_epoch_end: bool = False) -> None:
        if not ranks_agree_to_stop(self.requested is not None, engine, at_epoch_end=at_epoch_end):
            return
        signame = self.requested or "a signal on another rank"
        saved = self.rotation.save_now(engine, reason=signame)
        engine.state.preempted = signame
        engine.state.stopped_by = f"preempted by {signame} at optimizer step {engine.state.optimizer_steps}" + (
            "" if saved else " (the save was refused, see the warning)"
        )
        engine.terminate()
