"""Tiny runs for planting one mistake at a time under the Doctor."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from engine_kit import create_trainer
from handlers import Doctor
from tests.helpers import mlp


def learnable_batches(n_batches: int, batch_size: int = 16, seed: int = 0, features: int = 4,
                      classes: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded batches whose label is the argmax of the first ``classes`` features: the loss falls fast."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        x = torch.randn(batch_size, features, generator=gen)
        batches.append((x, x[:, :classes].argmax(1)))
    return batches


def train(
    model: torch.nn.Module | None = None,
    optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer] | None = None,
    loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
    data: Any = None,
    *,
    epochs: int = 1,
    doctor: Doctor | None = None,
    before: Callable[[Any], None] | None = None,
    **trainer_options: Any,
) -> Doctor:
    """Train ``model`` (an MLP) on ``data`` (8 learnable batches) under a Doctor; return the doctor.

    ``optimizer`` builds the optimizer from the model (default SGD, lr 0.5, no
    weight decay); ``before(trainer)`` attaches whatever else the plant needs.
    """
    model = model if model is not None else mlp()
    built = optimizer(model) if optimizer is not None else torch.optim.SGD(model.parameters(), lr=0.5)
    trainer = create_trainer(model, built, loss_fn, **trainer_options)
    if before is not None:
        before(trainer)
    doctor = doctor if doctor is not None else Doctor()
    doctor.attach(trainer)
    trainer.run(data if data is not None else learnable_batches(8), max_epochs=epochs)
    return doctor
