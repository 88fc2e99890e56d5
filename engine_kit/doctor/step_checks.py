"""Checks over the step log: one row per optimizer step, as ``StepLog`` writes it (values already on the host).

Rows are dicts with ``step``, ``loss``, ``grad_norm``, ``clipped`` and
``skipped``; fp16 steps that GradScaler skipped are left out of every check.
"""

from __future__ import annotations

import itertools
import math
import statistics
from typing import Any, Sequence

from engine_kit.doctor.findings import DoctorSettings, Finding

Row = dict[str, Any]


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(value)


def stepped(rows: Sequence[Row]) -> list[Row]:
    """The rows of optimizer steps that happened (not fp16-skipped)."""
    return [row for row in rows if not row.get("skipped")]


def first_non_finite(rows: Sequence[Row]) -> Row | None:
    """The first stepped row whose loss or gradient norm is NaN or infinite.

    >>> first_non_finite([{"step": 1, "loss": 1.0, "grad_norm": 2.0}, {"step": 2, "loss": float("nan")}])["step"]
    2
    """
    isfinite = math.isfinite  # a plain loop: this runs over every step of the log
    for row in rows:
        loss, norm = row.get("loss"), row.get("grad_norm")
        if not row.get("skipped") and ((loss is not None and not isfinite(loss))
                                       or (norm is not None and not isfinite(norm))):
            return row
    return None


def check_non_finite(rows: Sequence[Row], bad_groups: list[int] | None = None) -> list[Finding]:
    """The first step whose loss or gradient norm is not finite, which of the two went first, and where.

    ``bad_groups``: the optimizer's param groups holding non-finite values now, when the model is at hand.

    >>> rows = [{"step": 1, "loss": 0.5, "grad_norm": 1.0, "lr": 0.1}, {"step": 2, "loss": 0.7, "grad_norm": float("inf")}]
    >>> check_non_finite(rows)[0].evidence.split(":")[0]
    'step 2 is the first with a non-finite value'
    """
    return _non_finite(rows, first_non_finite(rows), bad_groups)


def _non_finite(rows: Sequence[Row], row: Row | None, bad_groups: list[int] | None) -> list[Finding]:
    # check_non_finite once the first non-finite row (or None) is known.
    if row is None:
        return []
    loss, norm = row.get("loss"), row.get("grad_norm")
    before = [r for r in stepped(rows) if r["step"] < row["step"]]
    last = f"; the step before had loss {before[-1]['loss']:.4g}, grad norm {before[-1].get('grad_norm')}" if before else ""
    if not _finite(loss):
        first = f"the loss ({loss}) went non-finite first, the gradient norm was {norm}"
        fix = ("look for log(0), division by zero or exp overflow in the loss and the last layer (clamp, add an "
               "epsilon, use the fused *_with_logits losses), and check the batch of that step for NaN inputs.")
    else:
        first = f"the loss was finite ({loss:.4g}) but the gradient norm was {norm}: an overflow in the backward pass"
        fix = ("lower the learning rate or add clipping (max_grad_norm), use bf16 instead of fp16, and look for "
               "operations with unbounded gradients (sqrt at 0, pow, norms of zero vectors).")
    groups = ""
    if bad_groups:
        groups = f"; param groups holding non-finite values now: {', '.join(map(str, bad_groups))}"
    lr = f" at lr {row['lr']:.3g}" if _finite(row.get("lr")) else ""
    return [Finding("non-finite", f"step {row['step']} is the first with a non-finite value{lr}: {first}{last}{groups}.",
                    fix, int(row["step"]))]


def _finite_prefix(rows: Sequence[Row]) -> list[Row]:
    """The stepped rows before the first non-finite one."""
    return _stepped_before(rows, first_non_finite(rows))


def _stepped_before(rows: Sequence[Row], bad: Row | None) -> list[Row]:
    # The stepped rows before ``bad`` (all of them when it is None).
    if bad is None:
        return stepped(rows)
    return [r for r in stepped(rows) if r["step"] < bad["step"]]


