"""Summaries (medians over repeats), the acceptance ratios, and the markdown tables.

>>> fmt(None), fmt(0.12345), pct(0.2)
('—', '0.123', '+20%')
"""

from __future__ import annotations

import statistics
from typing import Any

from .savers import ASYNC_ROWS, EK_COPY, EK_FENCE, PLAIN_COPY, TORCH_SAVE
from .timing import BASELINE

# Issue 13, point 1: an async save's training stall against these, and the in-flight step slowdown.
STALL_VS_COPY_MAX = 1.2
STALL_VS_TORCH_SAVE_MAX = 0.5
IN_FLIGHT_SLOWDOWN_MAX = 0.25


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for a table cell; an em dash for "not measured"."""
    return "—" if value is None else f"{value:.{digits}f}"


def pct(value: float | None) -> str:
    """A signed percentage for a table cell."""
    return "—" if value is None else f"{value * 100:+.0f}%"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``; None when either is missing or the denominator is not positive (noise).

    >>> ratio(1.0, 4.0), ratio(1.0, -0.1)
    (0.25, None)
    """
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def median_or_none(values: list[float | None]) -> float | None:
    """The median of the measured values, None when none was measured."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(names: list[str], isolated: dict[str, dict[str, list[float]]], loops: dict[str, list[dict[str, Any]]],
              memory: dict[str, dict[str, Any]], writes_file: dict[str, bool]) -> list[dict[str, Any]]:
    """One summary row per save row: medians, min–max, in-flight slowdown, extra peak memory."""
    rows = []
    for name in names:
        runs = loops[name]
        stalls = [r["stall_per_save_s"] for r in runs]
        slowdowns = [ratio(r["median_step_in_flight_s"], r["median_step_clear_s"]) for r in runs]
        slowdowns = [s - 1 for s in slowdowns if s is not None]
        returns = isolated[name]["returns_s"]
        durable = isolated[name]["durable_s"] if writes_file[name] else None
        rows.append({
            "row": name,
            "returns_s": statistics.median(returns), "returns_min_s": min(returns), "returns_max_s": max(returns),
            "durable_s": statistics.median(durable) if durable else None,
            "stall_per_save_s": median_or_none(stalls), "stall_min_s": min(stalls), "stall_max_s": max(stalls),
            "stall_samples_s": stalls,
            "in_run_stall_per_save_s": median_or_none([r["in_run_stall_per_save_s"] for r in runs]),
            "blocking_per_save_s": median_or_none([r["blocking_per_save_s"] for r in runs]),
            "median_step_clear_s": median_or_none([r["median_step_clear_s"] for r in runs]),
            "median_step_in_flight_s": median_or_none([r["median_step_in_flight_s"] for r in runs]),
            "steps_in_flight_per_loop": statistics.median(r["steps_in_flight"] for r in runs),
            "in_flight_slowdown": median_or_none(slowdowns),
            "loops_with_write_in_flight_at_end": sum(r["in_flight_at_end"] for r in runs),
            "back_pressure_waits": sum(r["saver"].get("back_pressure_waits") or 0 for r in runs),
            "extra_peak_bytes": memory[name]["extra_peak_bytes"] if name in memory else None,
        })
    return rows


def acceptance(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ratios issue 13 point 1 sets targets for, for every engine_kit async row measured."""
    by_row = {row["row"]: row for row in rows}
    copy, torch_save = by_row.get(PLAIN_COPY), by_row.get(TORCH_SAVE)
    checks = []
    for name in (EK_COPY, EK_FENCE):
        row = by_row.get(name)
        if row is None or copy is None or torch_save is None:
            continue
        in_run, blocking = row["in_run_stall_per_save_s"], row["blocking_per_save_s"]
        # The floor of any snapshot is one plain copy of the state, timed alone; torch.save's cost is its own
        # stall in the same kind of loop. The whole stall counts the slowed steps while the write is in flight;
        # the paired-loop estimate stays in the side-by-side table only (run-to-run drift makes it noisy).
        copy_time, torch_stall = copy["returns_s"], torch_save["in_run_stall_per_save_s"]
        for what, value, limit in (
            ("whole stall per save (in-run) / one plain copy (isolated)", ratio(in_run, copy_time), STALL_VS_COPY_MAX),
            ("whole stall per save (in-run) / torch.save's stall per save (in-run)", ratio(in_run, torch_stall), STALL_VS_TORCH_SAVE_MAX),
            ("blocking stall per save / one plain copy (isolated)", ratio(blocking, copy_time), STALL_VS_COPY_MAX),
            ("blocking stall per save / torch.save's stall per save (in-run)", ratio(blocking, torch_stall), STALL_VS_TORCH_SAVE_MAX),
        ):
            checks.append({"row": name, "ratio": what, "value": value, "max": limit, "met": value is not None and value <= limit})
        slowdown = row["in_flight_slowdown"]
        # No step ran while a write was in flight (the fence can hold a step until the write is all but done): nothing slowed.
        met = slowdown < IN_FLIGHT_SLOWDOWN_MAX if slowdown is not None else row["steps_in_flight_per_loop"] == 0
        checks.append({"row": name, "ratio": "step slowdown while a write is in flight", "value": slowdown,
                       "max": IN_FLIGHT_SLOWDOWN_MAX, "met": met})
    return checks


