"""What one optimizer step's window measured: its loss, samples and learning rates, read in batches.

Shared by the handlers that log per step (StepLog, TensorBoardLogger): one
``StepWindow`` per trainer records each window once, as references to the
step's own tensors (no device op per iteration), and ``fetch`` later reads
many steps' values with one transfer.
"""

from __future__ import annotations

import weakref
from typing import Any, Sequence

import torch
from ignite.engine import Engine, Events

from engine_kit.events import StepEvents


def fetch(values: list[Any]) -> list[Any]:
    """``values`` with every tensor (a scalar) replaced by a float: one host transfer per device.

    >>> fetch([torch.tensor(0.5), 3, None, torch.tensor(2)])
    [0.5, 3, None, 2.0]
    """
    tensors = [value for value in values if isinstance(value, torch.Tensor)]
    if not tensors:
        return list(values)
    try:
        # One op for the whole batch; stack promotes mixed dtypes (bf16, fp32, int64) to a common one.
        stacked = torch.stack(tensors)
        host = stacked.tolist()
        if not stacked.is_floating_point():
            host = [float(value) for value in host]
    except RuntimeError:  # tensors on several devices, or of a shape of their own such as (1,)
        by_device: dict[torch.device, list[int]] = {}
        for i, tensor in enumerate(tensors):
            by_device.setdefault(tensor.device, []).append(i)
        host = [0.0] * len(tensors)
        for indices in by_device.values():
            floats = torch.stack([tensors[i].detach().reshape(()).float() for i in indices]).tolist()
            for i, value in zip(indices, floats):
                host[i] = value
    read = iter(host)
    return [next(read) if isinstance(value, torch.Tensor) else value for value in values]


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


class Window:
    """One closed window: its micro-batches' ``(loss, num_samples)``, the step's learning rates and norm.

    ``parts`` holds the step's own (detached) loss tensors, not copies: the
    trainer hands out fresh tensors every step, so a reference is as good as a
    copy and costs no device op; ``norm`` is the step's pre-clip gradient norm
    (a tensor, or None when the step computed none). ``read_windows`` turns
    them into ``values`` and ``norm_value`` once, for every handler that logs
    the window.
    """

    __slots__ = ("parts", "lrs", "norm", "values", "norm_value")

    def __init__(self, parts: tuple[tuple[Any, Any], ...], lrs: list[Any], norm: Any = None) -> None:
        self.parts = parts
        self.lrs = lrs
        self.norm = norm
        # (sample-weighted mean loss or None, samples, learning rates as floats) once read
        self.values: tuple[float | None, float, list[float]] | None = None
        self.norm_value: float | None = None  # the norm as a float once read (None: no norm)


def read_windows(windows: Sequence[Window], extra: Sequence[Any] = ()) -> list[Any]:
    """Read the ``values`` of ``windows`` not read yet and the tensors in ``extra``, with one transfer.

    Returns ``extra`` as host values. The mean over a window's micro-batches is
    computed here, on the host, in double precision.

    >>> window = Window(((torch.tensor(1.0), 4), (torch.tensor(4.0), 2)), [0.1], torch.tensor(0.5))
    >>> read_windows([window], [torch.tensor(3.0)]), window.values, window.norm_value
    ([3.0], (2.0, 6.0, [0.1]), 0.5)
    """
    unread = [window for window in windows if window.values is None]
    host = _read_scalar_losses(unread, extra)
    if host is not None:
        return host
    flat: list[Any] = []
    for window in unread:
        for part in window.parts:
            flat += part
        flat += window.lrs
        flat.append(window.norm)
    flat += extra
    host = fetch(flat)
    position = 0
    for window in unread:
        count = len(window.parts)
        values = host[position:position + 2 * count]
        loss, samples = _window_mean(values[0::2], values[1::2])
        position += 2 * count
        window.values = (loss, samples, host[position:position + len(window.lrs)])
        position += len(window.lrs)
        window.norm_value = host[position]
        position += 1
    return host[position:]


def _window_mean(losses: list[float], counts: list[Any]) -> tuple[float | None, Any]:
    """A window's sample-weighted mean loss (None: no micro-batch) and its samples, on the host in double precision.

    >>> _window_mean([1.0, 4.0], [4, 2]), _window_mean([3.0], [5])
    ((2.0, 6.0), (3.0, 5))
    """
    if len(losses) == 1:  # the common case: one micro-batch, whose loss is the window's
        return losses[0], counts[0]
    samples = sum(counts, 0.0)
    return (sum(value * n for value, n in zip(losses, counts)) / samples if losses else None), samples


def _read_scalar_losses(unread: list[Window], extra: Sequence[Any]) -> list[Any] | None:
    """``read_windows`` for the common case, with one stack of tensors and no per-value type tests.

    The common case: every loss and extra value is a 0-dim floating tensor
    (or None, in ``extra``), on one device, every sample count an int and
    every learning rate a float. Anything else returns None (the general path).
    The arithmetic is the general path's, so the values are the same.
    """
    tensors = []
    norms = []
    for window in unread:
        for loss, samples in window.parts:
            if type(samples) is not int:
                return None
            tensors.append(loss)
        if any(type(lr) is not float for lr in window.lrs):
            return None
        if window.norm is not None:
            norms.append(window.norm)
    losses = len(tensors)
    tensors += norms
    tensors += [value for value in extra if value is not None]
    if not tensors:
        return list(extra)
    try:
        stacked = torch.stack(tensors)
    except (RuntimeError, TypeError):
        return None
    if stacked.dim() != 1 or not stacked.is_floating_point():
        return None
    host = stacked.tolist()
    position = 0
    for window in unread:
        parts = window.parts
        count = len(parts)
        loss, samples = _window_mean(host[position:position + count], [n for _, n in parts])
        position += count
        window.values = (loss, samples, list(window.lrs))
    read = iter(host[losses:])
    for window in unread:
        if window.norm is not None:
            window.norm_value = next(read)
    return [None if value is None else next(read) for value in extra]


