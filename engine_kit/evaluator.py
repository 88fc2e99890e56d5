"""``create_evaluator``: inference in eval mode, leaving the model as it was."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric

from engine_kit.batch import PrepareBatch, default_prepare_batch
from engine_kit.checks import check_bool, check_callable
from engine_kit.engine import GuardedEngine, cleanup_handler
from engine_kit.errors import fix_message
from engine_kit.precision import resolve_device, resolve_precision


def _check_metrics(metrics: Any) -> None:
    if metrics is None:
        return
    if not isinstance(metrics, Mapping):
        raise TypeError(
            fix_message(
                f"metrics is a {type(metrics).__name__}, not a mapping.",
                "pass metrics={'accuracy': ignite.metrics.Accuracy()}.",
            )
        )
    for name, metric in metrics.items():
        if not isinstance(name, str) or not name:
            raise TypeError(fix_message(f"metric name {name!r} is not a non-empty string.", "name each metric."))
        if not isinstance(metric, Metric):
            raise TypeError(
                fix_message(
                    f"metrics[{name!r}] is a {type(metric).__name__}, not an ignite Metric.",
                    "pass ignite.metrics objects, e.g. Accuracy() or Loss(loss_fn).",
                )
            )


def create_evaluator(
    model: torch.nn.Module,
    *,
    metrics: Mapping[str, Metric] | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    prepare_batch: PrepareBatch | None = None,
    non_blocking: bool = True,
) -> Engine:
    """Build an evaluation Engine whose output is ``(y_pred, y)`` for ignite metrics.

    The model runs in eval mode under ``torch.inference_mode()`` (no autograd
    graph, no dropout, frozen BatchNorm statistics); its previous mode comes
    back when the run completes or fails, so a trainer resumes in train mode.

    >>> from ignite.metrics import MeanSquaredError
    >>> model = torch.nn.Linear(2, 1)
    >>> evaluator = create_evaluator(model, metrics={"mse": MeanSquaredError()})
    >>> data = [(torch.zeros(4, 2), model.bias.detach().expand(4, 1).clone())]
    >>> evaluator.run(data).metrics["mse"]
    0.0
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(fix_message(f"model is a {type(model).__name__}.", "pass a torch.nn.Module."))
    _check_metrics(metrics)
    check_callable("prepare_batch", prepare_batch, "prepare_batch(batch, device, non_blocking) -> (x, y), or None")
    check_bool("non_blocking", non_blocking)
    resolved_device = resolve_device(device)
    resolved_precision = resolve_precision(precision, resolved_device)
    prepare = prepare_batch or default_prepare_batch

    def evaluate(engine: Engine, batch: Any) -> tuple[Any, Any]:
        x, y = prepare(batch, resolved_device, non_blocking)
        with torch.inference_mode(), resolved_precision.autocast():
            y_pred = model(x)
        if isinstance(y_pred, torch.Tensor) and y_pred.is_floating_point():
            y_pred = y_pred.float()  # metrics accumulate in fp32 whatever the autocast dtype
        return y_pred, y

    evaluator = GuardedEngine(evaluate)
    modes: list[bool] = []

    def enter_eval(_: Engine) -> None:
        modes.append(model.training)
        model.eval()

    @cleanup_handler  # restores the mode on failure too, without swallowing the error
    def restore_mode(*_: Any) -> None:
        if modes:
            model.train(modes.pop())

    evaluator.add_event_handler(Events.STARTED, enter_eval)
    evaluator.add_event_handler(Events.COMPLETED, restore_mode)
    evaluator.add_event_handler(Events.EXCEPTION_RAISED, restore_mode)
    for name, metric in (metrics or {}).items():
        metric.attach(evaluator, name)
    return evaluator
