"""Checks at each validation: overfitting, and whether the best model is kept at all."""

from __future__ import annotations

import bisect
import math
from typing import Any, Sequence

from engine_kit.doctor.findings import DoctorSettings, Finding


def loss_key(history: Sequence[dict[str, Any]]) -> str | None:
    """The validation metric that is a loss: ``loss``, else the first name containing "loss".

    >>> loss_key([{"validation": 1, "accuracy": 0.5, "nll_loss": 1.2}])
    'nll_loss'
    """
    keys = [k for entry in history for k in entry]
    if "loss" in keys:
        return "loss"
    return next((k for k in keys if "loss" in k.lower()), None)


def _interval_means(rows: Sequence[dict[str, Any]], bounds: list[int]) -> list[float | None]:
    """Mean finite training loss of the steps in each interval ``(bounds[i - 1], bounds[i]]`` (one pass)."""
    sums = [0.0] * len(bounds)
    counts = [0] * len(bounds)
    for row in rows:
        loss = row.get("loss")
        if row.get("skipped") or not isinstance(loss, (int, float)) or not math.isfinite(loss):
            continue
        i = bisect.bisect_left(bounds, row["step"])
        if i < len(bounds):
            sums[i] += loss
            counts[i] += 1
    return [total / count if count else None for total, count in zip(sums, counts)]


def check_overfitting(history: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], settings: DoctorSettings,
                      best_checkpoint: str | None = None) -> list[Finding]:
    """Validation loss rising ``overfit_validations`` times in a row while the training loss falls.

    ``history``: the trainer's ``val_history`` (``optimizer_steps`` and metrics per
    validation); ``rows``: the step log, for the training loss between validations.

    >>> history = [{"validation": i + 1, "optimizer_steps": 10 * (i + 1), "loss": v}
    ...            for i, v in enumerate([1.0, 0.8, 0.9, 1.0, 1.1])]
    >>> rows = [{"step": s, "loss": 2.0 / s} for s in range(1, 51)]
    >>> check_overfitting(history, rows, DoctorSettings())[0].evidence.split(" (")[0]
    'validation loss rose 3 times in a row'
    """
    key = loss_key(history)
    k = settings.overfit_validations
    if key is None or len(history) < k + 1:
        return []
    bounds = [int(entry.get("optimizer_steps") or 0) for entry in history]
    points = list(zip(history, (entry.get(key) for entry in history), _interval_means(rows, bounds)))
    for end in range(k, len(points)):
        span = points[end - k:end + 1]
        values = [value for _, value, _ in span]
        train = [loss for _, _, loss in span]
        if any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in values) or None in train:
            continue
        if all(b > a for a, b in zip(values, values[1:])) and train[-1] < train[0]:
            seen = [(entry, value) for entry, value, _ in points[:end + 1]
                    if isinstance(value, (int, float)) and math.isfinite(value)]
            best_entry, best_value = min(seen, key=lambda pair: pair[1])
            best = (f"the best checkpoint kept, {best_checkpoint}" if best_checkpoint else
                    f"the model of validation {best_entry.get('validation')} (step {best_entry.get('optimizer_steps')}, "
                    f"validation {key} {best_value:.4g})")
            first, last = span[0][0], span[-1][0]
            return [Finding(
                "overfitting",
                f"validation {key} rose {k} times in a row ({values[0]:.4g} at validation {first.get('validation')} "
                f"to {values[-1]:.4g} at validation {last.get('validation')}) while the training loss fell "
                f"({train[0]:.4g} to {train[-1]:.4g} per-interval mean): the model is memorizing the training set.",
                f"use {best}; stop earlier (EarlyStopping(metric={key!r}, mode='min', patience={k})), "
                "or regularize: more data or augmentation, weight decay, dropout, a smaller model.",
                int(last.get("optimizer_steps") or 0),
            )]
    return []


def check_best_kept(keep_best: int, validates: bool, metric: str | None) -> list[Finding]:
    """Validation runs but no best checkpoint is kept: the run would ship its last epoch.

    >>> [f.code for f in check_best_kept(0, True, None)], check_best_kept(1, True, "accuracy")
    (['no-best-checkpoint'], [])
    """
    if keep_best > 0 or not validates:
        return []
    return [Finding(
        "no-best-checkpoint",
        "validation runs but CheckpointRotation keeps no best checkpoint (keep_best=0): the run keeps only the "
        "last checkpoints, so the model it ships is the last one, not the best validated one.",
        f"pass keep_best=1 and metric={metric or 'accuracy'!r} (mode='max', or the loss with mode='min') "
        "to CheckpointRotation (attach_standard: keep_best=1).",
    )]