class StepWindow:
    """The loss, samples and learning rates of each accumulation window, kept on the device.

    The window's loss is the sample-weighted mean of its micro-batch losses:
    the loss whose gradient the optimizer step applied (the plain mean with
    equal batches). ``StepWindow.of(trainer)`` returns the trainer's one
    window, shared by every handler that logs per step, so each iteration is
    recorded once. On an ``engine_kit`` trainer the step itself keeps the
    open window's micro-batch losses (``TrainStep.keep_window_losses``); on
    any other engine the window adds every micro-batch on
    ``ITERATION_COMPLETED`` (not needed, and not attached, when each window
    is one micro-batch).
    ``close(engine)`` runs on the step event, where the closing micro-batch is
    already ``engine.state.output``; every handler closing the same iteration
    gets the same ``Window``. The mean over its micro-batches is computed on
    the host, at the first flush that reads it (``read_windows``).

    The learning rates are the ones the step used, never shifted by a
    scheduler stepping on the step event: the first handler to close a window
    is the first handler of the step event (the window is made as it
    attaches), so it reads them before any other handler of that event runs.
    Where handlers were already attached to the step event, the window reads
    the rates on ``GRADIENTS_READY`` instead, before the step.

    >>> window = StepWindow()
    >>> window.add(1, torch.tensor(1.0), 4); window.add(1, torch.tensor(1.0), 4)
    >>> window.add(2, torch.tensor(4.0), 2)
    >>> closed = window.close()
    >>> read_windows([closed]); closed.values
    []
    (2.0, 6.0, [])
    """

    def __init__(self) -> None:
        self._step: Any = None  # the engine_kit step that records the window's losses, once attached
        self.reset()

    @classmethod
    def of(cls, engine: Engine) -> StepWindow:
        """The window shared by every handler of ``engine`` (created and attached on first use)."""
        window = _WINDOWS.get(engine)
        if window is None:
            window = _WINDOWS[engine] = cls()
            window.attach(engine)
        return window

    def attach(self, engine: Engine) -> None:
        """Follow ``engine``'s micro-batches and windows."""
        step = getattr(engine, "step", None)
        if hasattr(step, "keep_window_losses"):
            step.keep_window_losses = True  # a list append in the step, no handler per micro-batch
            self._step = step
        elif getattr(step, "accumulation_steps", None) != 1:
            # With one micro-batch per window the closing output is the whole window.
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.add_output)
        handlers = getattr(engine, "_event_handlers", None)
        events = (StepEvents.OPTIMIZER_STEP_COMPLETED, StepEvents.OPTIMIZER_STEP_SKIPPED)
        if handlers is None or any(handlers.get(event) for event in events):
            # One of them may be a scheduler: read the rates before it can step.
            engine.add_event_handler(StepEvents.GRADIENTS_READY, self.capture_lrs)

    def add(self, iteration: int, loss: torch.Tensor, num_samples: int | torch.Tensor) -> None:
        """Add the loss of micro-batch ``iteration`` weighted by its ``num_samples`` (once)."""
        if iteration != self._iteration:
            self._iteration = iteration
            self._parts.append((loss, num_samples))

    def add_output(self, engine: Engine) -> None:
        """Add the micro-batch in ``engine.state.output``."""
        output = engine.state.output
        if output is not None:
            self.add(engine.state.iteration, output.loss, output.num_samples)

    def capture_lrs(self, engine: Engine) -> None:
        """Keep the learning rates the coming optimizer step uses."""
        self._lrs = learning_rates(engine)

    def close(self, engine: Engine | None = None) -> Window:
        """The window that ``engine``'s current iteration closed; the next window starts empty."""
        if engine is None:
            iteration = None
        else:
            state = engine.state
            iteration = state.iteration
            if iteration == self._closed_at:
                return self._closed  # type: ignore[return-value]  # another handler closed it already
            if self._step is not None:
                self._parts = self._step.window_losses  # the step's own record of this window
            else:
                output = state.output
                if iteration != self._iteration and output is not None:  # the closing micro-batch
                    self._parts.append((output.loss, output.num_samples))
        lrs = self._lrs
        if lrs is None:
            lrs = learning_rates(engine) if engine is not None else []
        # The step's pre-clip norm, as the step handed it out (an engine_kit step's StepOutput; else None).
        norm = None if engine is None else getattr(engine.state.output, "grad_norm", None)
        window = self._closed = Window(tuple(self._parts), lrs, norm if isinstance(norm, torch.Tensor) else None)
        self._parts, self._lrs = [], None
        self._iteration = self._closed_at = iteration
        return window

    def reset(self) -> None:
        """Forget the open window (also after a checkpoint load)."""
        self._iteration: int | None = None
        self._parts: list[tuple[Any, Any]] = []
        self._lrs: list[Any] | None = None
        self._closed: Window | None = None
        self._closed_at: int | None = None


def existing_window(engine: Engine) -> StepWindow | None:
    """The window a logger already made for ``engine`` (``StepWindow.of``), or None: none is made here."""
    return _WINDOWS.get(engine)


# One window per trainer; an engine that is garbage-collected takes its window with it.
_WINDOWS: weakref.WeakKeyDictionary[Engine, StepWindow] = weakref.WeakKeyDictionary()
