"""Everything a checkpoint holds for an exact resume, and putting it back.

``capture_training_state(trainer)`` gathers the model, optimizer, GradScaler,
trainer counters, every registered stateful object (schedulers, handlers),
the data loader's position, RNG states and metadata. ``restore_training_state``
checks the whole payload against the live objects first and raises
``CheckpointMismatchError`` listing every difference before anything is
applied; RNG states are restored last.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from ignite.engine import Engine

import engine_kit
from engine_kit.errors import CheckpointMismatchError
from engine_kit.rng import capture_rng_state, restore_rng_state
from engine_kit.stateful import stateful_objects

FORMAT_VERSION = 1


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP/DataParallel wrappers, whose keys carry no ``module.`` prefix."""
    return model.module if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) else model


def optimizer_fingerprint(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Class and parameter-group shapes: what must match for optimizer state to fit."""
    return {
        "class": type(optimizer).__name__,
        "groups": [[list(p.shape) for p in group["params"]] for group in optimizer.param_groups],
    }


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
            "optimizer": optimizer_fingerprint(step.optimizer),
        },
        "model": model.state_dict(),
        "optimizer": step.optimizer.state_dict(),
        "scaler": step.scaler.state_dict(),
        "trainer": dict(trainer.state_dict()),
        "stateful": {name: obj.state_dict() for name, obj in stateful_objects(trainer).items()},
        "data": loader.state_dict() if hasattr(loader, "state_dict") else None,
        "rng": capture_rng_state(),
    }


def _model_differences(model: torch.nn.Module, saved: dict[str, Any]) -> list[str]:
    live = model.state_dict()
    problems = []
    missing = [k for k in live if k not in saved]
    unexpected = [k for k in saved if k not in live]
    if missing:
        problems.append(f"model keys missing from the checkpoint: {missing[:10]}")
    if unexpected:
        problems.append(f"unexpected model keys in the checkpoint: {unexpected[:10]}")
    for key in live.keys() & saved.keys():
        saved_value, live_value = saved[key], live[key]
        if isinstance(live_value, torch.Tensor) and (
            not isinstance(saved_value, torch.Tensor) or saved_value.shape != live_value.shape
        ):
            shape = tuple(saved_value.shape) if isinstance(saved_value, torch.Tensor) else type(saved_value).__name__
            problems.append(f"model[{key!r}]: checkpoint {shape} vs live {tuple(live_value.shape)}")
    return problems


def _check_compatible(trainer: Engine, payload: dict[str, Any], strict: bool) -> list[str]:
    """Every difference between ``payload`` and the live objects (empty when it fits)."""
    problems = []
    for key in ("meta", "model", "optimizer", "scaler", "trainer", "stateful", "rng"):
        if key not in payload:
            problems.append(f"the checkpoint has no {key!r} section")
    if problems:
        return problems
    meta = payload["meta"]
    if meta.get("format_version") != FORMAT_VERSION:
        problems.append(
            f"format_version {meta.get('format_version')!r} is not the {FORMAT_VERSION} this engine_kit "
            f"{engine_kit.__version__} reads (written by engine_kit {meta.get('engine_kit_version')!r})"
        )
        return problems
    step = trainer.step
    problems += _model_differences(unwrap_model(step.model), payload["model"])
    live_fp, saved_fp = optimizer_fingerprint(step.optimizer), meta.get("optimizer", {})
    if live_fp != saved_fp:
        problems.append(
            f"optimizer: checkpoint {saved_fp.get('class')} with group shapes {saved_fp.get('groups')} vs live "
            f"{live_fp['class']} with {live_fp['groups']}"
        )
    if step.scaler.is_enabled() and not payload["scaler"] and strict:
        problems.append(
            f"the live run uses fp16 with a GradScaler but the checkpoint (precision "
            f"{meta.get('precision')!r}) has no scaler state"
        )
    live_length, saved_length = trainer.state.epoch_length, payload["trainer"].get("epoch_length")
    if live_length is not None and saved_length is not None and live_length != saved_length:
        problems.append(f"epoch length: checkpoint {saved_length} batches vs live {live_length}")
    return problems


def restore_training_state(trainer: Engine, payload: dict[str, Any], *, strict: bool = True) -> None:
    """Apply ``payload`` to ``trainer`` and everything registered on it.

    Raises:
        CheckpointMismatchError: listing every key, shape or type that does not
            fit; raised before anything is applied, so the live model is untouched.
    """
    problems = _check_compatible(trainer, payload, strict)
    if problems:
        raise CheckpointMismatchError(
            "the checkpoint does not fit this run: " + "; ".join(problems) + ". To fix: resume with the "
            "model, optimizer, precision and data loader the checkpoint was written with, or start a new run directory."
        )
    step = trainer.step
    live_stateful = stateful_objects(trainer)
    saved_stateful = payload["stateful"]
    absent = [name for name in live_stateful if name not in saved_stateful]
    extra = [name for name in saved_stateful if name not in live_stateful]
    if absent or extra:
        warnings.warn(
            f"resuming with a different set of stateful handlers: starting fresh {absent}, "
            f"ignoring saved {extra}.",
            stacklevel=2,
        )
    unwrap_model(step.model).load_state_dict(payload["model"])
    step.optimizer.load_state_dict(payload["optimizer"])
    if payload["scaler"]:
        step.scaler.load_state_dict(payload["scaler"])
    requested_max_epochs = trainer.state.max_epochs
    trainer.load_state_dict(payload["trainer"])
    if requested_max_epochs is not None:
        # The run's own max_epochs wins: resuming may extend (or shorten) training.
        trainer.state.max_epochs = requested_max_epochs
    for name, obj in live_stateful.items():
        if name in saved_stateful:
            obj.load_state_dict(saved_stateful[name])
    loader = trainer.state.dataloader
    if payload.get("data") is not None and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(payload["data"])
    # Last: restoring the objects above may itself draw random numbers.
    restore_rng_state(payload["rng"])
