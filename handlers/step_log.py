"""StepLog: one JSON line per optimizer step, written in batches; CSV export."""

from __future__ import annotations

import csv
import json
import math
import os
import time
import warnings
from typing import Any, Mapping

import ignite.distributed as idist
from ignite.engine import Engine, Events

from engine_kit.checks import check_log_file
from engine_kit.engine import cleanup_handler
from engine_kit.errors import fix_message
from engine_kit.events import StepEvents
from engine_kit.stateful import register_stateful
from handlers.base import Handler, check_positive_int, require_step_events
from handlers.step_window import StepWindow, Window, read_windows

FIELDS = ("step", "epoch", "iteration", "loss", "lr", "grad_norm", "clipped", "skipped", "samples_per_s", "time")
# A row as json.dumps writes it, formatted directly (in half the time of building a dict and encoding it).
# FIELDS in order; the closing brace comes after the optional "lrs".
_ROW = ('{"step": %d, "epoch": %d, "iteration": %d, "loss": %s, "lr": %s, "grad_norm": %s, '
        '"clipped": %s, "skipped": %s, "samples_per_s": %s, "time": %s')


def _json_number(value: float | int | None) -> str:
    """``value`` as ``json.dumps`` writes it: ``null``, ``NaN``, ``Infinity``, ``-Infinity`` or its repr.

    >>> [_json_number(v) for v in (None, float("nan"), float("-inf"), 0.1, 3)]
    ['null', 'NaN', '-Infinity', '0.1', '3']
    """
    if value is None:
        return "null"
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "Infinity" if value > 0 else "-Infinity"
    if type(value) is float or type(value) is int:
        return repr(value)
    return json.dumps(value)  # any other number type, as json writes it


