"""One call that attaches the standard handler stack, in the right order."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ignite.engine import Engine

from engine_kit.checks import check_bool, check_int, check_name, check_optional_int, check_path
from engine_kit.errors import fix_message
from engine_kit.run_directory import prepare_run_directory
from handlers.checkpoint import CheckpointRotation
from handlers.doctor import Doctor
from handlers.early_stopping import MODES, EarlyStopping
from handlers.grad_norm import GradNormLogger
from handlers.nan_guard import NanGuard
from handlers.progress import ProgressBar
from handlers.step_log import StepLog
from handlers.tensorboard import TensorBoardLogger
from handlers.validation import Validation


@dataclass
class StandardHandlers:
    """The handlers ``attach_standard`` created (None where switched off)."""

    validation: Validation
    early_stopping: EarlyStopping | None
    tensorboard: TensorBoardLogger
    grad_norm: GradNormLogger
    step_log: StepLog
    nan_guard: NanGuard
    progress: ProgressBar | None
    checkpoints: CheckpointRotation
    doctor: Doctor | None = None


def _check_standard_options(
    metric: Any, mode: Any, patience: Any, log_every: Any, keep_last: Any, keep_best: Any, progress: Any, doctor: Any
) -> None:
    # The options shared by several handlers, checked before the first one is attached.
    check_name("metric", metric, "accuracy")
    if mode not in MODES:
        raise ValueError(fix_message(f"mode={mode!r} is not one of {MODES}.", "pass mode='max' for a score, 'min' for a loss."))
    check_optional_int("patience", patience, minimum=1)
    check_int("log_every", log_every, minimum=1, example=50)
    check_int("keep_last", keep_last, minimum=0, example=2)
    check_int("keep_best", keep_best, minimum=0, example=1)
    check_bool("progress", progress)
    check_bool("doctor", doctor)


def attach_standard(
    trainer: Engine,
    evaluator: Engine,
    val_loader: Any,
    *,
    run_dir: str | os.PathLike[str],
    metric: str = "accuracy",
    mode: str = "max",
    validate_every_epochs: int | None = 1,
    validate_every_steps: int | None = None,
    checkpoint_every_steps: int | None = 100,
    keep_last: int = 2,
    keep_best: int = 1,
    patience: int | None = None,
    log_every: int = 50,
    progress: bool = False,
    resume: str | None = "auto",
    train_data: Any = None,
    doctor: bool = True,
    async_save: bool = True,
) -> StandardHandlers:
    """Validation, early stopping, TensorBoard, grad norms, step log, NaN guard, doctor, progress, checkpoints.

    Files go under ``run_dir``: ``tb/``, ``steps.jsonl``, ``doctor.json``, ``checkpoints/``.
    Order matters and is handled here: validation first (its metrics feed
    early stopping, TensorBoard and best-k), the checkpoint handler last (so a
    checkpoint captures every other handler's state after it ran).

    Args:
        trainer: a ``create_trainer`` engine.
        evaluator: a ``create_evaluator`` engine with ``metric`` among its metrics.
        val_loader: the validation data (not shuffled).
        run_dir: where logs and checkpoints go (created).
        metric, mode: the validation metric that ranks checkpoints and drives early stopping.
        validate_every_epochs, validate_every_steps: validation schedule (give one).
        checkpoint_every_steps: "last" checkpoints every N optimizer steps (and at epoch end).
        keep_last, keep_best: rotation sizes.
        patience: early-stopping patience in validations (None: no early stopping).
        log_every: optimizer steps between host reads of the logged tensors and of the NaN
            guard's values (``log_every * accumulation_steps`` micro-batches for ``NanGuard``).
        progress: show a tqdm bar.
        resume: "auto" (newest valid checkpoint in run_dir), a path, or None.
        train_data: the training dataset/loader, to warn when validation overlaps it.
        doctor: attach a ``Doctor`` (findings in the log, TensorBoard and ``doctor.json``);
            it adds no per-iteration work once the first iterations are checked.
        async_save: write checkpoints on a background thread (see ``CheckpointRotation``);
            ``False`` writes each one on the training thread.

    >>> import tempfile, torch
    >>> from ignite.metrics import Accuracy
    >>> from engine_kit import create_evaluator, create_trainer
    >>> model = torch.nn.Linear(4, 3)
    >>> trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.cross_entropy)
    >>> evaluator = create_evaluator(model, metrics={"accuracy": Accuracy()})
    >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
    >>> val = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    >>> stack = attach_standard(trainer, evaluator, val, run_dir=tempfile.mkdtemp())
    >>> trainer.run(data, max_epochs=2).optimizer_steps, len(trainer.state.val_history)
    (6, 2)
    """
    _check_standard_options(metric, mode, patience, log_every, keep_last, keep_best, progress, doctor)
    # Checked and created before anything is attached: a bad path leaves the trainer untouched.
    run_dir = prepare_run_directory(check_path("run_dir", run_dir, "runs/exp1"))
    validation = Validation(evaluator, val_loader, every_epochs=None if validate_every_steps else validate_every_epochs,
                            every_steps=validate_every_steps, train_data=train_data)
    validation.attach(trainer)
    early_stopping = None
    if patience is not None:
        early_stopping = EarlyStopping(metric=metric, patience=patience, mode=mode)
        early_stopping.attach(trainer)
    tensorboard = TensorBoardLogger(log_dir=run_dir / "tb", log_every=log_every)
    tensorboard.attach(trainer)
    grad_norm = GradNormLogger(flush_every=log_every, writer=tensorboard.writer)
    grad_norm.attach(trainer)
    step_log = StepLog(run_dir / "steps.jsonl", flush_every=log_every)
    step_log.attach(trainer)
    # NanGuard counts micro-batches: log_every optimizer steps' worth of them, so it reads at the
    # loggers' cadence (its save veto still checks everything pending before each checkpoint).
    accumulation = getattr(getattr(trainer, "step", None), "accumulation_steps", 1)
    nan_guard = NanGuard(check_every=log_every * accumulation)
    nan_guard.attach(trainer)
    doctor_handler = None
    if doctor:
        doctor_handler = Doctor(path=run_dir / "doctor.json", train_data=train_data)
        doctor_handler.attach(trainer)
    bar = None
    if progress:
        bar = ProgressBar()
        bar.attach(trainer)
    checkpoints = CheckpointRotation(run_dir / "checkpoints", every_steps=checkpoint_every_steps, keep_last=keep_last,
                                     keep_best=keep_best, metric=metric if keep_best else None, mode=mode, resume=resume,
                                     async_save=async_save)
    checkpoints.attach(trainer)
    return StandardHandlers(validation, early_stopping, tensorboard, grad_norm, step_log, nan_guard, bar, checkpoints,
                            doctor_handler)
