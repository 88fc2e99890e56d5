"""TensorBoardLogger: loss, learning rates, validation metrics and skipped steps in TensorBoard."""

from __future__ import annotations

import numbers
import os
import time
from typing import Any, Mapping

import ignite.distributed as idist
from ignite.engine import Engine, Events

from engine_kit.engine import cleanup_handler
from engine_kit.run_directory import prepare_run_directory
from engine_kit.errors import fix_message
from engine_kit.events import StepEvents
from engine_kit.stateful import register_stateful
from handlers.base import Handler, check_positive_int, require_step_events
from handlers.events import ValidationEvents, register_validation_events
from handlers.step_window import StepWindow, Window, read_windows

from handlers.event_file import write_purge_marker, write_scalars


class TensorBoardLogger(Handler):
    """Writes training curves with a tensorboardX ``SummaryWriter``.

    Tags, all against the optimizer step (``trainer.state.optimizer_steps``):

    * ``train/loss``: each step's window loss, the sample-weighted mean of
      the window's micro-batch losses (the loss whose gradient the step
      applied; the plain mean with equal batches). Kept as device tensors and
      read with one transfer every ``log_every`` steps, at each epoch end and
      when the run ends, so logging adds no host sync per step. A window that
      fp16's GradScaler skipped logs no loss.
    * ``lr/group{i}``: the learning rate each step used, per param group
      (read before the step, so a scheduler's own stepping never shifts it).
    * ``train/skipped_steps``: the running count, whenever a step is skipped.
    * ``val/<metric>``: each scalar of ``trainer.state.val_metrics`` on
      ``ValidationEvents.VALIDATION_COMPLETED``.

    Nothing is written per step: each flush writes one event per step (its
    loss and learning rates, stamped with the step's wall time) in a single
    file write (``write_scalars``), which costs a few µs a step where one
    ``add_scalar`` per value would cost 30-50 µs each.

    ``writer`` is created on first use (from ``log_dir``; tensorboardX's
    ``runs/<date>_<host>`` when both are None), so building the logger writes
    nothing. Share it with other handlers, e.g. ``GradNormLogger(writer=tb.writer)``.
    When the run completes or fails (EXCEPTION_RAISED) the logger flushes and
    closes the writer; tensorboardX reopens a closed writer (in a new event file) on
    its next write, so a later run or a sharing handler can still log. The
    close runs after every COMPLETED handler attached before the run started,
    so handlers sharing the writer write their last records first.

    Resume: the state (registered as "tensorboard") is the last step written.
    Loading it makes TensorBoard drop what a killed run wrote after that step
    (a ``purge_step`` marker), and steps up to it are never rewritten. Only
    rank 0 writes.

    Args:
        log_dir: the event file directory; mutually exclusive with ``writer``.
        writer: an existing ``SummaryWriter`` (or an object with ``add_scalar``,
            ``flush`` and ``close``, which then gets one ``add_scalar`` per value).
        log_every: optimizer steps buffered between two host reads of the losses.

    >>> import tempfile, torch
    >>> from engine_kit import create_trainer
    >>> model = torch.nn.Linear(2, 1)
    >>> trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                          torch.nn.functional.mse_loss)
    >>> tb = TensorBoardLogger(log_dir=tempfile.mkdtemp(), log_every=2)
    >>> tb.attach(trainer)
    >>> _ = trainer.run([(torch.randn(4, 2), torch.randn(4, 1)) for _ in range(3)], max_epochs=1)
    >>> tb.last_step
    3
    """

    state_keys = ("last_step",)

    def __init__(
        self, *, log_dir: str | os.PathLike[str] | None = None, writer: Any = None, log_every: int = 50
    ) -> None:
        super().__init__()
        if log_dir is not None and writer is not None:
            raise ValueError(
                fix_message(
                    f"both log_dir={os.fspath(log_dir)!r} and a writer were given.",
                    "pass log_dir to let the logger create its SummaryWriter, or writer to share one, not both.",
                )
            )
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(fix_message(f"log_dir={log_dir!r} is not a path.", "pass a directory such as 'runs/exp1'."))
        if writer is not None and not all(hasattr(writer, name) for name in ("add_scalar", "flush", "close")):
            raise TypeError(
                fix_message(
                    f"writer is a {type(writer).__name__} without add_scalar/flush/close.",
                    "pass a tensorboardX.SummaryWriter, or log_dir to let the logger create one.",
                )
            )
        # A bad directory fails here, naming the path, not as an OSError at the first flush.
        self.log_dir = None if log_dir is None else os.fspath(prepare_run_directory(log_dir))
        self.log_every = check_positive_int("log_every", log_every, 50)
        self.last_step = 0
        self._writer = writer
        self._purge_step: int | None = None
        self._window: StepWindow | None = None
        self._pending: list[tuple[int, float, Window]] = []  # (step, wall time, its window)
        self._lr_tags: list[str] = []
        self._flushes = 0
        self._suffix_base: str | None = None
        self._reopens = 0
        self._enabled = True

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter`` (created on first access when the logger owns it)."""
        if self._writer is None:
            from tensorboardX import SummaryWriter  # imported here: nothing happens at import

            self._writer = SummaryWriter(logdir=self.log_dir)
            # The purge marker goes into this first event file only (tensorboardX's own
            # purge_step would repeat it in every reopened file, hiding the resumed run's steps).
            if self._purge_step is not None:
                write_purge_marker(self._writer, self._purge_step)
        return self._writer

    def attach(self, trainer: Engine) -> None:
        """Log ``trainer``'s steps and validations; register the last step for checkpoints."""
        require_step_events(trainer, type(self).__name__)
        self._claim(trainer)
        self._enabled = idist.get_rank() == 0
        register_validation_events(trainer)
        if self._enabled:
            self._window = StepWindow.of(trainer)
        trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, self)
        trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_SKIPPED, self._on_skipped)
        trainer.add_event_handler(ValidationEvents.VALIDATION_COMPLETED, self._on_validation)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.flush)
        trainer.add_event_handler(Events.STARTED, self._close_last)
        trainer.add_event_handler(Events.TERMINATE, self._on_terminate)
        trainer.add_event_handler(Events.EXCEPTION_RAISED, self._on_exception)
        register_stateful(trainer, "tensorboard", self)

    def _close_last(self, engine: Engine) -> None:
        # Handlers sharing the writer (GradNormLogger) flush on COMPLETED too: closing
        # after every handler attached before the run keeps their last records in this file.
        if engine.has_event_handler(self.close, Events.COMPLETED):
            engine.remove_event_handler(self.close, Events.COMPLETED)
        engine.add_event_handler(Events.COMPLETED, self.close)

    def _on_terminate(self, engine: Engine) -> None:
        # COMPLETED follows TERMINATE (and closes) unless the run was stopped with skip_completed.
        if engine.should_terminate == "skip_completed":
            self.close()
        else:
            self.flush()

    def __call__(self, engine: Engine) -> None:
        """Buffer this optimizer step's loss and learning rates; flush every ``log_every`` steps."""
        if not self._enabled:
            return
        self._pending.append((engine.state.optimizer_steps, time.time(), self._window.close(engine)))
        if len(self._pending) >= self.log_every:
            self.flush()

    def _on_skipped(self, engine: Engine) -> None:
        if not self._enabled:
            return
        state = engine.state
        self._window.close(engine)  # a skipped window has no step of its own to plot the loss at
        row = (state.optimizer_steps, time.time(), [("train/skipped_steps", state.skipped_steps)])
        write_scalars(self.writer, [row])

    def _on_validation(self, engine: Engine) -> None:
        if not self._enabled:
            return
        values = [
            (f"val/{name}", float(value))
            for name, value in engine.state.val_metrics.items()
            if isinstance(value, numbers.Real) and not isinstance(value, bool)
        ]
        if values:
            write_scalars(self.writer, [(engine.state.optimizer_steps, time.time(), values)])

    def flush(self) -> None:
        """Read the buffered losses with one transfer; write each step's loss and learning rates as one event."""
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        read_windows([window for _, _, window in rows])
        tags = self._lr_tags
        events = []
        for step, wall_time, window in rows:
            if step <= self.last_step:
                continue  # already in the event files from before the checkpoint
            loss, _, rates = window.values  # type: ignore[misc]
            if len(rates) > len(tags):
                tags += [f"lr/group{i}" for i in range(len(tags), len(rates))]
            values = [("train/loss", loss), *zip(tags, rates)] if loss is not None else [*zip(tags, rates)]
            events.append((step, wall_time, values))
        write_scalars(self.writer, events)
        if events:
            self.last_step = events[-1][0]
        self._flushes += 1

    @property
    def flushes(self) -> int:
        """Host reads of buffered losses made so far."""
        return self._flushes

    def close(self) -> None:
        """Write what is pending, then flush and close the writer (it reopens on its next write)."""
        self.flush()
        if self._writer is not None:
            self._close_writer()

    def _close_writer(self) -> None:
        writer = self._writer
        writer.flush()
        writer.close()
        # tensorboardX names an event file by the second and opens it with "wb": a
        # writer reopened within the same second would overwrite the file it just
        # closed. A new suffix gives the next file a name of its own.
        suffix = getattr(writer, "_filename_suffix", None)
        if isinstance(suffix, str):
            if self._suffix_base is None:
                self._suffix_base = suffix
            self._reopens += 1
            writer._filename_suffix = f"{self._suffix_base}.{self._reopens}"

    @cleanup_handler  # flushes and closes: never swallows the run's error
    def _on_exception(self, engine: Engine, error: BaseException) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        self.flush()  # the checkpoint must cover every step taken so far
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.last_step = int(self.last_step)
        self._pending.clear()  # buffered before the load: the abandoned timeline
        if self._window is not None:
            self._window.reset()
        if not self._enabled:
            return
        # A killed run may have written steps after the checkpoint: a purge marker
        # at the next step makes TensorBoard drop them when it reads the files.
        purge_step = self.last_step + 1
        if self._writer is None:
            self._purge_step = purge_step
        elif hasattr(self._writer, "_get_file_writer"):
            self._close_writer()
            write_purge_marker(self._writer, purge_step)  # in a new event file
