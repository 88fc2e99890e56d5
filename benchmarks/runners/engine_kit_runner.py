"""engine_kit's runners: ``create_trainer`` alone, and with ``attach_standard`` (``_full``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ignite.metrics import Loss

from engine_kit import create_evaluator, create_trainer
from handlers import attach_scheduler, attach_standard
from models import ACCUMULATION, MAX_GRAD_NORM, Case


def build_engine_kit(case: Case, workdir: Path, full: bool) -> Callable[[], dict[str, Any]]:
    """``create_trainer`` with accumulation 4, clipping at 1.0 and the case's precision.

    ``full`` adds ``attach_standard`` (validation each epoch, TensorBoard,
    gradient norms, the JSONL step log, NaN guard, durable checkpoints every
    ``checkpoint_every`` optimizer steps keeping the last 2, written on a
    background thread as ``attach_standard`` does by default, everything read
    every ``log_every`` steps) and OneCycleLR through ``attach_scheduler``.
    """
    model, optimizer = case.fresh_model()
    trainer = create_trainer(model, optimizer, case.spec.loss_fn, device=case.device, precision=case.precision,
                             accumulation_steps=ACCUMULATION, max_grad_norm=MAX_GRAD_NORM)
    if full:
        evaluator = create_evaluator(model, metrics={"loss": Loss(case.spec.loss_fn)}, device=case.device,
                                     precision=case.precision)
        schedule = case.schedule
        attach_standard(trainer, evaluator, case.val, run_dir=workdir, metric="loss", mode="min",
                        checkpoint_every_steps=schedule.checkpoint_every, keep_last=2, keep_best=0,
                        log_every=schedule.log_every, resume=None)
        # After the loggers, so they read the learning rate each step used before it moves.
        attach_scheduler(trainer, case.one_cycle(optimizer))

    def run() -> dict[str, Any]:
        state = trainer.run(case.train, max_epochs=case.epochs)
        return {"optimizer_steps": state.optimizer_steps, "checkpoints": getattr(state, "checkpoints_saved", 0)}

    return run
