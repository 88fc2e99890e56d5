"""``create_trainer``: the training Engine around ``TrainStep``."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable

import torch
from ignite.engine import Engine, Events

from engine_kit.batch import BatchSizeFn, PrepareBatch, default_batch_size, default_prepare_batch
from engine_kit.checks import check_bool, check_callable, check_int
from engine_kit.errors import fix_message
from engine_kit.events import EVENT_COUNTERS, StepEvents
from engine_kit.precision import resolve_device, resolve_precision
from engine_kit.state import init_trainer_state
from engine_kit.step import TrainStep
from engine_kit.trainer_engine import TrainerEngine


def _check_max_grad_norm(max_grad_norm: Any) -> float | None:
    if max_grad_norm is None:
        return None
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, numbers.Real):
        raise TypeError(
            fix_message(
                f"max_grad_norm={max_grad_norm!r} is not a number.",
                "pass a positive float, or None to disable clipping.",
            )
        )
    if not max_grad_norm > 0 or max_grad_norm != max_grad_norm:
        raise ValueError(
            fix_message(
                f"max_grad_norm={max_grad_norm} is not positive.",
                "pass a positive float such as 1.0, or None to disable clipping.",
            )
        )
    if max_grad_norm == math.inf:
        raise ValueError(
            fix_message(
                "max_grad_norm=inf would clip nothing while looking like clipping.",
                "pass max_grad_norm=None (no clipping) and track_grad_norm=True to still log the norm.",
            )
        )
    return float(max_grad_norm)


def _check_model_and_optimizer(model: Any, optimizer: Any, device: torch.device) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(fix_message(f"model is a {type(model).__name__}.", "pass a torch.nn.Module."))
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            fix_message(f"optimizer is a {type(optimizer).__name__}.", "pass a torch.optim.Optimizer.")
        )
    model_params = {id(p): name for name, p in model.named_parameters()}
    optimized = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = [tuple(p.shape) for p in optimized if id(p) not in model_params]
    if foreign or not optimized:
        raise ValueError(
            fix_message(
                f"the optimizer holds {len(foreign)} of {len(optimized)} tensors that are not "
                f"parameters of the model (shapes {foreign[:5]}).",
                "build the optimizer from this model's parameters: optimizer = "
                "torch.optim.AdamW(model.parameters(), ...), after moving the model to its device.",
            )
        )
    optimized_ids = {id(p) for p in optimized}
    left_out = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in optimized_ids]
    if left_out:
        warnings.warn(
            f"{len(left_out)} trainable parameters are not in the optimizer and will not be updated: "
            f"{left_out[:5]}. Set requires_grad=False on them if that is intended.",
            stacklevel=3,
        )
    off_device = sorted({str(p.device) for p in model.parameters() if p.device != device})
    if off_device:
        raise ValueError(
            fix_message(
                f"model parameters live on {off_device}, but device={str(device)!r}.",
                f"call model.to({str(device)!r}) before building the optimizer and the trainer.",
            )
        )


def _on_epoch_started(engine: Engine, model: torch.nn.Module) -> None:
    model.train()
    state = engine.state
    data = state.dataloader
    epoch_index = state.epoch - 1
    if hasattr(data, "set_position"):
        # Exact resume: tell the loader which epoch this is and how many of its
        # batches a restored run already consumed, so it skips them unloaded.
        consumed = state.iteration - epoch_index * state.epoch_length if state.epoch_length else 0
        data.set_position(epoch=epoch_index, consumed=max(consumed, 0))
    else:
        sampler = getattr(data, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch_index)


def _flush_pending_window(engine: Engine, step: TrainStep) -> None:
    # A run or epoch that ends inside a window (terminate(), max_iters, a loader
    # without a length running dry) steps it here, before any other handler of
    # the event, exactly as a ragged epoch tail.
    if engine.state.window_position > 0:
        engine.state.output = step.close_window(engine, engine.state.output)


def _start_clean(engine: Engine, step: TrainStep) -> None:
    # Gradients left on the parameters by anything before this run would leak
    # into its first window.
    if engine.state.window_position > 0 or step.has_gradients():
        step.discard_window(engine)
    step.recheck_loss()


def create_trainer(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    accumulation_steps: int = 1,
    max_grad_norm: float | None = None,
    prepare_batch: PrepareBatch | None = None,
    non_blocking: bool = True,
    batch_size_fn: BatchSizeFn | None = None,
    track_grad_norm: bool = False,
) -> Engine:
    """Build the training Engine: one ignite iteration per micro-batch.

    Args:
        model: the model, already on ``device`` (DDP-wrapped under torch.distributed).
        optimizer: an optimizer over the model's parameters.
        loss_fn: ``loss_fn(y_pred, y)`` returning the mean loss of the batch as a scalar tensor.
        device: where batches go ("cpu", "cuda", "cuda:1" ...).
        precision: "fp32", "bf16", "fp16" (with GradScaler) or "auto".
        accumulation_steps: micro-batches per optimizer step (windows close early at epoch end).
        max_grad_norm: clip the global gradient norm (after unscaling) to this value.
        prepare_batch: ``prepare_batch(batch, device, non_blocking) -> (x, y)``.
        non_blocking: passed to ``Tensor.to``.
        batch_size_fn: ``batch_size_fn(x, y)`` → samples (or tokens) in a micro-batch,
            the weight of its loss in the window mean. Default: ``len(y)``.
        track_grad_norm: compute ``StepOutput.grad_norm`` even without clipping
            (it always is with ``max_grad_norm`` or fp16). Handlers that log it
            switch it on when attached.

    Returns:
        An ignite ``Engine`` (a ``TrainerEngine``) with ``StepEvents`` registered and
        ``state.optimizer_steps``, ``state.skipped_steps``, ``state.scaler`` and
        ``state.window_position``. A run that ends inside a window steps the
        partial window (see ``StepEvents``); an error discards it.

    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> trainer = create_trainer(model, opt, torch.nn.functional.mse_loss, accumulation_steps=2)
    >>> data = [(torch.randn(4, 2), torch.randn(4, 1)) for _ in range(5)]
    >>> trainer.run(data, max_epochs=1).optimizer_steps
    3
    """
    resolved_device = resolve_device(device)
    resolved_precision = resolve_precision(precision, resolved_device)
    _check_model_and_optimizer(model, optimizer, resolved_device)
    check_callable("loss_fn", loss_fn, "a callable loss_fn(y_pred, y) returning a scalar tensor", optional=False)
    check_callable("prepare_batch", prepare_batch, "prepare_batch(batch, device, non_blocking) -> (x, y), or None")
    check_callable("batch_size_fn", batch_size_fn, "batch_size_fn(x, y) -> number of samples, or None")
    step = TrainStep(
        model,
        optimizer,
        loss_fn,
        device=resolved_device,
        precision=resolved_precision,
        accumulation_steps=check_int("accumulation_steps", accumulation_steps, minimum=1, example=4),
        max_grad_norm=_check_max_grad_norm(max_grad_norm),
        prepare_batch=prepare_batch or default_prepare_batch,
        non_blocking=check_bool("non_blocking", non_blocking),
        batch_size_fn=batch_size_fn or default_batch_size,
        track_grad_norm=check_bool("track_grad_norm", track_grad_norm),
    )
    trainer = TrainerEngine(step)
    trainer.register_events(*StepEvents, event_to_attr=EVENT_COUNTERS)
    init_trainer_state(trainer, step.scaler)
    trainer.state.precision = resolved_precision.name
    trainer.add_event_handler(Events.STARTED, _start_clean, step)
    trainer.add_event_handler(Events.EPOCH_STARTED, _on_epoch_started, model)
    for end in (Events.EPOCH_COMPLETED, Events.TERMINATE_SINGLE_EPOCH, Events.TERMINATE, Events.COMPLETED):
        trainer.add_event_handler(end, _flush_pending_window, step)
    return trainer
