"""Learning-rate schedulers stepped once per optimizer step, or on a validation metric."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from ignite.engine import Engine
from ignite.engine.events import RemovableEventHandle
from ignite.handlers.param_scheduler import ParamGroupScheduler, ParamScheduler
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, ReduceLROnPlateau, SequentialLR

from engine_kit.checks import check_int
from engine_kit.errors import fix_message
from engine_kit.events import StepEvents
from engine_kit.stateful import register_stateful
from handlers.base import require_step_events
from handlers.events import ValidationEvents, register_validation_events


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(
            fix_message(f"name={name!r} is not a non-empty string.", "pass the checkpoint name, e.g. name='scheduler'.")
        )
    return name


def _claim_scheduler(trainer: Engine, scheduler: Any) -> None:
    """Refuse a scheduler already attached to ``trainer`` (it would step twice per step)."""
    if not hasattr(trainer.state, "lr_schedulers"):
        trainer.state.lr_schedulers = []
    if any(existing is scheduler for existing in trainer.state.lr_schedulers):
        raise RuntimeError(
            fix_message(
                f"this {type(scheduler).__name__} is already attached to the trainer.",
                "attach each scheduler once; it is stepped on every optimizer step from then on.",
            )
        )
    trainer.state.lr_schedulers.append(scheduler)


def _check_optimizer(trainer: Engine, scheduler: Any) -> None:
    optimizer = getattr(getattr(trainer, "step", None), "optimizer", None)
    if optimizer is not None and scheduler.optimizer is not optimizer:
        raise ValueError(
            fix_message(
                f"the {type(scheduler).__name__} drives another optimizer than the trainer's "
                f"({type(scheduler.optimizer).__name__} at {id(scheduler.optimizer):#x}).",
                "build the scheduler from the optimizer you passed to create_trainer.",
            )
        )


def _step_lr_scheduler(engine: Engine, scheduler: LRScheduler) -> None:
    scheduler.step()


def attach_scheduler(
    trainer: Engine, scheduler: LRScheduler | ParamScheduler | ParamGroupScheduler, *, name: str = "scheduler"
) -> RemovableEventHandle:
    """Step ``scheduler`` once per optimizer step of ``trainer``.

    An ignite ``ParamScheduler`` (``PiecewiseLinear``, ``LRScheduler``,
    ``create_lr_scheduler_with_warmup(...)``, ...) runs on
    ``StepEvents.STEP_STARTED``, before the step that uses its value, as ignite
    runs it on ``ITERATION_STARTED``. A torch scheduler runs on
    ``StepEvents.OPTIMIZER_STEP_COMPLETED``: after the optimizer
    stepped (so PyTorch's "``lr_scheduler.step()`` before ``optimizer.step()``"
    warning cannot appear), once per accumulation window rather than per
    micro-batch, and not on fp16 steps that GradScaler skipped. The scheduler
    is registered for checkpoints under ``name``.

    Args:
        trainer: the engine from ``create_trainer``.
        scheduler: any ``torch.optim.lr_scheduler.LRScheduler`` over the
            trainer's optimizer, except ``ReduceLROnPlateau``
            (see ``attach_plateau_scheduler``).
        name: the checkpoint entry (a numeric suffix is added when taken).

    Returns:
        The ignite handle; ``handle.remove()`` detaches the stepping.

    >>> import torch
    >>> from engine_kit import create_trainer
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> trainer = create_trainer(model, opt, torch.nn.functional.mse_loss, accumulation_steps=2)
    >>> _ = attach_scheduler(trainer, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    >>> data = [(torch.randn(4, 2), torch.randn(4, 1)) for _ in range(4)]
    >>> _ = trainer.run(data, max_epochs=1)  # 4 micro-batches = 2 optimizer steps
    >>> round(opt.param_groups[0]["lr"], 6)
    0.025
    """
    if isinstance(scheduler, (ParamScheduler, ParamGroupScheduler)):
        name = _check_name(name)
        require_step_events(trainer, "attach_scheduler", subject="the scheduler")
        _claim_scheduler(trainer, scheduler)
        register_stateful(trainer, name, scheduler)
        return trainer.add_event_handler(StepEvents.STEP_STARTED, scheduler)
    if isinstance(scheduler, ReduceLROnPlateau):
        raise TypeError(
            fix_message(
                "ReduceLROnPlateau steps on a validation metric, not on every optimizer step.",
                "use attach_plateau_scheduler(trainer, scheduler, metric='val_loss') (name your metric).",
            )
        )
    if not isinstance(scheduler, LRScheduler):
        raise TypeError(
            fix_message(
                f"scheduler is a {type(scheduler).__name__}, not a torch.optim.lr_scheduler.LRScheduler.",
                "pass a torch scheduler such as OneCycleLR, or one from warmup_cosine(...).",
            )
        )
    name = _check_name(name)
    require_step_events(trainer, "attach_scheduler", subject="the scheduler")
    _check_optimizer(trainer, scheduler)
    _claim_scheduler(trainer, scheduler)
    register_stateful(trainer, name, scheduler)
    return trainer.add_event_handler(StepEvents.OPTIMIZER_STEP_COMPLETED, _step_lr_scheduler, scheduler)


def attach_plateau_scheduler(
    trainer: Engine, scheduler: ReduceLROnPlateau, *, metric: str, name: str = "scheduler"
) -> RemovableEventHandle:
    """Step ``ReduceLROnPlateau`` with ``trainer.state.val_metrics[metric]`` after each validation.

    It runs on the trainer's ``ValidationEvents.VALIDATION_COMPLETED`` and is
    registered for checkpoints under ``name``. The scheduler's own ``mode``
    says whether lower or higher is better.

    >>> import torch
    >>> from ignite.engine import Engine
    >>> trainer = Engine(lambda e, b: None)
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    >>> _ = attach_plateau_scheduler(trainer, plateau, metric="loss")
    >>> for loss in (1.0, 2.0):
    ...     trainer.state.val_metrics = {"loss": loss}
    ...     trainer.fire_event(ValidationEvents.VALIDATION_COMPLETED)
    >>> opt.param_groups[0]["lr"]
    0.5
    """
    if not isinstance(scheduler, ReduceLROnPlateau):
        raise TypeError(
            fix_message(
                f"scheduler is a {type(scheduler).__name__}, not a ReduceLROnPlateau.",
                "use attach_scheduler(trainer, scheduler) for schedulers that step on every optimizer step.",
            )
        )
    if not isinstance(metric, str) or not metric:
        raise ValueError(
            fix_message(
                f"metric={metric!r} is not a non-empty string.", "name a validation metric, e.g. metric='val_loss'."
            )
        )
    name = _check_name(name)
    _check_optimizer(trainer, scheduler)
    _claim_scheduler(trainer, scheduler)
    register_validation_events(trainer)
    register_stateful(trainer, name, scheduler)
    return trainer.add_event_handler(ValidationEvents.VALIDATION_COMPLETED, _step_on_metric, scheduler, metric)


def _step_on_metric(trainer: Engine, scheduler: ReduceLROnPlateau, metric: str) -> None:
    metrics = trainer.state.val_metrics
    if metric not in metrics:
        raise ValueError(
            fix_message(
                f"metric {metric!r} is not among the validation metrics {sorted(metrics)}.",
                "pass metric= one of those names, or add the metric to the evaluator.",
            )
        )
    scheduler.step(metrics[metric])


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    min_lr: float = 0.0,
    warmup_start_factor: float | None = None,
) -> LRScheduler:
    """Linear warmup, then cosine decay to ``min_lr``, counted in optimizer steps.

    Built as ``SequentialLR([LinearLR, CosineAnnealingLR(T_max=total_steps -
    warmup_steps, eta_min=min_lr)], milestones=[warmup_steps])``; with
    ``warmup_steps=0`` it is the plain ``CosineAnnealingLR(T_max=total_steps)``.
    The learning rate used by step ``k`` (0-based, scheduler stepped after each
    step) is::

        k <  warmup_steps:  base_lr * (f + (1 - f) * k / warmup_steps)
        k >= warmup_steps:  min_lr + (base_lr - min_lr) * (1 + cos(pi * (k - warmup_steps) / T_max)) / 2

    ``f`` (``warmup_start_factor``) defaults to ``1 / (warmup_steps + 1)``, so
    the warmup climbs in equal increments ``base_lr * (k + 1) / (warmup_steps +
    1)`` and the first cosine step uses exactly ``base_lr``. (A factor of 0 is
    refused by ``LinearLR``, and would waste the first step anyway.) Past
    ``total_steps`` the cosine would rise again: size ``total_steps`` with
    ``onecycle_total_steps``.

    >>> import torch
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> sched = warmup_cosine(opt, warmup_steps=3, total_steps=7)
    >>> lrs = []
    >>> for _ in range(7):
    ...     lrs.append(round(opt.param_groups[0]["lr"], 3)); opt.step(); sched.step()
    >>> lrs
    [0.25, 0.5, 0.75, 1.0, 0.854, 0.5, 0.146]
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            fix_message(f"optimizer is a {type(optimizer).__name__}.", "pass the torch.optim.Optimizer to schedule.")
        )
    warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
    total_steps = check_int("total_steps", total_steps, minimum=1)
    if warmup_steps >= total_steps:
        raise ValueError(
            fix_message(
                f"warmup_steps={warmup_steps} leaves no cosine phase within total_steps={total_steps}.",
                "pass warmup_steps < total_steps (total_steps counts optimizer steps, see onecycle_total_steps).",
            )
        )
    if isinstance(min_lr, bool) or not isinstance(min_lr, numbers.Real) or not 0 <= min_lr < math.inf:
        raise ValueError(
            fix_message(f"min_lr={min_lr!r} is not a finite number >= 0.", "pass min_lr=0.0 or a small lr.")
        )
    largest_lr = max(group["lr"] for group in optimizer.param_groups)
    if min_lr > largest_lr:
        raise ValueError(
            fix_message(
                f"min_lr={min_lr} exceeds the optimizer's learning rate {largest_lr}: the 'decay' would rise.",
                "pass a min_lr below the optimizer's lr (often 0 or lr / 100).",
            )
        )
    cosine = CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps, eta_min=float(min_lr))
    if warmup_steps == 0:
        return cosine
    if warmup_start_factor is None:
        warmup_start_factor = 1.0 / (warmup_steps + 1)
    if (
        isinstance(warmup_start_factor, bool)
        or not isinstance(warmup_start_factor, numbers.Real)
        or not 0 < warmup_start_factor <= 1
    ):
        raise ValueError(
            fix_message(
                f"warmup_start_factor={warmup_start_factor!r} is not in (0, 1].",
                "pass a fraction of the base lr to start from, e.g. 0.1, or leave it None.",
            )
        )
    warmup = LinearLR(optimizer, start_factor=float(warmup_start_factor), end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def optimizer_steps_per_epoch(loader_len: int, accumulation_steps: int) -> int:
    """Optimizer steps in an epoch of ``loader_len`` micro-batches.

    A window never spans an epoch boundary, so a ragged tail is one more step:
    ``ceil(loader_len / accumulation_steps)``.

    >>> optimizer_steps_per_epoch(10, 4)
    3
    """
    loader_len = check_int("loader_len", loader_len, minimum=1)
    accumulation_steps = check_int("accumulation_steps", accumulation_steps, minimum=1)
    return -(-loader_len // accumulation_steps)


def onecycle_total_steps(loader_or_len: Any, epochs: int, accumulation_steps: int) -> int:
    """``total_steps`` for ``OneCycleLR`` (or ``warmup_cosine``) over ``epochs`` epochs.

    ``loader_or_len`` is a sized loader or its length in micro-batches (what
    the trainer runs per epoch: pass ``epoch_length`` if you give one to
    ``trainer.run``). OneCycleLR raises when stepped more than ``total_steps``
    times, so this counts the ragged tail window of each epoch.

    >>> onecycle_total_steps(range(10), epochs=3, accumulation_steps=4)
    9
    """
    if isinstance(loader_or_len, numbers.Integral) and not isinstance(loader_or_len, bool):
        length = loader_or_len
    elif hasattr(loader_or_len, "__len__"):
        length = len(loader_or_len)
    else:
        raise TypeError(
            fix_message(
                f"a {type(loader_or_len).__name__} has no length, so the number of optimizer steps is unknown.",
                "pass the number of micro-batches per epoch (the epoch_length you give trainer.run) instead.",
            )
        )
    epochs = check_int("epochs", epochs, minimum=1)
    return optimizer_steps_per_epoch(length, accumulation_steps) * epochs
