"""A finding: one training mistake, its evidence in numbers and the fix; the thresholds that decide it."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

from engine_kit.errors import fix_message

# Every finding the doctor can report, by code, with the mistake it names.
CATALOGUE: dict[str, str] = {
    "probabilities-into-logits-loss": "probabilities into a loss that expects logits",
    "logits-into-probabilities-loss": "logits into a loss that expects probabilities",
    "validation-shuffled": "validation loader shuffled",
    "validation-overlap": "validation data overlapping training data",
    "batchnorm-accumulation": "BatchNorm with gradient accumulation",
    "no-gradient": "parameters that never receive a gradient",
    "params-not-optimized": "trainable parameters the optimizer does not own",
    "all-frozen": "no trainable parameter",
    "loss-not-falling": "loss flat or rising over the first optimizer steps",
    "grad-norm-rising": "gradient norm rising steadily",
    "clipping-share": "clipping on too many steady-state steps",
    "non-finite": "NaN/inf loss or gradient norm",
    "schedule-length": "learning-rate schedule length does not match the run",
    "overfitting": "validation loss rising while training loss falls",
    "data-starvation": "waiting for batches",
    "batch-device": "batches on the wrong device",
    "eval-mode": "model left in eval mode during training",
    "weight-decay-on-norms": "weight decay on biases and normalization parameters",
    "no-best-checkpoint": "no best checkpoint kept while validation runs",
}


@dataclass(frozen=True)
class Finding:
    """One mistake the doctor found.

    Attributes:
        code: a key of ``CATALOGUE``, stable across versions (tests and tools match on it).
        evidence: what was measured, with the numbers.
        fix: what to change.
        step: the optimizer step the evidence refers to (0: before the first step).

    >>> finding = Finding("all-frozen", "0 of 4 parameters require grad.", "unfreeze the layers to train.")
    >>> finding.line()
    'doctor [all-frozen]: 0 of 4 parameters require grad. To fix: unfreeze the layers to train.'
    >>> Finding.from_dict(finding.to_dict()) == finding
    True
    """

    code: str
    evidence: str
    fix: str
    step: int = 0

    def __post_init__(self) -> None:
        if self.code not in CATALOGUE:
            raise ValueError(
                fix_message(f"code={self.code!r} is not a known finding.", f"use one of {sorted(CATALOGUE)}.")
            )

    def line(self) -> str:
        """The one console line: code, evidence, fix."""
        return f"doctor [{self.code}]: {fix_message(self.evidence, self.fix)}"

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "mistake": CATALOGUE[self.code], "evidence": self.evidence, "fix": self.fix,
                "step": self.step}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        return cls(str(data["code"]), str(data["evidence"]), str(data["fix"]), int(data.get("step", 0)))


@dataclass(frozen=True)
class DoctorSettings:
    """The thresholds behind each finding; the defaults suit real runs.

    Attributes:
        first_batches: micro-batches whose loss inputs and batch devices are inspected.
        timing_iterations: iterations (after the first two) timed for data starvation.
        data_wait_share: share of iteration time spent waiting for batches above which loading starves the step.
        min_data_wait_s: and the mean wait per batch must be at least this long (tiny models wait microseconds).
        loss_window: the first optimizer steps whose loss must fall.
        min_trend_steps: fewest finite steps a trend is judged on.
        loss_drop: the loss must drop by at least this share between the window's first and last quarter.
        steady_after: share of the run's optimizer steps that is warm-up, not steady state.
        min_steady_steps: fewest steady-state steps the clipping share and norm trend are judged on.
        clip_share: largest acceptable share of clipped steady-state steps.
        norm_growth: last-quarter over first-quarter median gradient norm that counts as rising.
        overfit_validations: consecutive rises of the validation loss that count as overfitting.
        schedule_slack: a schedule may be this many times longer than the run before it is "far above".
        hash_val_items, hash_train_items: items hashed per side for the identical-sample overlap check.
    """

    first_batches: int = 3
    timing_iterations: int = 32
    data_wait_share: float = 0.25
    min_data_wait_s: float = 0.001
    loss_window: int = 50
    min_trend_steps: int = 10
    loss_drop: float = 0.02
    steady_after: float = 0.2
    min_steady_steps: int = 20
    clip_share: float = 0.05
    norm_growth: float = 3.0
    overfit_validations: int = 3
    schedule_slack: float = 1.25
    hash_val_items: int = 256
    hash_train_items: int = 4096

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
                raise ValueError(
                    fix_message(f"DoctorSettings.{field.name}={value!r} is not a positive number.",
                                f"pass a positive {field.type}, e.g. the default {field.default}.")
                )


def add_new(findings: list[Finding], new: list[Finding]) -> list[Finding]:
    """Append to ``findings`` the ones whose code is not there yet; return those appended.

    >>> found = [Finding("all-frozen", "a.", "b.")]
    >>> [f.code for f in add_new(found, [Finding("all-frozen", "c.", "d."), Finding("eval-mode", "e.", "f.")])]
    ['eval-mode']
    """
    known = {finding.code for finding in findings}
    added = []
    for finding in new:
        if finding.code not in known:
            known.add(finding.code)
            findings.append(finding)
            added.append(finding)
    return added