def check_loss_trend(rows: Sequence[Row], settings: DoctorSettings, *, final: bool) -> list[Finding]:
    """The loss over the first ``loss_window`` optimizer steps: it must fall by ``loss_drop``.

    Judged once the window is complete, or at the end of a shorter run (``final``):
    the median of its last quarter against the median of its first quarter.

    >>> flat = [{"step": s, "loss": 1.0} for s in range(1, 13)]
    >>> check_loss_trend(flat, DoctorSettings(), final=False), check_loss_trend(flat, DoctorSettings(), final=True)[0].code
    ([], 'loss-not-falling')
    """
    return _loss_trend(_finite_prefix(rows), settings, final=final)


def _loss_trend(clean: Sequence[Row], settings: DoctorSettings, *, final: bool) -> list[Finding]:
    # check_loss_trend over rows already cut at the first non-finite one.
    window = list(itertools.islice((r for r in clean if _finite(r.get("loss"))), settings.loss_window))
    if len(window) < settings.min_trend_steps or (len(window) < settings.loss_window and not final):
        return []
    quarter = max(1, len(window) // 4)
    start = statistics.median(r["loss"] for r in window[:quarter])
    end = statistics.median(r["loss"] for r in window[-quarter:])
    if end <= start - settings.loss_drop * abs(start):
        return []
    trend = "rose" if end > start + settings.loss_drop * abs(start) else "stayed flat"
    span = f"steps {window[0]['step']}-{window[-1]['step']}"
    return [Finding(
        "loss-not-falling",
        f"the training loss {trend} over the first {len(window)} optimizer steps ({span}): median {start:.4g} "
        f"over the first {quarter} steps, {end:.4g} over the last {quarter}.",
        "check the learning rate (too low: flat; too high: rising; try a short range test), that the optimizer "
        "holds the model's parameters, that labels match inputs, and that the loss is minimized, not maximized.",
        int(window[-1]["step"]),
    )]


def steady_state(rows: Sequence[Row], planned: int, settings: DoctorSettings) -> tuple[list[Row], int]:
    """The finite rows after warm-up (the first ``steady_after`` share of the ``planned`` steps), and where it starts.

    >>> rows = [{"step": s, "loss": 1.0, "grad_norm": 1.0} for s in range(1, 11)]
    >>> [r["step"] for r in steady_state(rows, 10, DoctorSettings())[0]]
    [3, 4, 5, 6, 7, 8, 9, 10]
    """
    return _steady_state(_finite_prefix(rows), planned, settings)


def _steady_state(clean: Sequence[Row], planned: int, settings: DoctorSettings) -> tuple[list[Row], int]:
    # steady_state over rows already cut at the first non-finite one.
    warmup = int(settings.steady_after * max(planned, 1))
    isfinite = math.isfinite  # this runs over every step of the log
    steady = [r for r in clean if r["step"] > warmup and (norm := r.get("grad_norm")) is not None and isfinite(norm)]
    return steady, warmup + 1


def _describe_steady(steady: Sequence[Row], first: int, planned: int, settings: DoctorSettings) -> str:
    return (f"steady state taken as steps {first}-{steady[-1]['step']}, after the first "
            f"{settings.steady_after:.0%} of the {planned}-step run")


def check_clipping(rows: Sequence[Row], max_grad_norm: float | None, planned: int,
                   settings: DoctorSettings) -> list[Finding]:
    """Clipping on more than ``clip_share`` of the steady-state steps: the threshold shapes every update.

    >>> rows = [{"step": s, "grad_norm": 2.0 + s / 100, "clipped": True} for s in range(1, 41)]
    >>> check_clipping(rows, 1.0, 40, DoctorSettings())[0].evidence.split(" (")[0]
    '100% of steady-state optimizer steps were clipped at max_grad_norm=1'
    """
    if not _clips(rows, max_grad_norm):
        return []  # no clipping, or a log that cannot say
    return _clipping(steady_state(rows, planned, settings), max_grad_norm, planned, settings)


def _clips(rows: Sequence[Row], max_grad_norm: float | None) -> bool:
    """Whether the run clips: a threshold is set, or the log marks clipped steps."""
    return max_grad_norm is not None or any(r.get("clipped") for r in rows)


def _clipping(steady_and_first: tuple[list[Row], int], max_grad_norm: float | None, planned: int,
              settings: DoctorSettings) -> list[Finding]:
    # check_clipping once the run clips: over the steady state and the step it starts at.
    steady, first = steady_and_first
    if len(steady) < settings.min_steady_steps:
        return []
    if max_grad_norm is None:
        clipped = sum(1 for r in steady if r.get("clipped"))
    else:
        clipped = sum(1 for r in steady if r.get("clipped") or r["grad_norm"] > max_grad_norm)
    share = clipped / len(steady)
    if share <= settings.clip_share:
        return []
    norms = sorted(r["grad_norm"] for r in steady)
    # The threshold that would clip about half the allowed share of these steps.
    quantile = norms[min(len(norms) - 1, int(len(norms) * (1 - settings.clip_share / 2)))]
    suggestion = float(f"{quantile * 1.1:.2g}")
    return [Finding(
        "clipping-share",
        f"{share:.0%} of steady-state optimizer steps were clipped at "
        f"{'the clip threshold' if max_grad_norm is None else f'max_grad_norm={max_grad_norm:g}'} "
        f"({clipped} of {len(steady)}; {_describe_steady(steady, first, planned, settings)}); "
        f"median pre-clip norm {statistics.median(norms):.3g}, above the {settings.clip_share:.0%} limit: "
        "clipping rescales nearly every update instead of catching rare spikes.",
        f"raise max_grad_norm to about {suggestion:g} (above {1 - settings.clip_share / 2:.1%} of these norms), "
        "or lower the learning rate if the norms are large because training is unstable.",
        int(steady[-1]["step"]),
    )]


def check_grad_norm_trend(rows: Sequence[Row], planned: int, settings: DoctorSettings) -> list[Finding]:
    """The steady-state gradient norm rising quarter after quarter, by ``norm_growth`` or more overall.

    >>> rows = [{"step": s, "grad_norm": 1.1 ** s} for s in range(1, 41)]
    >>> check_grad_norm_trend(rows, 40, DoctorSettings())[0].code
    'grad-norm-rising'
    """
    return _grad_norm_trend(steady_state(rows, planned, settings), planned, settings)


def _grad_norm_trend(steady_and_first: tuple[list[Row], int], planned: int, settings: DoctorSettings) -> list[Finding]:
    # check_grad_norm_trend over the steady state and the step it starts at.
    steady, first = steady_and_first
    if len(steady) < settings.min_steady_steps:
        return []
    size = len(steady) // 4
    medians = [statistics.median(r["grad_norm"] for r in steady[i * size:(i + 1) * size]) for i in range(4)]
    rising = all(b > a for a, b in zip(medians, medians[1:]))
    if not rising or medians[-1] < settings.norm_growth * medians[0]:
        return []
    quarters = ", ".join(f"{m:.3g}" for m in medians)
    return [Finding(
        "grad-norm-rising",
        f"the pre-clip gradient norm rose in every quarter of the steady state (medians {quarters}: "
        f"x{medians[-1] / medians[0]:.1f}; {_describe_steady(steady, first, planned, settings)}): "
        "training is drifting towards instability.",
        "lower the learning rate (or its peak), add warmup, check for a loss that can grow without bound, "
        "and clip with max_grad_norm as a safety net.",
        int(steady[-1]["step"]),
    )]


def check_steps(rows: Sequence[Row], max_grad_norm: float | None, planned: int, settings: DoctorSettings,
                *, final: bool, bad_groups: list[int] | None = None) -> list[Finding]:
    """Every step-log check: non-finite values, loss trend, clipping share, gradient-norm trend."""
    return check_steps_after(rows, first_non_finite(rows), max_grad_norm, planned, settings, final=final, bad_groups=bad_groups)


def check_steps_after(rows: Sequence[Row], bad: Row | None, max_grad_norm: float | None, planned: int,
                      settings: DoctorSettings, *, final: bool, bad_groups: list[int] | None = None) -> list[Finding]:
    """``check_steps`` for a caller that already knows ``first_non_finite(rows)`` (``bad``): rows are scanned once."""
    findings = _non_finite(rows, bad, bad_groups)
    # The finite prefix and the steady state once here, shared by the checks below.
    clean = _stepped_before(rows, bad)
    steady = _steady_state(clean, planned, settings)
    findings += _loss_trend(clean, settings, final=final)
    if _clips(clean, max_grad_norm):
        findings += _clipping(steady, max_grad_norm, planned, settings)
    return findings + _grad_norm_trend(steady, planned, settings)