def tables(rows: list[dict[str, Any]], checks: list[dict[str, Any]], skipped: dict[str, str],
           baseline_step_s: float | None, state_mb: float) -> str:
    """The side-by-side table, the acceptance table and the skipped rows, as markdown."""
    lines = [
        "| save | one save: returns after (s) | min–max | one save: durable after (s) | × torch.save "
        "| stall per save in a loop (s) | min–max | in-run stall per save (s) | of which blocking (s) "
        "| step, no write in flight (s) | step, write in flight (s) "
        "| in-flight slowdown | steps in flight | extra peak host MB | × state |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    reference = next((r["returns_s"] for r in rows if r["row"] == TORCH_SAVE), None)
    for r in rows:
        vs_torch_save = fmt(ratio(r["returns_s"], reference), 2)
        extra = r["extra_peak_bytes"]
        in_flight_cells = (fmt(r["median_step_in_flight_s"]), pct(r["in_flight_slowdown"]), f"{r['steps_in_flight_per_loop']:g}") \
            if r["row"] in ASYNC_ROWS else ("—", "—", "—")
        lines.append(
            f"| {r['row']} | {fmt(r['returns_s'])} | {fmt(r['returns_min_s'])}–{fmt(r['returns_max_s'])} | {fmt(r['durable_s'])} "
            f"| {vs_torch_save} | {fmt(r['stall_per_save_s'])} | {fmt(r['stall_min_s'])}–{fmt(r['stall_max_s'])} "
            f"| {fmt(r['in_run_stall_per_save_s'])} | {fmt(r['blocking_per_save_s'])} "
            f"| {fmt(r['median_step_clear_s'])} | {' | '.join(in_flight_cells)} "
            f"| {'—' if extra is None else f'{extra / 1e6:.0f}'} | {'—' if extra is None else fmt(extra / 1e6 / state_mb, 2)} |")
    for name, reason in skipped.items():
        lines.append(f"| {name} | skipped: {reason} |" + " |" * 13)
    lines.append("")
    lines.append(f"Median step of the loops without saves: {fmt(baseline_step_s)} s.")
    late = [r["row"] for r in rows if r["loops_with_write_in_flight_at_end"]]
    if late:
        lines.append(f"A write was still in flight at a loop's last step (its drain is in the stall): {', '.join(late)}; "
                     "raise --steps.")
    waited = [f"{r['row']} ({r['back_pressure_waits']})" for r in rows if r["back_pressure_waits"]]
    if waited:
        lines.append(f"Saves that waited for the previous write (back-pressure, in the stall): {', '.join(waited)}; "
                     "raise --every.")
    if checks:
        lines += ["", "| acceptance (issue 13, point 1) | row | value | target | met |", "|---|---|---|---|---|"]
        for c in checks:
            value = pct(c["value"]) if "slowdown" in c["ratio"] else fmt(c["value"], 2)
            target = f"< {c['max'] * 100:.0f}%" if "slowdown" in c["ratio"] else f"≤ {c['max']}"
            if c["value"] is None and c["met"]:
                value = "— (no step ran during a write)"
            met = "NO" if not c["met"] else "yes (a negative stall: below the noise)" if (c["value"] or 0) < 0 else "yes"
            lines.append(f"| {c['ratio']} | {c['row']} | {value} | {target} | {met} |")
    return "\n".join(lines)


def baseline_step(loops: dict[str, list[dict[str, Any]]]) -> float | None:
    """The median step time of the loops without saves (all repeats)."""
    steps = [s for run in loops.get(BASELINE, []) for s in run["steps_s"][1:]]
    return statistics.median(steps) if steps else None
