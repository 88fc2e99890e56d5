"""NanGuard: stop on a non-finite loss or gradient norm, and never save such a model."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from ignite.engine import Engine, Events

from engine_kit.stateful import add_save_veto
from handlers.base import Handler, check_positive_int


class NanGuard(Handler):
    """Stops training once a loss or a gradient norm is NaN or infinite.

    Every iteration it computes, on the device and without a host sync,
    whether the micro-batch's loss (and, when the micro-batch closed a window
    that the optimizer stepped, the pre-clip gradient norm) is non-finite. The
    flags are read in one transfer every ``check_every`` iterations, at the end
    of each epoch, at the end of the run, and whenever a checkpoint handler
    asks the save veto. On the first non-finite value it sets
    ``engine.state.nan_detected``, writes ``engine.state.stopped_by`` (naming
    the iteration where it appeared), warns once and calls ``engine.terminate()``.

    The save veto checks at call time, including the output of the iteration
    in progress, so a model updated from a NaN gradient is never saved as
    "last" or "best" even between two periodic checks. fp16 steps that
    GradScaler skipped (an infinite norm is how it detects overflow) are not
    counted: the scaler already handled them.

    Args:
        check_every: iterations (micro-batches) between two host reads of the flags.

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
        # (iteration, device bool "non-finite"), read together at the next check
        self._pending: list[tuple[int, torch.Tensor]] = []
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
        """Watch every iteration of ``engine`` and veto its checkpoints once a value is non-finite."""
        self._claim(engine)
        engine.state.nan_detected = False
        if not hasattr(engine.state, "stopped_by"):
            engine.state.stopped_by = None
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.check)
        engine.add_event_handler(Events.COMPLETED, self.check)
        add_save_veto(engine, self.veto)

    def __call__(self, engine: Engine) -> None:
        """Flag this iteration on the device; read the flags every ``check_every`` iterations."""
        self._observe(engine)
        if engine.state.iteration % self.check_every == 0 or len(self._pending) >= self.check_every:
            self.check(engine)

    def _observe(self, engine: Engine) -> None:
        output = engine.state.output
        # The veto may look at an iteration before ITERATION_COMPLETED does; the
        # output object itself tells whether it was already flagged.
        if output is self._last_output:
            return
        self._last_output = output
        loss = getattr(output, "loss", output)
        if not isinstance(loss, torch.Tensor):
            return  # an engine whose output carries no loss: nothing to guard
        bad = torch.logical_not(torch.isfinite(loss.detach()).all())
        norm = getattr(output, "grad_norm", None)
        if isinstance(norm, torch.Tensor) and getattr(output, "stepped", True):
            bad = bad | torch.logical_not(torch.isfinite(norm.detach()).all())
        self._pending.append((engine.state.iteration, bad))

    def check(self, engine: Engine) -> bool:
        """Read the pending flags (one host sync); stop ``engine`` on the first non-finite value.

        Returns:
            True once a non-finite value has been seen.
        """
        self._observe(engine)
        if self._pending:
            iterations, flags = zip(*self._pending)
            self._pending.clear()
            if self._nan_iteration is None:
                hits = torch.stack(flags).tolist()  # the one host sync of this check
                first = next((it for it, hit in zip(iterations, hits) if hit), None)
                if first is not None:
                    self._stop(engine, first)
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