class StepLog(Handler):
    """Writes one JSON line per optimizer step (and per fp16-skipped step) to ``path``.

    Each line holds ``step`` (optimizer steps so far), ``epoch``,
    ``iteration``, ``loss`` (the window's loss: the sample-weighted mean of
    its micro-batch losses), ``lr`` (the rate the step used, of param group 0;
    plus ``lrs`` with every group when there are several), ``grad_norm``
    (pre-clip, unscaled; attaching the log sets the step's ``track_grad_norm``,
    and a step that still hands out no norm logs ``null``),
    ``clipped`` (``grad_norm > max_grad_norm``), ``skipped`` (GradScaler
    skipped the step; ``step`` then repeats the last real step's number),
    ``samples_per_s`` and ``time`` (Unix time of the step). Non-finite values
    are written as ``NaN``/``Infinity``, which Python's ``json`` and pandas read.

    ``samples_per_s`` divides the window's samples by the wall time from the
    previous window's step to its own (an epoch's first window: from the
    epoch's start), so data waits and every handler that ran in between
    count, as in any throughput measured step to step: a step-triggered
    validation or a checkpoint's snapshot slows the window after it. It is
    ``null`` for the first window after ``interrupt()``. On a GPU the step
    is asynchronous, so single values are launch rates; averages over many
    steps are true rates.

    Rows keep their values as device tensors until a flush reads them all
    with one transfer: every ``flush_every`` steps, at each epoch end and
    when the run completes, terminates or fails. The file is opened for
    appending; each flush writes whole lines and flushes the file. Per step
    the log only appends a tuple: lines are built at the flush.

    Resume: the state (registered as "step_log") is the last written step and
    the file length at that moment. Loading it truncates the lines a killed
    run wrote after that checkpoint, so the resumed log continues with no
    duplicate and no gap. Only rank 0 writes.

    Args:
        path: the ``.jsonl`` file (its directory must exist).
        flush_every: optimizer steps buffered between two writes.

    >>> import tempfile, torch
    >>> from engine_kit import create_trainer
    >>> model = torch.nn.Linear(2, 1)
    >>> trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                          torch.nn.functional.mse_loss, accumulation_steps=2)
    >>> path = os.path.join(tempfile.mkdtemp(), "steps.jsonl")
    >>> StepLog(path, flush_every=2).attach(trainer)
    >>> _ = trainer.run([(torch.randn(4, 2), torch.randn(4, 1)) for _ in range(5)], max_epochs=1)
    >>> [(row["step"], row["iteration"], row["lr"]) for row in read_step_log(path)]
    [(1, 2, 0.1), (2, 4, 0.1), (3, 5, 0.1)]
    """

    state_keys = ("step", "offset")

    def __init__(self, path: str | os.PathLike[str], *, flush_every: int = 50) -> None:
        super().__init__()
        self.path = check_log_file("path", path)
        self.flush_every = check_positive_int("flush_every", flush_every, 50)
        self.step = 0  # the last step written to the file
        self.offset: int | None = None  # the file length after the last write (None: not opened yet)
        # (step, epoch, iteration, window (with the step's norm), max_grad_norm, skipped, seconds, wall time)
        self._pending: list[tuple[int, int, int, Window, float | None, bool, float | None, float]] = []
        self._window: StepWindow | None = None
        self._window_start: float | None = None
        self._file: Any = None
        self._writes = 0
        self._enabled = True

    def attach(self, trainer: Engine) -> None:
        """Log ``trainer``'s optimizer steps and register the log position for checkpoints."""
        require_step_events(trainer, type(self).__name__)
        self._claim(trainer)
        self._enabled = idist.get_rank() == 0
        step = getattr(trainer, "step", None)
        if step is not None:
            step.track_grad_norm = True  # the step computes the norm only when a handler reads it
        # The clock runs from step to step: no handler on every micro-batch's fetch.
        trainer.add_event_handler(Events.EPOCH_STARTED, self._start_clock)
        trainer.add_event_handler(Events.INTERRUPT, self._stop_clock)
        if self._enabled:
            self._window = StepWindow.of(trainer)
        trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, self, False)
        trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_SKIPPED, self, True)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.flush)
        for event in (Events.COMPLETED, Events.TERMINATE):
            trainer.add_event_handler(event, self.close)
        trainer.add_event_handler(Events.EXCEPTION_RAISED, self._on_exception)
        register_stateful(trainer, "step_log", self)

    def _start_clock(self) -> None:
        self._window_start = time.perf_counter()

    def _stop_clock(self) -> None:
        self._window_start = None  # the time until the next run() is nobody's window

    def __call__(self, engine: Engine, skipped: bool = False) -> None:
        """Buffer this step's row with its values still on the device; flush when full."""
        if not self._enabled:
            return
        state = engine.state
        now = time.perf_counter()
        start, self._window_start = self._window_start, now  # this step ends one window and starts the next
        # The step's own tensors, not copies: the step hands out fresh ones each time.
        self._pending.append((
            state.optimizer_steps,
            state.epoch,
            state.iteration,
            self._window.close(engine),
            getattr(getattr(engine, "step", None), "max_grad_norm", None),
            skipped,
            None if start is None else now - start,
            time.time(),
        ))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Read the buffered rows with one transfer and append them to the file."""
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        read_windows([row[3] for row in rows])  # losses and norms in one transfer, unless already read
        lines = []
        number = _json_number
        for step, epoch, iteration, window, limit, skipped, elapsed, wall_time in rows:
            loss, samples, lrs = window.values  # type: ignore[misc]
            grad_norm = window.norm_value
            # NaN compares False: a non-finite norm is never counted as clipped.
            clipped = limit is not None and grad_norm is not None and grad_norm > limit
            line = _ROW % (
                step, epoch, iteration, number(loss), number(lrs[0] if lrs else None), number(grad_norm),
                "true" if clipped else "false", "true" if skipped else "false",
                number(samples / elapsed if elapsed else None), number(wall_time),
            )
            if len(lrs) > 1:
                line += ', "lrs": [' + ", ".join(map(number, lrs)) + "]"
            lines.append(line + "}")
        lines.append("")
        self._write("\n".join(lines))
        self.step = rows[-1][0]

    def _write(self, text: str) -> None:
        if self._file is None:
            self._file = open(self.path, "ab")
            if self._file.tell() > 0 and not _ends_with_newline(self.path):
                text = "\n" + text  # never glue a row onto a line torn by a crash
        self._file.write(text.encode("utf-8"))
        self._file.flush()
        self.offset = self._file.tell()
        self._writes += 1

    def close(self) -> None:
        """Write what is pending and close the file (a later row reopens it)."""
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    @cleanup_handler  # flushes and closes: never swallows the run's error
    def _on_exception(self, engine: Engine, error: BaseException) -> None:
        self.close()

    @property
    def writes(self) -> int:
        """Writes (one host transfer each) made so far."""
        return self._writes

    def state_dict(self) -> dict[str, Any]:
        self.flush()  # the checkpoint must cover every step taken so far
        offset = self.offset
        if offset is None:
            offset = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        return {"step": self.step, "offset": offset}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.step, self.offset = int(self.step), int(self.offset)  # type: ignore[arg-type]
        # Rows buffered before the load belong to the abandoned timeline.
        self._pending.clear()
        if self._window is not None:
            self._window.reset()
        self._window_start = None
        if self._enabled:
            self._truncate(self.offset)

    def _truncate(self, offset: int) -> None:
        size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        if size < offset:
            warnings.warn(
                f"{self.path} holds {size} bytes, fewer than the {offset} written up to step {self.step} "
                "when the checkpoint was saved; rows are missing and new ones are appended after it.",
                stacklevel=3,
            )
            return
        if size == offset:
            return
        # Check that the line before the cut is the checkpoint's last row, so that a
        # file the checkpoint was not written with is never cut (step 0: no row of ours yet).
        last = _last_line_before(self.path, offset) if self.step > 0 else None
        if self.step > 0 and (last is None or last.get("step") != self.step):
            warnings.warn(
                f"{self.path} does not end with step {self.step} at byte {offset} as the checkpoint says "
                f"(found {last!r}); it was not truncated. Start a new log file for this run.",
                stacklevel=3,
            )
            return
        # Lines after the checkpoint were written by the run that crashed; the resumed run rewrites them.
        if self._file is not None:
            self._file.close()
            self._file = None
        os.truncate(self.path, offset)


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _last_line_before(path: str, offset: int) -> dict[str, Any] | None:
    with open(path, "rb") as f:
        start = max(0, offset - 65536)
        f.seek(start)
        chunk = f.read(offset - start)
    lines = chunk.rstrip(b"\n").split(b"\n")
    try:
        return json.loads(lines[-1])
    except (ValueError, IndexError):
        return None


def read_step_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a StepLog file, oldest first; a line torn by a crash is skipped with a warning.

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "log.jsonl")
    >>> with open(path, "w") as f:
    ...     _ = f.write('{"step": 1, "loss": 0.5}\\n')
    >>> read_step_log(path)
    [{'step': 1, 'loss': 0.5}]
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                where = f"{os.fspath(path)}:{number}"
                warnings.warn(f"{where} is not a JSON line (torn by a crash?); skipped.", stacklevel=2)
    return rows


def to_csv(jsonl_path: str | os.PathLike[str], csv_path: str | os.PathLike[str]) -> int:
    """Export a StepLog file to CSV; returns the number of rows written.

    Columns are the fields in the order first seen; ``lrs`` (several param
    groups) is written as a JSON list, a missing value as an empty cell.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with open(os.path.join(folder, "log.jsonl"), "w") as f:
    ...     _ = f.write('{"step": 1, "loss": 0.5}\\n{"step": 2, "loss": 0.25}\\n')
    >>> to_csv(os.path.join(folder, "log.jsonl"), os.path.join(folder, "log.csv"))
    2
    >>> print(open(os.path.join(folder, "log.csv")).read().strip())
    step,loss
    1,0.5
    2,0.25
    """
    rows = read_step_log(jsonl_path)
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    return len(rows)
