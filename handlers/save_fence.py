"""The fence snapshot of a background save: no copy of the weights, the next step waits instead.

In fence mode a background save does not copy the model's parameters and
the optimizer's state: the writer serializes the live tensors, and the next
``optimizer.step()`` — the only thing that changes them — waits (an
optimizer step pre-hook) until the writer has serialized them. The rest of
the payload is copied at capture as usual: buffers that change in forward
(BatchNorm running statistics), RNG, scaler, scheduler and handler states
are small. Only CPU tensors are fenced; CUDA tensors are always copied.

It pays off when the next window's forward and backward take longer than
serializing the state; otherwise the step waits out the difference.
Something else that changes the parameters in place before the next step
(a user's handler at ``ITERATION_STARTED``) would reach the file: the
default copy mode has no such caveat.

>>> import torch
>>> model = torch.nn.Linear(2, 1)
>>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
>>> len(fenced_storages(model, optimizer))
2
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def fenced_storages(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> frozenset[int]:
    """The CPU storages (``untyped_storage()._cdata``) only ``optimizer.step()`` changes: parameters and optimizer state."""
    tensors = list(model.parameters())
    tensors += [value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)]
    return frozenset(t.untyped_storage()._cdata for t in tensors if t.device.type == "cpu")


class StepFence:
    """Hold ``optimizer.step()`` until the save in flight has serialized its live tensors.

    Args:
        wait_serialized: blocks until the writer no longer reads the live tensors.
    """

    def __init__(self, wait_serialized: Callable[[], None]) -> None:
        self.wait_serialized = wait_serialized
        self.waited_s = 0.0  # training time the fence held steps back
        self._hooked: dict[int, Any] = {}  # id(optimizer) -> its hook handle

    def arm(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer.step()`` respect the fence (once per optimizer)."""
        if id(optimizer) not in self._hooked:
            self._hooked[id(optimizer)] = optimizer.register_step_pre_hook(self._before_step)

    def disarm(self) -> None:
        """Remove the hooks (the run is over)."""
        for handle in self._hooked.values():
            handle.remove()
        self._hooked = {}

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        started = time.perf_counter()
        self.wait_serialized()
        self.waited_s += time.perf_counter() - started
