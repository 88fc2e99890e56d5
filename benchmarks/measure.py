"""Timing runners side by side: warm-up, interleaved and rotated repeats, medians, host syncs, peak memory."""

from __future__ import annotations

import gc
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from models import Case
from runners import Run, builder, reference

Build = Callable[[Case, Path], Run]


def rotated(items: tuple[str, ...], shift: int) -> tuple[str, ...]:
    """``items`` starting at position ``shift`` (modulo its length), so no runner always runs first.

    >>> rotated(("a", "b", "c"), 4)
    ('b', 'c', 'a')
    """
    shift %= len(items)
    return items[shift:] + items[:shift]


def paired_ratio(times: list[float], reference: list[float]) -> float:
    """The median over rounds of ``times[i] / reference[i]``: each round ran both once, close in time.

    ``ratio_to_raw`` divides the two medians; this estimator pairs the repeats
    instead, so load that shifts between rounds cancels (load within a round does
    not). Where the two disagree, the difference is the measurement's uncertainty.

    >>> paired_ratio([110.0, 220.0, 330.0], [100.0, 200.0, 300.0])
    1.1
    """
    return statistics.median(t / r for t, r in zip(times, reference))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(build: Build, case: Case, root: Path, label: str) -> tuple[float, float, dict[str, Any], float | None]:
    """Build a runner (untimed), time one run of it.

    Returns the wall seconds, the CPU seconds of this process (every thread;
    unlike wall time, not inflated while other jobs hold the CPU, but blind to
    waits such as fsync), the runner's facts and peak device memory (MB, CUDA
    only). The runner's work directory is removed afterwards.
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=root))
    try:
        run = build(case, workdir)
        gc.collect()
        _synchronize(case.device)
        if case.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(case.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        facts = run()
        _synchronize(case.device)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        peak = torch.cuda.max_memory_allocated(case.device) / 2**20 if case.device.type == "cuda" else None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return elapsed, cpu, facts, peak


def count_host_syncs(build: Build, case: Case, root: Path, label: str) -> int:
    """Synchronizing CUDA calls in one (untimed) run, counted with ``torch.cuda.set_sync_debug_mode("warn")``.

    The debug mode warns on every call that blocks the host on the device
    (``item``, ``tolist``, a device-to-host copy, ``nonzero``...); the
    warnings are counted, not printed.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            timed_run(build, case, root, label)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def measure_case(case: Case, runners: tuple[str, ...], repeats: int, warmup: bool) -> list[dict[str, Any]]:
    """Time every runner on ``case``; one result per runner with medians, min–max and ratios.

    After one warm-up run of each runner (allocator growth, cuDNN autotuning,
    lazy imports), every repeat runs each runner once, starting at a
    rotating runner, so load from other processes hits all runners alike.
    """
    builds = {name: builder(name) for name in runners}
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in runners}
    peaks: dict[str, list[float]] = {name: [] for name in runners}
    facts: dict[str, dict[str, Any]] = {}
    syncs: dict[str, int | None] = dict.fromkeys(runners)
    with tempfile.TemporaryDirectory(prefix="ek-bench-") as tmp:
        root = Path(tmp)
        if warmup:
            for name in runners:
                timed_run(builds[name], case, root, name)
        for repeat in range(repeats):
            for name in rotated(runners, repeat):
                elapsed, cpu, facts[name], peak = timed_run(builds[name], case, root, name)
                seconds[name].append(elapsed)
                cpu_seconds[name].append(cpu)
                if peak is not None:
                    peaks[name].append(peak)
        if case.device.type == "cuda":
            for name in runners:
                syncs[name] = count_host_syncs(builds[name], case, root, name)
    results = []
    for name in runners:
        per_iter = [s / case.iterations * 1e6 for s in seconds[name]]
        results.append({
            "runner": name,
            "us_per_iter": statistics.median(per_iter),
            "us_per_iter_min": min(per_iter),
            "us_per_iter_max": max(per_iter),
            "us_per_iter_all": per_iter,
            "cpu_us_per_iter": statistics.median(cpu_seconds[name]) / case.iterations * 1e6,
            "samples_per_s": case.schedule.batch / (statistics.median(per_iter) * 1e-6),
            "peak_mem_mb": statistics.median(peaks[name]) if peaks[name] else None,
            "host_syncs_per_iter": None if syncs[name] is None else syncs[name] / case.iterations,
            "optimizer_steps": facts[name].get("optimizer_steps"),
            "checkpoints": facts[name].get("checkpoints"),
        })
    by_name = {r["runner"]: r for r in results}
    for result in results:
        ref = by_name.get(reference(result["runner"]))
        result["ratio_to_raw"] = result["us_per_iter"] / ref["us_per_iter"] if ref else None
        result["paired_ratio_to_raw"] = paired_ratio(result["us_per_iter_all"], ref["us_per_iter_all"]) if ref else None
        result["cpu_ratio_to_raw"] = result["cpu_us_per_iter"] / ref["cpu_us_per_iter"] if ref else None
    return results
