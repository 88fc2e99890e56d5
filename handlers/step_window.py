"""What one optimizer step's window measured: its loss, samples and learning rates, read in batches.

Shared by the handlers that log per step (StepLog, TensorBoardLogger, ProgressBar):
values stay on the device until ``fetch`` reads many of them with one transfer.
"""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine, Events

from engine_kit.events import StepEvents


def fetch(values: list[Any]) -> list[Any]:
    """``values`` with every scalar tensor replaced by a float: one host transfer per device.

    >>> fetch([torch.tensor(0.5), 3, None, torch.tensor(2)])
    [0.5, 3, None, 2.0]
    """
    by_device: dict[torch.device, list[int]] = {}
    for i, value in enumerate(values):
        if isinstance(value, torch.Tensor):
            by_device.setdefault(value.device, []).append(i)
    result = list(values)
    for indices in by_device.values():
        host = torch.stack([values[i].detach().reshape(()).float() for i in indices]).tolist()
        for i, value in zip(indices, host):
            result[i] = value
    return result


def learning_rates(engine: Engine) -> list[float | torch.Tensor]:
    """The learning rate of each param group of the trainer's optimizer, without a host sync.

    A rate kept in a device tensor (capturable optimizers) is copied, not read.
    """
    optimizer = getattr(getattr(engine, "step", None), "optimizer", None)
    if optimizer is None:
        return []
    rates: list[float | torch.Tensor] = []
    for group in optimizer.param_groups:
        lr = group["lr"]
        rates.append(lr.detach().clone() if isinstance(lr, torch.Tensor) else float(lr))
    return rates


class StepWindow:
    """The loss, samples and learning rates of one accumulation window, kept on the device.

    The window's loss is the sample-weighted mean of its micro-batch losses:
    the loss whose gradient the optimizer step applied (the plain mean with
    equal batches). ``attach`` adds every micro-batch on ``ITERATION_COMPLETED``
    and reads the learning rates on ``GRADIENTS_READY``, before the step, so a
    scheduler advancing on the step event cannot change the rate logged for
    it. ``close(engine)`` runs on the step event, where the closing micro-batch
    is already ``engine.state.output``: ``add`` ignores a second call for the
    same iteration, so that micro-batch counts once.

    >>> window = StepWindow()
    >>> window.add(1, torch.tensor(1.0), 4); window.add(1, torch.tensor(1.0), 4)
    >>> window.add(2, torch.tensor(4.0), 2)
    >>> loss, samples, lrs = window.close()
    >>> float(loss), samples, lrs
    (2.0, 6, [])
    """

    def __init__(self) -> None:
        self.reset()

    def attach(self, engine: Engine) -> None:
        """Follow ``engine``'s micro-batches and windows."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.add_output)
        engine.add_event_handler(StepEvents.GRADIENTS_READY, self.capture_lrs)

    def add(self, iteration: int, loss: torch.Tensor, num_samples: int | torch.Tensor) -> None:
        """Add the loss of micro-batch ``iteration`` weighted by its ``num_samples`` (once)."""
        if iteration == self._iteration:
            return
        self._iteration = iteration
        weighted = loss.detach().float() * num_samples
        self._weighted = weighted if self._weighted is None else self._weighted + weighted
        self._samples = self._samples + num_samples

    def add_output(self, engine: Engine) -> None:
        """Add the micro-batch in ``engine.state.output``."""
        output = engine.state.output
        if output is not None:
            self.add(engine.state.iteration, output.loss, output.num_samples)

    def capture_lrs(self, engine: Engine) -> None:
        """Keep the learning rates the coming optimizer step uses."""
        self._lrs = learning_rates(engine)

    def close(self, engine: Engine | None = None) -> tuple[torch.Tensor | None, Any, list[Any]]:
        """``(mean loss as a device tensor, samples, learning rates)``; the next window starts empty."""
        if engine is not None:
            self.add_output(engine)
        weighted, samples, lrs = self._weighted, self._samples, self._lrs
        iteration = self._iteration
        self.reset()
        self._iteration = iteration
        if lrs is None:
            lrs = learning_rates(engine) if engine is not None else []
        return (None if weighted is None else weighted / samples), samples, lrs

    def reset(self) -> None:
        """Forget the open window (also after a checkpoint load)."""
        self._iteration: int | None = None
        self._weighted: torch.Tensor | None = None
        self._samples: int | torch.Tensor = 0
        self._lrs: list[Any] | None = None
