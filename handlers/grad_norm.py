"""GradNormLogger: the pre-clip gradient norm of every optimizer step, read in batches."""

from __future__ import annotations

import math
import numbers
import time
from typing import Any, Mapping, Protocol

import torch
from ignite.engine import Engine, Events

from engine_kit.errors import fix_message
from engine_kit.events import StepEvents
from engine_kit.stateful import register_stateful
from handlers.base import Handler, check_positive_int, check_state_keys, require_step_events
from handlers.step_window import StepWindow, Window, read_windows
from handlers.event_file import write_summaries


class NormWriter(Protocol):
    """The part of a tensorboardX ``SummaryWriter`` that GradNormLogger uses."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> Any: ...

    def add_histogram(self, tag: str, values: Any, global_step: int, bins: Any = ...) -> Any: ...


class GradNormLogger(Handler):
    """Logs the pre-clip global gradient norm of every optimizer step.

    Runs on ``StepEvents.OPTIMIZER_STEP_COMPLETED`` (once per optimizer step,
    never per micro-batch, never on an fp16 step that GradScaler skipped). The
    norm is the one the step already computed: unscaled, before clipping, as a
    device tensor (attaching the logger sets the step's ``track_grad_norm``,
    so the norm is computed even without clipping; a step that still hands out
    none is not logged). It is buffered without a host sync; every ``flush_every``
    steps, at the end of each epoch and when the run completes, the buffer is
    read with a single transfer and turned into per-step values, clipping
    counts and (with a ``writer``) TensorBoard records. A step counts as
    clipped when its norm exceeds the trainer's ``max_grad_norm`` (never when
    clipping is off).

    Reading ``norms``, ``steps_seen``, ``steps_clipped`` or
    ``clipped_fraction`` flushes what is pending first (one host sync), so the
    values are always complete; read them on your own cadence, not per step.

    Args:
        flush_every: optimizer steps buffered between host transfers.
        writer: optional tensorboardX ``SummaryWriter``-like object. Each flush
            writes ``grad_norm/pre_clip`` for every step, then
            ``grad_norm/clipped_fraction`` (running) and ``grad_norm/histogram``
            (the finite norms of the flushed steps) at the last flushed step.
            The scalars go in one event per step, and the histogram after them,
            in one file write per flush (``handlers.event_file.write_summaries``).
        bins: the ``bins`` argument of ``writer.add_histogram`` (a numpy binning
            name or a positive number of bins).

    >>> import torch
    >>> from engine_kit import create_trainer
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> trainer = create_trainer(model, opt, torch.nn.functional.mse_loss,
    ...                          accumulation_steps=2, max_grad_norm=1e-3)
    >>> logger = GradNormLogger(flush_every=2)
    >>> logger.attach(trainer)
    >>> data = [(torch.randn(4, 2), torch.randn(4, 1)) for _ in range(6)]
    >>> _ = trainer.run(data, max_epochs=1)
    >>> [step for step, _ in logger.norms], logger.clipped_fraction
    ([1, 2, 3], 1.0)
    """

    state_keys = ("norms", "steps_seen", "steps_clipped")

    def __init__(
        self, *, flush_every: int = 50, writer: NormWriter | None = None, bins: str | int = "tensorflow"
    ) -> None:
        super().__init__()
        self.flush_every = check_positive_int("flush_every", flush_every, 50)
        if writer is not None and not (hasattr(writer, "add_scalar") and hasattr(writer, "add_histogram")):
            raise TypeError(
                fix_message(
                    f"writer is a {type(writer).__name__} without add_scalar/add_histogram.",
                    "pass a tensorboardX.SummaryWriter (or an object with the same two methods), or None.",
                )
            )
        if isinstance(bins, bool) or not isinstance(bins, (str, numbers.Integral)) or (
            isinstance(bins, numbers.Integral) and bins < 1
        ):
            raise ValueError(
                fix_message(
                    f"bins={bins!r} is neither a binning name nor a positive integer.",
                    "pass bins='tensorflow' (the tensorboardX default), 'auto', or a number of bins such as 30.",
                )
            )
        self.writer = writer
        self.bins = bins
        # (optimizer step, wall time, its window (the step's norm still on the device), clip threshold then)
        self._pending: list[tuple[int, float, Window, float | None]] = []
        self._window: StepWindow | None = None
        self._norms: list[tuple[int, float]] = []
        # The first rows of _norms as a float64 (step, norm) tensor, extended by state_dict with
        # only the rows added since: a save never converts the whole history from Python again.
        self._norm_table = torch.zeros(0, 2, dtype=torch.float64)
        self._steps_seen = 0
        self._steps_clipped = 0
        self._flushes = 0

    def attach(self, engine: Engine) -> None:
        """Log on ``engine``'s optimizer steps and register the statistics for checkpoints."""
        require_step_events(engine, type(self).__name__)
        self._claim(engine)
        step = getattr(engine, "step", None)
        if step is not None:
            step.track_grad_norm = True  # the step computes the norm only when a handler reads it
        # The trainer's shared window: a norm is read once per flush for every handler that logs it.
        self._window = StepWindow.of(engine)
        engine.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.flush)
        engine.add_event_handler(Events.COMPLETED, self.flush)
        register_stateful(engine, "grad_norm", self)

    def __call__(self, engine: Engine) -> None:
        """Buffer this optimizer step's norm (no host sync); flush when the buffer is full."""
        window = self._window.close(engine)
        if window.norm is None:
            return
        limit = getattr(getattr(engine, "step", None), "max_grad_norm", None)
        # The step's own norm tensor, not a copy: the step hands out a fresh one each time.
        self._pending.append((engine.state.optimizer_steps, time.time(), window, limit))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Read the buffered norms (one host transfer, none if another logger read their windows) and update statistics and writer."""
        if not self._pending:
            return
        steps, times, windows, limits = zip(*self._pending)
        read_windows(windows)  # the single host sync of this batch of steps (none if another logger read them)
        values = [window.norm_value for window in windows]
        self._pending.clear()
        self._flushes += 1
        self._norms += zip(steps, values)
        self._steps_seen += len(values)
        # NaN compares False: a non-finite norm is logged but never counted as clipped.
        self._steps_clipped += sum(limit is not None and value > limit for value, limit in zip(values, limits))
        if self.writer is not None:
            rows = [(step, t, [("grad_norm/pre_clip", value)]) for step, t, value in zip(steps, times, values)]
            rows[-1][2].append(("grad_norm/clipped_fraction", self._clipped_fraction()))
            finite = [v for v in values if math.isfinite(v)]  # numpy cannot bin NaN/inf
            histogram = [(steps[-1], times[-1], "grad_norm/histogram", finite, self.bins)] if finite else []
            write_summaries(self.writer, rows, histogram)  # one file write for the whole flush

    def _clipped_fraction(self) -> float:
        return self._steps_clipped / self._steps_seen if self._steps_seen else 0.0

    @property
    def norms(self) -> list[tuple[int, float]]:
        """``(optimizer_step, pre-clip norm)`` for every step seen, oldest first (a copy)."""
        self.flush()
        return list(self._norms)

    @property
    def steps_seen(self) -> int:
        """Optimizer steps logged so far."""
        self.flush()
        return self._steps_seen

    @property
    def steps_clipped(self) -> int:
        """Optimizer steps whose pre-clip norm exceeded ``max_grad_norm``."""
        self.flush()
        return self._steps_clipped

    @property
    def clipped_fraction(self) -> float:
        """``steps_clipped / steps_seen`` (0.0 before the first step)."""
        self.flush()
        return self._clipped_fraction()

    @property
    def flushes(self) -> int:
        """Host transfers made so far (one per flush that had values to read)."""
        return self._flushes

    def state_dict(self) -> dict[str, Any]:
        """``norms`` as one float64 tensor of ``(step, norm)`` rows, plus the two counters.

        One tensor, not a list of tuples: a checkpoint's pickle (and its save-time
        scan) then stays the same size however many steps the run has logged.
        float64 holds every step number below 2**53 exactly.

        >>> logger = GradNormLogger()
        >>> logger.load_state_dict({"norms": [(1, 0.5), (2, 0.25)], "steps_seen": 2, "steps_clipped": 0})
        >>> logger.state_dict()["norms"]
        tensor([[1.0000, 0.5000],
                [2.0000, 0.2500]], dtype=torch.float64)
        """
        self.flush()
        tabled = len(self._norm_table)
        if tabled < len(self._norms):
            added = torch.tensor(self._norms[tabled:], dtype=torch.float64)
            self._norm_table = torch.cat([self._norm_table, added])
        return {"norms": self._norm_table.clone(), "steps_seen": self._steps_seen, "steps_clipped": self._steps_clipped}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        check_state_keys("GradNormLogger", self.state_keys, state_dict)
        self._pending.clear()  # values buffered before the load belong to the abandoned timeline
        norms = state_dict["norms"]
        rows = norms.tolist() if isinstance(norms, torch.Tensor) else norms  # a tensor, or the older list of pairs
        self._norms = [(int(step), float(value)) for step, value in rows]
        self._norm_table = torch.tensor(self._norms, dtype=torch.float64).reshape(-1, 2)
        self._steps_seen = int(state_dict["steps_seen"])
        self._steps_clipped = int(state_dict["steps_clipped"])
