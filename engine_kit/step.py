"""The training step: AMP, exact sample-weighted accumulation, clip after unscale."""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any, Callable, ContextManager

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from torch.nn.parallel import DistributedDataParallel

from engine_kit.batch import BatchSizeFn, PrepareBatch, default_batch_size, default_prepare_batch, split_and_count
from engine_kit.engine import fire_if_handled
from engine_kit.errors import fix_message
from engine_kit.events import StepEvents
from engine_kit.precision import Precision
from engine_kit.state import StepOutput


def _loss_problem(loss: Any) -> Exception | None:
    """What is wrong with ``loss`` as a training loss (not a tensor, not a scalar, no autograd), or None."""
    if not isinstance(loss, torch.Tensor):
        return TypeError(
            fix_message(
                f"loss_fn returned a {type(loss).__name__}, not a tensor.",
                "return a scalar tensor from loss_fn, e.g. torch.nn.functional.cross_entropy(y_pred, y).",
            )
        )
    if loss.dim() != 0:
        return ValueError(
            fix_message(
                f"loss_fn returned a tensor of shape {tuple(loss.shape)}, not a scalar.",
                "reduce it to the mean over the batch (reduction='mean' or .mean()).",
            )
        )
    if not loss.requires_grad:
        return ValueError(
            fix_message(
                "the loss does not require grad: it was computed without autograd "
                "(under torch.no_grad(), or from detached tensors or frozen parameters).",
                "compute the loss from the model's output inside loss_fn, with gradients enabled.",
            )
        )
    return None


def _check_loss(loss: Any) -> None:
    problem = _loss_problem(loss)
    if problem is not None:
        raise problem


def _check_prepared(prepared: Any) -> None:
    if isinstance(prepared, (tuple, list)) and len(prepared) == 2:
        return
    shown = type(prepared).__name__ + (f" of length {len(prepared)}" if isinstance(prepared, (tuple, list)) else "")
    raise TypeError(
        fix_message(
            f"prepare_batch returned a {shown}, not an (x, y) pair.",
            "return (inputs, targets) from prepare_batch(batch, device, non_blocking).",
        )
    )


def _check_samples(num_samples: Any) -> None:
    """Refuse a sample count that is not a positive finite number (tensors are checked once, in the reference)."""
    if isinstance(num_samples, torch.Tensor):
        return
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Real):
        raise TypeError(
            fix_message(
                f"batch_size_fn returned {num_samples!r} (a {type(num_samples).__name__}), not a number.",
                "return the number of samples (or tokens) of the batch as an int or a tensor.",
            )
        )
    if not 0 < num_samples < math.inf:
        what = "an empty batch (0 samples)" if num_samples == 0 else f"{num_samples} samples"
        raise ValueError(
            fix_message(
                f"the batch counts {what}: its loss cannot be weighted into the window's mean.",
                "drop empty batches from the loader, and make batch_size_fn return a positive finite count.",
            )
        )


def _gradient_sync_control(model: torch.nn.Module) -> Callable[[bool], ContextManager] | None:
    """``control(sync)``: a context in which backward reduces gradients across ranks only if ``sync``.

    DDP has ``no_sync()``; FSDP2 (``fully_shard``) modules have
    ``set_requires_gradient_sync``; anything else has nothing to control: ``None``.
    """
    if isinstance(model, DistributedDataParallel):
        return lambda sync: contextlib.nullcontext() if sync else model.no_sync()
    if callable(getattr(model, "set_requires_gradient_sync", None)):

        @contextlib.contextmanager
        def fsdp_sync(sync: bool) -> Any:
            model.set_requires_gradient_sync(sync)
            yield

        return fsdp_sync
    return None


