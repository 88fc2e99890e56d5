"""Every check a resume runs before it applies anything.

``check_resume(trainer, payload)`` compares a checkpoint with the live run
and sorts each difference into one of four kinds:

* **incompatible**: the checkpoint cannot be applied at all (another
  architecture, optimizer class, epoch length, format, a run already past
  ``max_epochs``). Always refused.
* **inexact**: it can be applied, but the resumed run would not continue the
  way the original run would have (precision, accumulation steps, data order:
  seed, batch size, shuffle, dataset, world size; schedulers added, removed or
  of another class; fp16 without saved scaler state). Refused unless the
  caller opts in with ``strict=False``, which then warns listing them.
* **overridden**: a live setting the checkpoint replaces (the learning rate
  and the other optimizer hyperparameters in ``param_groups``). Warned.
* **notes**: what differs without being refusable (a loader that cannot
  resume exactly, handlers added or removed whose state starts fresh). Warned.

Nothing here changes the trainer: the caller applies the payload only when
the report allows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine

import engine_kit
from engine_kit.stateful import stateful_objects

FORMAT_VERSION = 1
SECTIONS = ("meta", "model", "optimizer", "scaler", "trainer", "stateful", "rng")


@dataclass
class ResumeReport:
    """The differences between a checkpoint and the live run, by kind (see the module docstring)."""

    incompatible: list[str] = field(default_factory=list)
    inexact: list[str] = field(default_factory=list)
    overridden: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def refused(self, strict: bool) -> bool:
        """True when the resume must not go ahead."""
        return bool(self.incompatible or (strict and self.inexact))


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP/DataParallel wrappers, whose keys carry no ``module.`` prefix."""
    return model.module if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) else model


def optimizer_fingerprint(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Class and parameter-group shapes: what must match for optimizer state to fit."""
    return {
        "class": type(optimizer).__name__,
        "groups": [[list(p.shape) for p in group["params"]] for group in optimizer.param_groups],
    }


def is_scheduler(obj: Any) -> bool:
    """An LR scheduler (ReduceLROnPlateau included): its absence or presence changes the run's numbers."""
    return isinstance(obj, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau))


def stateful_classes(trainer: Engine) -> dict[str, str]:
    """``{registered name: class name}`` of everything a checkpoint of ``trainer`` captures."""
    return {name: type(obj).__name__ for name, obj in stateful_objects(trainer).items()}


def check_resume(trainer: Engine, payload: Any) -> ResumeReport:
    """Compare ``payload`` with the live ``trainer``; change nothing.

    >>> import torch
    >>> from engine_kit import create_trainer
    >>> model = torch.nn.Linear(2, 1)
    >>> trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.mse_loss)
    >>> check_resume(trainer, {"meta": {}}).incompatible[0]
    "the checkpoint has no 'model' section"
    """
    report = ResumeReport()
    if not isinstance(payload, dict):
        report.incompatible.append(f"the checkpoint holds a {type(payload).__name__}, not a training state")
        return report
    report.incompatible += [f"the checkpoint has no {key!r} section" for key in SECTIONS if key not in payload]
    if report.incompatible:
        return report
    meta = payload["meta"]
    if meta.get("format_version") != FORMAT_VERSION:
        report.incompatible.append(
            f"format_version {meta.get('format_version')!r} is not the {FORMAT_VERSION} this engine_kit "
            f"{engine_kit.__version__} reads (written by engine_kit {meta.get('engine_kit_version')!r})"
        )
        return report
    _check_model(trainer, payload, report)
    _check_optimizer(trainer, payload, report)
    _check_progress(trainer, payload, report)
    _check_step_settings(trainer, payload, report)
    _check_stateful(trainer, payload, report)
    _check_data(trainer, payload, report)
    _check_rng(payload, report)
    return report


def _check_model(trainer: Engine, payload: dict[str, Any], report: ResumeReport) -> None:
    live, saved = unwrap_model(trainer.step.model).state_dict(), payload["model"]
    missing = [k for k in live if k not in saved]
    unexpected = [k for k in saved if k not in live]
    if missing:
        report.incompatible.append(f"model keys missing from the checkpoint: {missing[:10]}")
    if unexpected:
        report.incompatible.append(f"unexpected model keys in the checkpoint: {unexpected[:10]}")
    for key in live.keys() & saved.keys():
        saved_value, live_value = saved[key], live[key]
        if isinstance(live_value, torch.Tensor) and (
            not isinstance(saved_value, torch.Tensor) or saved_value.shape != live_value.shape
        ):
            shape = tuple(saved_value.shape) if isinstance(saved_value, torch.Tensor) else type(saved_value).__name__
            report.incompatible.append(f"model[{key!r}]: checkpoint {shape} vs live {tuple(live_value.shape)}")


