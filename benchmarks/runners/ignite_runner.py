"""ignite's runners: ``create_supervised_trainer``, and with its own handlers (``_full``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from ignite.engine import Engine, Events, create_supervised_evaluator, create_supervised_trainer
from ignite.handlers import Checkpoint, DiskSaver, LRScheduler
from ignite.metrics import Loss

from models import ACCUMULATION, Case


def _precision_options(case: Case) -> tuple[dict[str, Any], Callable[[torch.nn.Module, Any], Any]]:
    """ignite's options for the case's precision, and the ``model_fn`` that runs the forward pass.

    ignite's ``amp_mode="amp"`` autocasts to float16 on CUDA; bf16 has no
    option of its own, so the forward pass runs under a bf16 autocast in
    ``model_fn`` (the loss, as with autocast, in the output's dtype).
    """
    if case.precision == "fp16":
        return {"amp_mode": "amp", "scaler": True}, lambda model, x: model(x)
    if case.precision == "bf16":
        device_type = case.device.type

        def forward(model: torch.nn.Module, x: Any) -> Any:
            with torch.autocast(device_type, dtype=torch.bfloat16):
                return model(x)

        return {}, forward
    return {}, lambda model, x: model(x)


def build_ignite(case: Case, workdir: Path, full: bool) -> Callable[[], dict[str, Any]]:
    """``create_supervised_trainer`` with ``gradient_accumulation_steps=4`` (ignite 0.5.5 has no clipping).

    The output is the detached loss (ignite's default ``loss.item()`` would
    sync every iteration). ``full`` adds ignite's ``LRScheduler`` around
    OneCycleLR every 4 iterations, a ``create_supervised_evaluator`` run on
    the validation set each epoch, ignite's ``Checkpoint`` (model, optimizer,
    scheduler, trainer; ``DiskSaver(atomic=True)``: temp file + rename, no
    fsync; the last 2 kept) every ``checkpoint_every`` optimizer steps, and
    the loss of every ``log_every``-th step written to a text file.
    """
    model, optimizer = case.fresh_model()
    options, model_fn = _precision_options(case)
    trainer = create_supervised_trainer(
        model, optimizer, case.spec.loss_fn, device=case.device, non_blocking=True,
        gradient_accumulation_steps=ACCUMULATION, output_transform=lambda x, y, y_pred, loss: loss.detach(),
        model_fn=model_fn, **options,
    )
    saves = [0]
    if full:
        _attach_full(trainer, model, optimizer, case, workdir, model_fn, saves)

    def run() -> dict[str, Any]:
        state = trainer.run(case.train, max_epochs=case.epochs)
        return {"optimizer_steps": state.iteration // ACCUMULATION, "checkpoints": saves[0]}

    return run


def _attach_full(trainer: Engine, model: torch.nn.Module, optimizer: torch.optim.Optimizer, case: Case,
                 workdir: Path, model_fn: Callable[[torch.nn.Module, Any], Any], saves: list[int]) -> None:
    schedule = case.schedule
    scheduler = LRScheduler(case.one_cycle(optimizer))
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=ACCUMULATION), scheduler)
    evaluator = create_supervised_evaluator(model, metrics={"loss": Loss(case.spec.loss_fn)}, device=case.device,
                                            non_blocking=True, model_fn=model_fn,
                                            amp_mode="amp" if case.precision == "fp16" else None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda: evaluator.run(case.val))
    checkpoint = Checkpoint({"model": model, "optimizer": optimizer, "lr_scheduler": scheduler, "trainer": trainer},
                            DiskSaver(workdir, atomic=True, require_empty=False), n_saved=2)

    def save(engine: Engine) -> None:
        checkpoint(engine)
        saves[0] += 1

    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=ACCUMULATION * schedule.checkpoint_every), save)
    log = workdir / "loss.txt"

    def log_loss(engine: Engine) -> None:
        with open(log, "a") as f:
            f.write(f"{engine.state.iteration // ACCUMULATION} {engine.state.output.item()}\n")

    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=ACCUMULATION * schedule.log_every), log_loss)
