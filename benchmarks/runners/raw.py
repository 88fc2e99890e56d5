"""The hand-written reference loops: ``raw`` (the step alone) and ``raw_full`` (the extra work by hand)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable

import torch

from models import ACCUMULATION, MAX_GRAD_NORM, Case, autocast_dtype


def build_raw(case: Case, workdir: Path, full: bool) -> Callable[[], dict[str, Any]]:
    """A best-practice step written out: autocast, GradScaler for fp16, loss / 4, unscale, clip, step.

    No host sync per iteration. ``full`` adds, by hand: OneCycleLR stepped
    after each optimizer step, each step's loss kept as a device tensor and
    read (one ``tolist``) every ``log_every`` steps into a text file,
    validation under ``no_grad`` after each epoch (the mean loss read once),
    and the textbook atomic save every ``checkpoint_every`` steps:
    ``torch.save`` of model, optimizer, scheduler and scaler state to a temp
    file, then ``os.replace`` (no fsync).
    """
    model, optimizer = case.fresh_model()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    dtype = autocast_dtype(case.precision)
    device_type = case.device.type
    scaler = torch.amp.GradScaler(device_type, enabled=case.precision == "fp16")
    scheduler = case.one_cycle(optimizer) if full else None
    loss_fn, schedule = case.spec.loss_fn, case.schedule
    workdir.mkdir(parents=True, exist_ok=True)

    def autocast() -> Any:
        return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def run() -> dict[str, Any]:
        steps = saves = 0
        losses: list[torch.Tensor] = []
        log = open(workdir / "loss.txt", "a") if full else None
        for _ in range(case.epochs):
            model.train()
            for i, (x, y) in enumerate(case.train, start=1):
                with autocast():
                    loss = loss_fn(model(x), y)
                scaler.scale(loss / ACCUMULATION).backward()
                if i % ACCUMULATION:
                    continue
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                steps += 1
                if not full:
                    continue
                scheduler.step()
                losses.append(loss.detach())
                if steps % schedule.log_every == 0:
                    first = steps - len(losses) + 1
                    log.write("".join(f"{first + k} {v}\n" for k, v in enumerate(torch.stack(losses).tolist())))
                    log.flush()
                    losses.clear()
                if steps % schedule.checkpoint_every == 0:
                    save(workdir / "last.pt", {
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": steps,
                    })
                    saves += 1
            if full:
                validate(model, case, autocast)
        if log is not None:
            log.close()
        return {"optimizer_steps": steps, "checkpoints": saves}

    return run


def validate(model: torch.nn.Module, case: Case, autocast: Callable[[], Any]) -> float:
    """The sample-weighted mean validation loss, in eval mode under ``no_grad`` (one host read)."""
    model.eval()
    total, count = torch.zeros((), device=case.device), 0
    with torch.no_grad():
        for x, y in case.val:
            with autocast():
                total += case.spec.loss_fn(model(x), y).float() * len(y)
            count += len(y)
    model.train()
    return total.item() / count


def save(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, then ``os.replace``: atomic, not durable (no fsync)."""
    temp = path.with_name(path.name + ".tmp")
    torch.save(state, temp)
    os.replace(temp, path)
