"""What the trainer adds to ``engine.state`` and what one step returns."""

from __future__ import annotations

from typing import NamedTuple

import torch
from ignite.engine import Engine


class _StepOutputFields(NamedTuple):
    loss: torch.Tensor
    grad_norm: torch.Tensor
    stepped: bool
    num_samples: int | torch.Tensor


# Stands for "no norm" inside the tuple: ignite's utilities (apply_to_type, as in
# TerminateOnNan) walk every field and cannot walk None; an empty tensor is finite.
_NO_NORM = torch.empty(0)
_tuple_new = tuple.__new__


class StepOutput(_StepOutputFields):
    """The result of one micro-batch, as tensors: nothing here forced a host sync.

    Attributes:
        loss: the micro-batch's loss, detached (unweighted, as ``loss_fn`` returned it).
        grad_norm: the pre-clip global gradient norm (unscaled) when this
            micro-batch closed a window, else ``None``. Computed with clipping,
            in fp16, or with ``track_grad_norm`` (which norm-logging handlers set).
            Walked as a tuple (unpacking, ignite's ``apply_to_type``), an absent
            norm is an empty tensor, so ignite's handlers can traverse the output.
        stepped: True when this micro-batch closed a window and the optimizer
            stepped (False for an fp16 step that GradScaler skipped).
        num_samples: samples (or tokens) in this micro-batch, from ``batch_size_fn``.

    >>> out = StepOutput(torch.tensor(0.5), None, False, 8)
    >>> out.num_samples, out.grad_norm, out[1].numel()
    (8, None, 0)
    """

    __slots__ = ()

    def __new__(
        cls, loss: torch.Tensor, grad_norm: torch.Tensor | None, stepped: bool, num_samples: int | torch.Tensor
    ) -> "StepOutput":
        # tuple.__new__ directly: the NamedTuple's generated __new__ would add a Python call per micro-batch.
        return _tuple_new(cls, (loss, _NO_NORM if grad_norm is None else grad_norm, stepped, num_samples))

    @property
    def grad_norm(self) -> torch.Tensor | None:  # type: ignore[override]
        norm = tuple.__getitem__(self, 1)
        return None if norm is _NO_NORM or norm.numel() == 0 else norm


# Counters the trainer keeps on engine.state and saves with engine.state_dict().
SAVED_COUNTERS = (
    "optimizer_steps",
    "skipped_steps",
    "windows",
    "checkpoints_saved",
    "sample_reference",
    "steps_started",
    "window_position",
)


def init_trainer_state(engine: Engine, scaler: torch.amp.GradScaler) -> None:
    """Give ``engine.state`` the trainer's attributes and persist the counters.

    ``window_position`` (micro-batches in the open window) is saved so that a
    state taken inside a window is recognised, and refused, when loaded: the
    partial gradients it would need are not part of any state dict.
    """
    state = engine.state
    state.optimizer_steps = 0
    state.skipped_steps = 0
    state.windows = 0
    state.steps_started = 0  # STEP_STARTED fired; one ahead of optimizer_steps inside a window
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
