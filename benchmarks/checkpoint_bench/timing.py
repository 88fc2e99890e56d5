"""Time single saves, and training loops with and without saves, interleaved across rows.

Isolated saves: each repeat saves once per row (in a rotating order), timing
when ``save()`` returns and when the write is durable (``drain()``).

Training loops: an engine_kit trainer (``create_trainer``) over the same
pre-built batches; per repeat one loop without saves (the baseline) and one
per row with a save every ``every`` steps, in a rotating order. The stall per
save is (loop with saves − the same repeat's baseline) / saves, median over
repeats. Each step is timed (synchronized on CUDA) and classed by whether a
write was in flight when it started (the saver said so at the end of the
previous step); the step that saved and the first step are left out of both
classes. From the same step times comes a second estimate of the stall,
inside one run (:func:`in_run_stall`), which load drifting between the runs
of a repeat cannot bias.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events

from engine_kit import create_trainer

from .savers import make_saver, saver_directory
from .workload import sync

BASELINE = "no saves"
_START = time.perf_counter()


def progress(message: str) -> None:
    """One line on stderr with the seconds since import, so a long run shows where it is."""
    print(f"[{time.perf_counter() - _START:6.0f} s] {message}", file=sys.stderr, flush=True)


def rotated(names: list[str], repeat: int) -> list[str]:
    """``names`` starting at a different one each repeat, so load drifts hit every row alike.

    >>> rotated(["a", "b", "c"], 1)
    ['b', 'c', 'a']
    """
    shift = repeat % len(names)
    return names[shift:] + names[:shift]


def time_isolated(names: list[str], model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: list,
                  root: Path, repeats: int, device: torch.device) -> dict[str, dict[str, list[float]]]:
    """Per row, every repeat's seconds until ``save()`` returned and until its write was durable."""
    samples: dict[str, dict[str, list[float]]] = {name: {"returns_s": [], "durable_s": []} for name in names}
    savers = {}
    with saver_directory(root, "isolated") as directory:
        for index, name in enumerate(names):
            saver = make_saver(name, model, optimizer, directory / f"row{index}", device)
            if hasattr(saver, "standalone"):
                saver.standalone(model, optimizer, data, device)
            else:
                saver.save()  # warm-up: first-touch allocations, pinned buffers, imports
                saver.drain()
            savers[name] = saver
        try:
            for repeat in range(repeats):
                progress(f"isolated saves, repeat {repeat + 1}/{repeats}")
                for name in rotated(names, repeat):
                    saver = savers[name]
                    gc.collect()
                    sync(device)
                    start = time.perf_counter()
                    saver.save()
                    sync(device)
                    returned = time.perf_counter()
                    saver.drain()
                    sync(device)
                    durable = time.perf_counter()
                    samples[name]["returns_s"].append(returned - start)
                    samples[name]["durable_s"].append(durable - start)
        finally:
            for saver in savers.values():
                saver.close()
    return samples


def run_loop(name: str | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: list, root: Path,
             every: int, device: torch.device) -> dict[str, Any]:
    """One training loop over ``data``, saving every ``every`` steps with row ``name`` (None: no saves)."""
    trainer = create_trainer(model, optimizer, torch.nn.functional.mse_loss, device=device)
    with saver_directory(root, "loop") as directory:
        saver = None if name is None else make_saver(name, model, optimizer, directory, device)
        if saver is not None:
            saver.attach(trainer, every)  # before the clock handlers: a step's time includes its save
        steps: list[float] = []
        in_flight_after: list[bool] = []
        clock = [0.0]

        @trainer.on(Events.ITERATION_STARTED)
        def _start(_: Any) -> None:
            clock[0] = time.perf_counter()

        @trainer.on(Events.ITERATION_COMPLETED)
        def _stop(_: Any) -> None:
            sync(device)
            steps.append(time.perf_counter() - clock[0])
            in_flight_after.append(saver is not None and saver.in_flight())

        gc.collect()
        sync(device)
        start = time.perf_counter()
        try:
            trainer.run(data, max_epochs=1)  # the saver's drain at COMPLETED is inside the timed run
            sync(device)
            elapsed = time.perf_counter() - start
            extras = {} if saver is None else saver.extras()
        finally:
            if saver is not None:
                saver.close()
    save_steps = [] if name is None else list(range(every, len(data) + 1, every))
    held_steps = [step + 1 for step in save_steps if step < len(data)] if saver is not None and saver.holds_next_step else []
    return {"run_s": elapsed, "steps_s": steps, "save_steps": save_steps, "held_steps": held_steps,
            "in_flight_after_step": in_flight_after,
            "in_flight_at_end": bool(in_flight_after and in_flight_after[-1]), "saver": extras}


