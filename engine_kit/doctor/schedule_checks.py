"""Does the learning-rate schedule last as long as the run? Checked before the first step."""

from __future__ import annotations

import math
from typing import Any, Iterable

from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, OneCycleLR, SequentialLR

from engine_kit.doctor.findings import DoctorSettings, Finding


def planned_optimizer_steps(epoch_length: int, max_epochs: int, accumulation_steps: int) -> int:
    """Optimizer steps a run of ``max_epochs`` makes (a window closes early at each epoch end).

    >>> planned_optimizer_steps(45, 5, 4)
    60
    """
    return math.ceil(epoch_length / accumulation_steps) * max_epochs


def _problems(scheduler: Any, offset: int, planned: int, slack: float, last: bool) -> list[str]:
    """What is wrong with ``scheduler`` starting at optimizer step ``offset`` of a ``planned``-step run."""
    name = type(scheduler).__name__
    if isinstance(scheduler, SequentialLR):
        children, milestones = scheduler._schedulers, [0] + list(scheduler._milestones)
        found = []
        for i, (child, start) in enumerate(zip(children, milestones)):
            found += _problems(child, offset + start, planned, slack, last and i == len(children) - 1)
        return found
    if isinstance(scheduler, OneCycleLR):
        total = scheduler.total_steps
        if offset + total < planned:
            return [f"OneCycleLR has total_steps={total} but the run makes {planned} optimizer steps: "
                    f"it raises an error at step {offset + total + 1}"]
        if offset + total > slack * planned:
            return [f"OneCycleLR has total_steps={total} but the run makes {planned} optimizer steps: "
                    f"it stops at {planned / (offset + total):.0%} of the cycle, before the learning rate anneals"]
        return []
    if isinstance(scheduler, LinearLR) and scheduler.start_factor < scheduler.end_factor:
        end = offset + scheduler.total_iters
        if end >= planned:
            return [f"the warmup (LinearLR, total_iters={scheduler.total_iters}) ends at step {end}, "
                    f"not before the run's {planned} optimizer steps: the run never trains at the full rate"]
        return []
    if isinstance(scheduler, CosineAnnealingLR) and last and offset < planned:
        end = offset + scheduler.T_max
        if end < planned:
            return [f"CosineAnnealingLR reaches its minimum at step {end} (T_max={scheduler.T_max}) and climbs "
                    f"back up for the last {planned - end} of the run's {planned} optimizer steps"]
        if end > slack * planned:
            return [f"CosineAnnealingLR has T_max={scheduler.T_max} but the run makes {planned} optimizer steps: "
                    f"it stops at {(planned - offset) / scheduler.T_max:.0%} of the decay"]
    return []


def check_schedule(schedulers: Iterable[Any], planned: int, settings: DoctorSettings) -> list[Finding]:
    """Schedules shorter than the run, far longer than it, or whose warmup outlasts it.

    >>> import torch
    >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    >>> sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=30)
    >>> check_schedule([sched], 30, DoctorSettings()), [f.code for f in check_schedule([sched], 60, DoctorSettings())]
    ([], ['schedule-length'])
    """
    problems = []
    for scheduler in schedulers:
        problems += _problems(scheduler, 0, planned, settings.schedule_slack, True)
    if not problems:
        return []
    return [Finding(
        "schedule-length",
        "; ".join(problems) + ".",
        f"size the schedule from the run: total_steps = handlers.onecycle_total_steps(loader, epochs, "
        f"accumulation_steps) (here {planned}), a warmup of a few percent of it, and a cosine T_max of "
        "the steps left after the warmup.",
    )]
