"""StepRows: the step log's rows as the loop doctor reads them, with no device read of its own."""

from __future__ import annotations

import json
import os
from typing import Any

from ignite.engine import Engine

from handlers.grad_norm import GradNormLogger
from handlers.step_log import StepLog
from handlers.step_window import fetch


class StepRows:
    """The step log's rows for the loop doctor, built from values already on the host.

    With a ``GradNormLogger`` on the trainer, the gradient norms come from its
    host-side history (read by its own flushes) and only the first
    ``loss_steps`` rows of the ``StepLog`` file are parsed, for the early loss
    trend; ``complete=True`` parses the whole file (the doctor asks for it
    when a value turned non-finite, to name the step). Without a
    ``GradNormLogger`` the whole file is parsed, new lines only at each call.
    Without a ``StepLog``, ``record`` keeps each step's loss and gradient norm
    as the step's own tensors and ``rows`` reads them in one transfer.

    >>> rows = StepRows()
    >>> rows.rows(50)
    []
    """

    def __init__(self) -> None:
        self.step_log: StepLog | None = None
        self.grad_norms: GradNormLogger | None = None
        self.max_grad_norm: float | None = None
        self._rows: list[dict[str, Any]] = []
        self._offset = 0
        self._complete = False
        self._pending: list[tuple[int, Any, Any]] = []

    def record(self, engine: Engine) -> None:
        """Keep this optimizer step's loss and norm tensors (no device op)."""
        output = engine.state.output
        self._pending.append((engine.state.optimizer_steps, output.loss, output.grad_norm))

    def rows(self, loss_steps: int, *, complete: bool = False) -> list[dict[str, Any]]:
        """The rows so far: every step's norm and at least the first ``loss_steps`` steps' loss."""
        if self.step_log is None:
            self._read_recorded()
            return self._rows
        self._complete = self._complete or complete or self.grad_norms is None
        self._read_file(self.step_log, None if self._complete else loss_steps)
        if self._complete:
            return self._rows
        parsed = {row["step"]: row for row in self._rows}
        limit = self.max_grad_norm
        return [parsed.get(step) or {"step": step, "grad_norm": norm, "clipped": limit is not None and norm > limit}
                for step, norm in self.grad_norms.norms]

    def _read_recorded(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            values = fetch([value for _, loss, norm in pending for value in (loss, norm)])
            self._rows += [{"step": step, "loss": values[2 * i], "grad_norm": values[2 * i + 1]}
                           for i, (step, _, _) in enumerate(pending)]

    def _read_file(self, step_log: StepLog, wanted: int | None) -> None:
        if wanted is not None and len(self._rows) >= wanted:
            return
        step_log.flush()  # a no-op unless steps are pending: the log's own read, not one more per step
        if not os.path.exists(step_log.path):
            return
        if os.path.getsize(step_log.path) < self._offset:  # truncated by a resume: read it again
            self._rows, self._offset = [], 0
        with open(step_log.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        lines = data.splitlines(keepends=True)
        if lines and not lines[-1].endswith(b"\n"):
            lines.pop()  # whole lines only
        if wanted is not None:
            lines = lines[: wanted - len(self._rows)]
        self._offset += sum(len(line) for line in lines)
        lines = [line for line in lines if line.strip()]
        try:
            rows = json.loads(b"[" + b",".join(lines) + b"]")  # one parse for the whole batch of lines
        except ValueError:  # a line torn by a crash: parse line by line, skipping it
            rows = []
            for line in lines:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
        self._rows += [row for row in rows if isinstance(row, dict) and "step" in row]