def step_classes(loop: dict[str, Any]) -> dict[str, list[float]]:
    """A loop's step times split into steps started with a write in flight and steps started without.

    The first step, the steps that saved and the steps a fence held (the one
    after each save) are in neither class.

    >>> step_classes({"steps_s": [9, 1, 5, 2, 1], "save_steps": [2], "held_steps": [], "in_flight_after_step": [0, 1, 1, 0, 0]})
    {'in_flight': [5, 2], 'clear': [1]}
    """
    blocking = set(loop["save_steps"]) | set(loop["held_steps"])
    classes: dict[str, list[float]] = {"in_flight": [], "clear": []}
    for step, seconds in enumerate(loop["steps_s"], start=1):
        if step == 1 or step in blocking:
            continue
        classes["in_flight" if loop["in_flight_after_step"][step - 2] else "clear"].append(seconds)
    return classes


def in_run_stall(loop: dict[str, Any], classes: dict[str, list[float]]) -> dict[str, float | None]:
    """The stall per save estimated inside one run, immune to load that drifts between runs.

    Each step's excess over the run's median step without a write in flight,
    per save: ``blocking_per_save_s`` sums the steps that saved and the steps
    a fence held (training waited for the save); ``in_run_stall_per_save_s``
    adds the steps that ran, slowed, while a write was in flight.

    >>> in_run_stall({"steps_s": [9, 3, 2, 1, 1], "save_steps": [2], "held_steps": []}, {"in_flight": [2], "clear": [1, 1]})
    {'in_run_stall_per_save_s': 3.0, 'blocking_per_save_s': 2.0}
    """
    saves = loop["save_steps"]
    if not saves or not classes["clear"]:
        return {"in_run_stall_per_save_s": None, "blocking_per_save_s": None}
    clear = statistics.median(classes["clear"])
    blocking = sum(loop["steps_s"][step - 1] - clear for step in saves + loop["held_steps"])
    in_flight = sum(seconds - clear for seconds in classes["in_flight"])
    return {"in_run_stall_per_save_s": (blocking + in_flight) / len(saves), "blocking_per_save_s": blocking / len(saves)}


def time_loops(names: list[str], model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: list, root: Path,
               repeats: int, every: int, device: torch.device) -> dict[str, list[dict[str, Any]]]:
    """Per row (and for the baseline, key ``BASELINE``), every repeat's loop record, with its stall per save."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in [BASELINE, *names]}
    for repeat in range(repeats):
        this_repeat = {}
        for name in rotated([BASELINE, *names], repeat):
            this_repeat[name] = run_loop(None if name == BASELINE else name, model, optimizer, data, root, every, device)
            progress(f"training loops, repeat {repeat + 1}/{repeats}: {name}, {this_repeat[name]['run_s']:.2f} s")
        baseline = this_repeat[BASELINE]["run_s"]
        for name, loop in this_repeat.items():
            classes = step_classes(loop)
            saves = len(loop["save_steps"])
            loop["stall_per_save_s"] = (loop["run_s"] - baseline) / saves if saves else None
            loop["median_step_clear_s"] = statistics.median(classes["clear"]) if classes["clear"] else None
            loop["median_step_in_flight_s"] = statistics.median(classes["in_flight"]) if classes["in_flight"] else None
            loop["steps_in_flight"] = len(classes["in_flight"])
            loop.update(in_run_stall(loop, classes))
            runs[name].append(loop)
    return runs
