"""Everything a checkpoint holds for an exact resume, and putting it back.

``capture_training_state(trainer)`` gathers the model, optimizer, GradScaler,
trainer counters, every registered stateful object (schedulers, handlers),
the data loader's position, RNG states and metadata (among them the settings
an exact resume depends on: precision, accumulation steps, world size, the
classes of the registered objects). ``restore_training_state`` runs every
check of ``engine_kit.resume_checks`` first and raises
``CheckpointMismatchError`` listing every difference before anything is
applied; RNG states are restored last.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine

import engine_kit
from engine_kit.errors import CheckpointMismatchError
from engine_kit.resume_checks import (
    FORMAT_VERSION,
    ResumeReport,
    check_resume,
    optimizer_fingerprint,
    stateful_classes,
    unwrap_model,
)
from engine_kit.rng import capture_rng_state, restore_rng_state
from engine_kit.stateful import stateful_objects

__all__ = ["FORMAT_VERSION", "capture_training_state", "optimizer_fingerprint", "restore_training_state", "unwrap_model"]


def capture_training_state(trainer: Engine, *, metric: float | None = None) -> dict[str, Any]:
    """The checkpoint payload for ``trainer`` (a ``create_trainer`` engine) now."""
    step = trainer.step
    model = unwrap_model(step.model)
    loader = trainer.state.dataloader
    state = trainer.state
    return {
        "meta": {
            "format_version": FORMAT_VERSION,
            "engine_kit_version": engine_kit.__version__,
            "torch_version": str(torch.__version__),
            "created": time.time(),
            "optimizer_steps": int(state.optimizer_steps),
            "iteration": int(state.iteration),
            "epoch": int(state.epoch),
            "metric": metric,
            "precision": step.precision.name,
            "accumulation_steps": int(step.accumulation_steps),
            # Per-rank data shares depend on it: a resume on another world size sees other batches.
            "world_size": int(idist.get_world_size()),
            "optimizer": optimizer_fingerprint(step.optimizer),
            "stateful_classes": stateful_classes(trainer),
        },
        "model": model.state_dict(),
        "optimizer": step.optimizer.state_dict(),
        "scaler": step.scaler.state_dict(),
        "trainer": dict(trainer.state_dict()),
        "stateful": {name: obj.state_dict() for name, obj in stateful_objects(trainer).items()},
        "data": loader.state_dict() if hasattr(loader, "state_dict") else None,
        "rng": capture_rng_state(),
    }


_STRICT_FIX = (
    "resume with the settings the checkpoint was written with, or start a new run directory. A resume that "
    "only differs in the settings listed as inexact can be accepted knowingly with "
    "CheckpointRotation(..., strict=False) (restore_training_state(..., strict=False)), which then warns listing them."
)


def _numbered(items: list[str]) -> str:
    return "; ".join(f"({i}) {item}" for i, item in enumerate(items, 1))


def _refusal(report: ResumeReport, strict: bool) -> CheckpointMismatchError:
    parts = []
    if report.incompatible:
        parts.append("it cannot be applied: " + _numbered(report.incompatible))
    if report.inexact and strict:
        parts.append("the resume would be inexact: " + _numbered(report.inexact))
    fix = _STRICT_FIX if not report.incompatible else (
        "resume with the model, optimizer and data loader the checkpoint was written with, or start a new run directory"
        + ("; strict=False cannot accept the first kind." if report.inexact else ".")
    )
    return CheckpointMismatchError(
        "the checkpoint does not fit this run, nothing was applied. " + " ".join(parts) + ". To fix: " + fix
    )


def _warn(report: ResumeReport, strict: bool) -> None:
    if report.inexact and not strict:
        warnings.warn("resuming inexactly (strict=False): " + _numbered(report.inexact) + ".", stacklevel=3)
    if report.overridden:
        warnings.warn(
            "the checkpoint's settings replace the live ones: " + _numbered(report.overridden)
            + ". To use other values in a resumed run, set them after the resume (a STARTED handler attached "
            "after CheckpointRotation) or start a new run.",
            stacklevel=3,
        )
    for note in report.notes:
        warnings.warn(f"resuming: {note}.", stacklevel=3)


def restore_training_state(trainer: Engine, payload: dict[str, Any], *, strict: bool = True) -> ResumeReport:
    """Check ``payload`` against ``trainer``, then apply it to everything registered on it.

    Args:
        trainer: a ``create_trainer`` engine, inside ``run`` (its data and max_epochs known).
        payload: what ``capture_training_state`` returned.
        strict: refuse an inexact resume (the default); ``False`` accepts one and warns listing what differs.

    Returns:
        The report of every difference found (empty lists for an exact resume).

    Raises:
        CheckpointMismatchError: listing every difference that refuses the resume; raised before
            anything is applied, so model, optimizer, trainer and loader are untouched.
    """
    report = check_resume(trainer, payload)
    if report.refused(strict):
        raise _refusal(report, strict)
    _warn(report, strict)
    step = trainer.step
    live_stateful = stateful_objects(trainer)
    unwrap_model(step.model).load_state_dict(payload["model"])
    step.optimizer.load_state_dict(payload["optimizer"])
    if payload["scaler"]:
        step.scaler.load_state_dict(payload["scaler"])
    requested_max_epochs = trainer.state.max_epochs
    saved_max_epochs = payload["trainer"].get("max_epochs")
    trainer.load_state_dict(payload["trainer"])
    # The checkpoint's own run length, for scripts that rebuild a length-sized schedule.
    trainer.state.checkpoint_max_epochs = saved_max_epochs
    if requested_max_epochs is not None:
        # The run's own max_epochs wins: resuming may extend (or shorten, down to the saved position) training.
        trainer.state.max_epochs = requested_max_epochs
    for name, obj in live_stateful.items():
        if name in payload["stateful"]:
            obj.load_state_dict(payload["stateful"][name])
    loader = trainer.state.dataloader
    data_inexact = any(item.startswith("data order") for item in report.inexact)
    if payload.get("data") is not None and hasattr(loader, "load_state_dict") and not data_inexact:
        loader.load_state_dict(payload["data"])
    # Last: restoring the objects above may itself draw random numbers.
    restore_rng_state(payload["rng"], cuda=not any("CUDA devices" in item for item in report.inexact))
    return report
