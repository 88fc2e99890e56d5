"""What the ignite-native tests share: a plain ignite trainer and the learning rates updates used."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ignite.engine import Engine


def plain_ignite_trainer(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Engine:
    """ignite's textbook trainer: one optimizer step per batch, output ``loss.item()``."""

    def update(engine: Engine, batch: tuple) -> float:
        optimizer.zero_grad()
        loss = F.mse_loss(model(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        return loss.item()

    return Engine(update)


def lrs_used_by_updates(optimizer: torch.optim.Optimizer) -> list[float]:
    """A list that receives the first group's learning rate at every ``optimizer.step()``."""
    used: list[float] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    return used
