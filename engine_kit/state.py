"""What the trainer adds to ``engine.state`` and what one step returns."""

from __future__ import annotations

from typing import NamedTuple

import torch
from ignite.engine import Engine


class StepOutput(NamedTuple):
    """The result of one micro-batch, as tensors: nothing here forced a host sync.

    Attributes:
        loss: the micro-batch's loss, detached (unweighted, as ``loss_fn`` returned it).
        grad_norm: the pre-clip global gradient norm (unscaled) when this
            micro-batch closed a window, else ``None``. Computed with clipping,
            in fp16, or with ``track_grad_norm`` (which norm-logging handlers set).
        stepped: True when this micro-batch closed a window and the optimizer
            stepped (False for an fp16 step that GradScaler skipped).
        num_samples: samples (or tokens) in this micro-batch, from ``batch_size_fn``.

    >>> out = StepOutput(torch.tensor(0.5), None, False, 8)
    >>> out.num_samples
    8
    """

    loss: torch.Tensor
    grad_norm: torch.Tensor | None
    stepped: bool
    num_samples: int | torch.Tensor


# Counters the trainer keeps on engine.state and saves with engine.state_dict().
SAVED_COUNTERS = ("optimizer_steps", "skipped_steps", "windows", "checkpoints_saved", "sample_reference")


def init_trainer_state(engine: Engine, scaler: torch.amp.GradScaler) -> None:
    """Give ``engine.state`` the trainer's attributes and persist the counters.

    ``window_position`` (micro-batches in the open window) is not saved:
    checkpoints are only taken at window boundaries, where it is 0.
    """
    state = engine.state
    state.optimizer_steps = 0
    state.skipped_steps = 0
    state.windows = 0
    state.checkpoints_saved = 0
    # Sample count of the very first micro-batch: the fixed unit that per-micro-batch
    # loss weights are expressed in (see TrainStep); saved so a resumed run weights alike.
    state.sample_reference = None
    state.window_position = 0
    state.scaler = scaler
    state.stopped_by = None  # a handler that ends the run early says why here
    state.resumed_from = None  # the checkpoint a resumed run started from
    for key in SAVED_COUNTERS:
        if key not in engine.state_dict_user_keys:
            engine.state_dict_user_keys.append(key)