def _hyperparameters(group: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """The settings of a param group that the user chose, not those a scheduler moves step by step."""
    driven = {"params"}
    if "initial_lr" in group and "initial_lr" in other:
        driven.add("lr")  # a scheduler's: compare the starting value instead
    if "base_momentum" in group or "base_momentum" in other:
        driven |= {"betas", "momentum"}  # cycled by OneCycleLR / CyclicLR
    return {k: v for k, v in group.items() if k not in driven and isinstance(v, (int, float, bool, tuple, list))}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b or (isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and list(a) == list(b))


def _check_optimizer(trainer: Engine, payload: dict[str, Any], report: ResumeReport) -> None:
    optimizer = trainer.step.optimizer
    live_fp, saved_fp = optimizer_fingerprint(optimizer), payload["meta"].get("optimizer", {})
    if live_fp != saved_fp:
        report.incompatible.append(
            f"optimizer: checkpoint {saved_fp.get('class')} with group shapes {saved_fp.get('groups')} vs live "
            f"{live_fp['class']} with {live_fp['groups']}"
        )
        return
    saved_groups = payload["optimizer"].get("param_groups", []) if isinstance(payload["optimizer"], dict) else []
    for index, (live, saved) in enumerate(zip(optimizer.param_groups, saved_groups)):
        live_h, saved_h = _hyperparameters(live, saved), _hyperparameters(saved, live)
        for key in sorted(live_h.keys() & saved_h.keys()):
            if not _same(live_h[key], saved_h[key]):
                report.overridden.append(
                    f"optimizer param_groups[{index}][{key!r}]: the checkpoint's {saved_h[key]!r} replaces the live {live_h[key]!r}"
                )


def _check_progress(trainer: Engine, payload: dict[str, Any], report: ResumeReport) -> None:
    state, saved = trainer.state, payload["trainer"]
    missing = [k for k in trainer.state_dict_user_keys if k not in saved]
    if missing:
        report.incompatible.append(f"the trainer state in the checkpoint lacks {missing}")
    live_length, saved_length = state.epoch_length, saved.get("epoch_length")
    if live_length is not None and saved_length is not None and live_length != saved_length:
        report.incompatible.append(f"epoch length: checkpoint {saved_length} batches vs live {live_length}")
        return
    length = live_length or saved_length
    iteration = saved.get("iteration")
    if length and iteration is None and saved.get("epoch") is not None:
        iteration = saved["epoch"] * length
    if length and iteration is not None and state.max_epochs is not None and iteration > state.max_epochs * length:
        report.incompatible.append(
            f"the checkpoint is at iteration {iteration} (epoch {math.ceil(iteration / length)}), past the live "
            f"max_epochs={state.max_epochs} ({state.max_epochs * length} iterations); pass max_epochs >= "
            f"{math.ceil(iteration / length)} to continue it"
        )


def _check_step_settings(trainer: Engine, payload: dict[str, Any], report: ResumeReport) -> None:
    step, meta = trainer.step, payload["meta"]
    saved_precision = meta.get("precision")
    if saved_precision is not None and saved_precision != step.precision.name:
        report.inexact.append(f"precision: checkpoint {saved_precision} vs live {step.precision.name}")
    if step.scaler.is_enabled() and not payload["scaler"]:
        report.inexact.append(
            f"the live run uses fp16 with a GradScaler but the checkpoint (precision {saved_precision!r}) has no "
            "scaler state; the loss scale would start fresh"
        )
    saved_accumulation = meta.get("accumulation_steps")
    if saved_accumulation is not None and saved_accumulation != step.accumulation_steps:
        report.inexact.append(f"accumulation_steps: checkpoint {saved_accumulation} vs live {step.accumulation_steps}")
    saved_world = meta.get("world_size")
    if saved_world is not None and saved_world != idist.get_world_size():
        report.inexact.append(f"world size: checkpoint {saved_world} processes vs live {idist.get_world_size()}")


def _check_stateful(trainer: Engine, payload: dict[str, Any], report: ResumeReport) -> None:
    live = stateful_objects(trainer)
    saved_names = set(payload["stateful"])
    saved_classes = payload["meta"].get("stateful_classes", {})
    for name, obj in live.items():
        kind = "scheduler" if is_scheduler(obj) else "handler"
        if name not in saved_names:
            text = f"{kind} {name!r} ({type(obj).__name__}) is not in the checkpoint: it starts fresh"
            (report.inexact if kind == "scheduler" else report.notes).append(text)
        elif name in saved_classes and saved_classes[name] != type(obj).__name__:
            report.inexact.append(f"{name!r}: checkpoint {saved_classes[name]} vs live {type(obj).__name__}")
    for name in sorted(saved_names - set(live)):
        saved_class = saved_classes.get(name, "?")
        looks_like_scheduler = "LR" in saved_class or "Scheduler" in saved_class or name.startswith("scheduler")
        text = f"{name!r} ({saved_class}) is in the checkpoint but not in the live run: its saved state is ignored"
        (report.inexact if looks_like_scheduler else report.notes).append(text)


def _check_data(trainer: Engine, payload: dict[str, Any], report: ResumeReport) -> None:
    loader, saved = trainer.state.dataloader, payload.get("data")
    resumable = hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")
    if saved is None and not resumable:
        if loader is not None and not isinstance(loader, (list, tuple)):  # a fixed list replays exactly
            report.notes.append(
                f"the data loader ({type(loader).__name__}) cannot resume exactly: the batches after the resume are "
                "not those the uninterrupted run would have seen (the consumed part of the epoch is re-read and "
                "skipped, the order and augmentation follow the restored global RNG); use "
                "engine_kit.ResumableLoader for an exact resume"
            )
        return
    if saved is None:
        report.inexact.append(
            f"data order: the checkpoint was written with a loader that has no saved order, the live one is a "
            f"{type(loader).__name__}: the batches of the resumed epoch differ from the original run's"
        )
        return
    if not resumable:
        report.notes.append(
            f"the data loader ({type(loader).__name__}) cannot resume exactly, although the checkpoint holds an "
            "exact data position: the batches after the resume differ from the uninterrupted run's; build the "
            "loader as engine_kit.ResumableLoader with the settings of the original run"
        )
        return
    differences = getattr(loader, "state_differences", None)
    if differences is not None:
        report.inexact += [f"data order: {d}" for d in differences(saved)]


def _check_rng(payload: dict[str, Any], report: ResumeReport) -> None:
    rng = payload["rng"]
    cuda_states = (rng.get("cuda") or []) if isinstance(rng, dict) else []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) != torch.cuda.device_count():
        report.inexact.append(
            f"the checkpoint holds RNG states for {len(cuda_states)} CUDA devices, this machine has "
            f"{torch.cuda.device_count()}"
        )
