"""The benchmark's workload: a seeded MLP trained with AdamW, its batches, clock-safe syncs."""

from __future__ import annotations

from typing import Any

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock read after it covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(width: int, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The MLP ``width/4 → width → width → width/4`` and its AdamW optimizer, seeded.

    ``width=4096`` gives 25.2M parameters; AdamW's two moment buffers make
    the checkpoint three times the weights (302 MB in fp32).
    """
    torch.manual_seed(0)
    io_width = width // 4
    model = torch.nn.Sequential(
        torch.nn.Linear(io_width, width), torch.nn.ReLU(),
        torch.nn.Linear(width, width), torch.nn.ReLU(),
        torch.nn.Linear(width, io_width),
    ).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def make_data(steps: int, batch: int, width: int, device: torch.device, distinct: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` regression batches on ``device`` (loading costs nothing in the loops).

    Only ``distinct`` batches are made; the list repeats them, so hundreds of
    large GPU batches cost the memory of ``distinct``.
    """
    gen = torch.Generator().manual_seed(1)
    made = [(torch.randn(batch, width // 4, generator=gen).to(device), torch.randn(batch, width // 4, generator=gen).to(device))
            for _ in range(min(steps, distinct))]
    return [made[i % len(made)] for i in range(steps)]


def raw_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What a hand-written loop saves: the model's and the optimizer's state dicts (live tensors, not copies)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def tensors_of(value: Any) -> list[torch.Tensor]:
    """Every tensor in a nest of dicts, lists and tuples, in a stable order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in tensors_of(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_of(item)]
    return []


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor of model + optimizer state: what any snapshot must copy."""
    return sum(t.numel() * t.element_size() for t in tensors_of(raw_state(model, optimizer)))
