"""The records of a run as markdown tables, one per (model, precision, device).

>>> print(tables([{"model": "mlp", "precision": "fp32", "device": "cpu", "runner": "raw", "us_per_iter": 100.0,
...     "us_per_iter_min": 99.0, "us_per_iter_max": 101.0, "samples_per_s": 160000.0, "ratio_to_raw": 1.0,
...     "checkpoints": 0, "peak_mem_mb": None, "host_syncs_per_iter": None, "cpu_us_per_iter": 90.0,
...     "cpu_ratio_to_raw": 1.0, "paired_ratio_to_raw": 1.0}]))
### mlp, fp32, cpu
<BLANKLINE>
| runner | µs/iter (median) | min–max | samples/s | × ref | paired × ref | CPU µs/iter | CPU × ref | saves/run | peak MB | host syncs/iter |
|---|---|---|---|---|---|---|---|---|---|---|
| raw | 100.0 | 99.0–101.0 | 160000 | 1.000 | 1.000 | 90.0 | 1.000 | 0 | — | — |
"""

from __future__ import annotations

from typing import Any


def _cell(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def tables(records: list[dict[str, Any]]) -> str:
    """Markdown tables; ``× ref`` is the ratio to ``raw`` (to ``raw_full`` for the ``_full`` runners).

    ``× ref`` divides the medians; ``paired × ref`` is the median of the per-round
    ratios (``measure.paired_ratio``). Where they disagree, trust neither to better
    than their difference.

    ``CPU µs/iter`` is this process's CPU time (all threads) per micro-batch:
    less sensitive than wall time to other jobs on a shared machine, blind to I/O waits.
    """
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["model"], record["precision"], record["device"]), []).append(record)
    out = []
    for (model, precision, device), rows in groups.items():
        out += [f"### {model}, {precision}, {device}", "",
                "| runner | µs/iter (median) | min–max | samples/s | × ref | paired × ref | CPU µs/iter | CPU × ref "
                "| saves/run | peak MB | host syncs/iter |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            out.append(
                f"| {r['runner']} | {r['us_per_iter']:.1f} | {r['us_per_iter_min']:.1f}–{r['us_per_iter_max']:.1f} "
                f"| {r['samples_per_s']:.0f} | {_cell(r['ratio_to_raw'], '.3f')} | {_cell(r['paired_ratio_to_raw'], '.3f')} "
                f"| {r['cpu_us_per_iter']:.1f} "
                f"| {_cell(r['cpu_ratio_to_raw'], '.3f')} | {_cell(r['checkpoints'], 'd')} "
                f"| {_cell(r['peak_mem_mb'], '.0f')} | {_cell(r['host_syncs_per_iter'], '.2f')} |"
            )
        out.append("")
    return "\n".join(out).rstrip("\n")