class TrainStep:
    """The trainer's process function; one call handles one micro-batch.

    Exact weighting: the gradient applied when a window closes is the gradient
    of the mean loss over all samples of the window, whatever its size. Each
    micro-batch's loss is scaled by ``n / planned_total`` where ``planned_total``
    is ``window_length * sample_reference``; when the window turns out to hold
    another number of samples (ragged tail, uneven last batch, token counts) the
    gradients are multiplied by ``planned_total / actual_total`` once, after
    unscaling. With equal batches this is the textbook ``loss / accumulation_steps``
    and no correction runs.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        *,
        device: torch.device,
        precision: Precision,
        accumulation_steps: int,
        max_grad_norm: float | None,
        prepare_batch: PrepareBatch,
        non_blocking: bool,
        batch_size_fn: BatchSizeFn,
        track_grad_norm: bool = False,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.device = device
        self.precision = precision
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.prepare_batch = prepare_batch
        self.non_blocking = non_blocking
        self.batch_size_fn = batch_size_fn
        # The norm costs a pass over every gradient: computed when clipping (it is the
        # clip's by-product), in fp16 (it reveals a skipped step), or when a handler asks.
        self.track_grad_norm = track_grad_norm
        # Handlers that log per step (through a shared StepWindow) set this: the step then keeps
        # each micro-batch's detached loss and sample count for the window it is in
        # (``window_losses``), a list append instead of a handler call per micro-batch.
        self.keep_window_losses = False
        self.window_losses: list[tuple[torch.Tensor, int | torch.Tensor]] = []
        self.scaler = precision.make_scaler()
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        # Every data-parallel wrapper (DDP, FSDP2, ...) averages gradients over ranks,
        # so every rank must weight in the same unit: sample counts are all-reduced.
        self._sync_counts = idist.get_world_size() > 1
        self._gradient_sync = _gradient_sync_control(model)
        # The step runs once per micro-batch: contexts that do nothing (fp32's autocast, a
        # module without gradient reduction) are not entered at all.
        self._autocast = precision.autocast if precision.dtype is not None else None
        # The loss is checked on the first micro-batch of each run (and after a state load);
        # later micro-batches are checked only when backward fails, to explain the failure.
        self._loss_checked = False
        # The window weight of a float32 loss, as a tensor (see _weight_tensor); other devices
        # (whose kernels may not take a CPU scalar) and other loss dtypes multiply by the float.
        self._weight_as_tensor = device.type in ("cpu", "cuda")
        self._cached_weight: float | None = None
        self._cached_weight_tensor: torch.Tensor | None = None
        self._window_length = 0
        self._window_total = 0.0
        self._window_samples: int | torch.Tensor = 0

    def __call__(self, engine: Engine, batch: Any) -> StepOutput:
        state = engine.state
        # Compared on every call, not once: handlers may swap these functions on the step.
        if self.prepare_batch is default_prepare_batch and self.batch_size_fn is default_batch_size:
            x, y, num_samples = split_and_count(batch, self.device, self.non_blocking)
        else:
            prepared = self.prepare_batch(batch, self.device, self.non_blocking)
            if type(prepared) is not tuple or len(prepared) != 2:
                _check_prepared(prepared)
            x, y = prepared
            num_samples = self.batch_size_fn(x, y)
        if type(num_samples) is not int or num_samples <= 0:  # the common case costs one comparison
            _check_samples(num_samples)
        if state.window_position == 0:
            self._open_window(engine, num_samples)
        closes_window = state.window_position + 1 >= self._window_length
        if self._gradient_sync is None:
            loss = self._forward_backward(x, y, num_samples)
        else:
            # Data-parallel wrappers reduce gradients on every backward unless told not
            # to: only the last micro-batch of a window needs synchronized gradients.
            with self._gradient_sync(closes_window):
                loss = self._forward_backward(x, y, num_samples)
        state.window_position += 1
        self._window_samples = self._window_samples + num_samples
        loss = loss.detach()
        if self.keep_window_losses:
            self.window_losses.append((loss, num_samples))
        fire_if_handled(engine, StepEvents.BACKWARD_COMPLETED)
        if closes_window:
            return self._close_window(engine, loss, num_samples)
        return StepOutput(loss, None, False, num_samples)

    def _forward_backward(self, x: Any, y: Any, num_samples: int | torch.Tensor) -> torch.Tensor:
        """Forward, loss and the weighted backward of one micro-batch; returns the (unweighted) loss."""
        if self._autocast is None:
            loss = self.loss_fn(self.model(x), y)
        else:
            with self._autocast():
                loss = self.loss_fn(self.model(x), y)
        if not self._loss_checked:
            _check_loss(loss)
            self._loss_checked = True
        weight = num_samples / self._window_total
        try:
            if type(weight) is not float:
                # A tensor weight (token counts: never compared, that would sync) or another number type.
                weighted = loss * weight
            elif weight == 1.0:
                # Equal batches without accumulation: skip the extra graph node.
                weighted = loss
            elif loss.dtype is torch.float32 and self._weight_as_tensor:
                weighted = loss * self._weight_tensor(weight)
            else:
                weighted = loss * weight
            self.scaler.scale(weighted).backward()
        except Exception:
            problem = _loss_problem(loss)
            if problem is None:
                raise
            raise problem from None  # a loss that changed kind mid-run: say so, as on the first micro-batch
        return loss

    def _weight_tensor(self, weight: float) -> torch.Tensor:
        """``weight`` as a 0-dim float32 CPU tensor, kept while the weight stays the same.

        Multiplying by a Python float makes torch wrap it in a new tensor on
        every call, a noticeable share of a host-bound micro-batch. A float32
        loss times a float32 scalar tensor gives the same bits as times the
        float (both round the weight to float32 once), in the forward and in
        backward. A CPU scalar tensor is an operand every CPU and CUDA kernel
        takes as a plain argument: nothing is copied to the device.
        """
        if weight != self._cached_weight:
            self._cached_weight = weight
            self._cached_weight_tensor = torch.tensor(weight, dtype=torch.float32)
        return self._cached_weight_tensor

    def recheck_loss(self) -> None:
        """Check the next micro-batch's loss in full again (a new run, or a state load, may change it)."""
        self._loss_checked = False

    def _open_window(self, engine: Engine, num_samples: int | torch.Tensor) -> None:
        state = engine.state
        if state.sample_reference is None:
            state.sample_reference = self._reference_count(num_samples)
        self._window_length = self._planned_length(engine)
        self._window_total = self._window_length * state.sample_reference
        self._window_samples = 0
        if self.keep_window_losses:
            self.window_losses = []  # a new list: the closed window's may still be referenced
        # A window retrying a step that GradScaler skipped starts no new step:
        # schedulers on STEP_STARTED hold their value for it.
        if state.steps_started == state.optimizer_steps:
            state.steps_started += 1
            fire_if_handled(engine, StepEvents.STEP_STARTED)

    def _reference_count(self, num_samples: int | torch.Tensor) -> float:
        # Read once per run (a single host sync if batch_size_fn returns a tensor).
        reference = float(num_samples)
        if self._sync_counts:
            # Every rank must weight in the same unit for the DDP average to be a mean.
            reference = float(idist.all_reduce(reference)) / idist.get_world_size()
        if not 0 < reference < math.inf:
            raise ValueError(
                fix_message(
                    f"batch_size_fn counted {reference} samples in the first batch.",
                    "make batch_size_fn return the positive number of samples (or tokens) of a batch.",
                )
            )
        return reference

    def _planned_length(self, engine: Engine) -> int:
        epoch_length = engine.state.epoch_length
        if epoch_length is None:
            # A loader without a length: the epoch end flushes a short window.
            return self.accumulation_steps
        position = (engine.state.iteration - 1) % epoch_length
        return min(self.accumulation_steps, epoch_length - position)

    def _correction(self) -> float | torch.Tensor | None:
        total = self._window_samples
        if self._sync_counts:
            total = torch.as_tensor(total, dtype=torch.float32, device=self.device)
            total = idist.all_reduce(total.clone()) / idist.get_world_size()
        if isinstance(total, torch.Tensor):
            return self._window_total / total.to(torch.float32)
        if total == self._window_total:
            return None
        return self._window_total / total

    def has_gradients(self) -> bool:
        """Whether any optimized parameter holds a gradient (none does between windows)."""
        return any(p.grad is not None for p in self._params)

    def discard_window(self, engine: Engine) -> None:
        """Drop the open window's gradients without stepping (after an error, or stale ones before a run).

        As after a step GradScaler skipped, the step the window had started is
        retried by the next window, which fires no new ``STEP_STARTED``.
        """
        self.optimizer.zero_grad(set_to_none=True)
        engine.state.window_position = 0
        self._window_samples = 0

    def close_window(self, engine: Engine, output: StepOutput) -> StepOutput:
        """Unscale, reweight, clip, step and reset the gradients of the open window.

        ``output`` is the last micro-batch's; the returned one adds the window's
        norm and whether the optimizer stepped.
        """
        return self._close_window(engine, output.loss, output.num_samples)

    def _close_window(self, engine: Engine, loss: torch.Tensor, num_samples: int | torch.Tensor) -> StepOutput:
        state = engine.state
        state.windows += 1
        self.scaler.unscale_(self.optimizer)
        scaling = self.scaler.is_enabled()
        factor = self._correction()
        if factor is not None:
            grads = [p.grad for p in self._params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, factor)
        fire_if_handled(engine, StepEvents.GRADIENTS_READY)
        grad_norm = None
        if self.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self._params, self.max_grad_norm)
        elif self.track_grad_norm or scaling:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self._params if p.grad is not None])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        stepped = True
        if scaling:
            # GradScaler.step already synchronized to read its inf check, so this
            # read is free; non-finite gradients are exactly what made it skip.
            stepped = bool(torch.isfinite(grad_norm))
        self.optimizer.zero_grad(set_to_none=True)
        state.window_position = 0
        self._window_samples = 0
        norm = None if grad_norm is None else grad_norm.detach()
        output = StepOutput(loss, norm, stepped, num_samples)
        state.output = output  # step-event handlers read the output of this very iteration
        if stepped:
            state.optimizer_steps += 1
            fire_if_handled(engine, StepEvents.OPTIMIZER_STEP_COMPLETED)
        else:
            state.skipped_steps += 1
            fire_if_handled(engine, StepEvents.OPTIMIZER_STEP_SKIPPED)
        return output
