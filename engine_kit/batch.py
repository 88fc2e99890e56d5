"""Moving a batch to the device and counting its samples."""

from __future__ import annotations

from typing import Any, Callable

import torch

from engine_kit.errors import fix_message

PrepareBatch = Callable[[Any, torch.device, bool], tuple[Any, Any]]
BatchSizeFn = Callable[[Any, Any], "int | torch.Tensor"]


def _to_device(value: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(value, torch.Tensor):
        # Already there (CPU training, batches staged on the GPU): ``.to`` would return the
        # tensor itself after a dispatcher round trip, so the comparison is all it takes.
        return value if value.device == device else value.to(device, non_blocking=non_blocking)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device, non_blocking) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device, non_blocking) for k, v in value.items()}
    return value


def default_prepare_batch(batch: Any, device: torch.device, non_blocking: bool) -> tuple[Any, Any]:
    """Split ``batch`` into ``(x, y)`` and move both to ``device``.

    >>> x, y = default_prepare_batch((torch.ones(2, 3), torch.zeros(2)), torch.device("cpu"), False)
    >>> tuple(x.shape), tuple(y.shape)
    ((2, 3), (2,))
    """
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        shown = type(batch).__name__
        if isinstance(batch, (tuple, list)):
            shown += f" of length {len(batch)}"
        raise TypeError(
            fix_message(
                f"the batch is a {shown}, but without prepare_batch the trainer expects an (x, y) pair.",
                "yield (inputs, targets) from the loader, or pass prepare_batch=lambda batch, device, "
                "non_blocking: (x, y) to create_trainer/create_evaluator.",
            )
        )
    x, y = batch
    return _to_device(x, device, non_blocking), _to_device(y, device, non_blocking)


def default_batch_size(x: Any, y: Any) -> int:
    """Samples in a micro-batch: the first dimension of the target.

    >>> default_batch_size(torch.ones(4, 3), torch.zeros(4))
    4
    """
    target = y if isinstance(y, torch.Tensor) else x
    if not isinstance(target, torch.Tensor) or target.dim() == 0:
        raise TypeError(
            fix_message(
                f"cannot count the samples of a batch whose target is {type(y).__name__}.",
                "pass batch_size_fn=lambda x, y: <number of samples> to create_trainer.",
            )
        )
    return target.shape[0]


def split_and_count(batch: Any, device: torch.device, non_blocking: bool) -> tuple[Any, Any, int]:
    """``default_prepare_batch`` then ``default_batch_size``, in one call: ``(x, y, samples)``.

    The trainer's per-micro-batch path when neither is replaced. An ``(x, y)``
    pair of tensors takes the short way (one call instead of four); anything
    else goes through the two functions themselves, with their checks and errors.

    >>> x, y, n = split_and_count((torch.ones(4, 3), torch.zeros(4)), torch.device("cpu"), False)
    >>> tuple(x.shape), n
    ((4, 3), 4)
    """
    if (type(batch) is tuple or type(batch) is list) and len(batch) == 2:
        x, y = batch
        if type(x) is torch.Tensor and type(y) is torch.Tensor and y.ndim > 0:
            if x.device != device:
                x = x.to(device, non_blocking=non_blocking)
            if y.device != device:
                y = y.to(device, non_blocking=non_blocking)
            return x, y, y.shape[0]
    x, y = default_prepare_batch(batch, device, non_blocking)
    return x, y, default_batch_size(x, y)

