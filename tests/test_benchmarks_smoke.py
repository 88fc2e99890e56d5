"""``benchmarks/run.py --smoke`` still runs every runner on every model and writes a well-formed JSON.

No timing is asserted here: speed claims live in ``benchmarks/RESULTS.md``,
measured side by side with a raw loop, never in unit tests.
"""

from __future__ import annotations

import importlib.util
import json
import numbers
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {"mlp", "cnn", "resnet18", "gpt"}
RUNNERS = {"raw", "raw_full", "engine_kit", "engine_kit_full", "ignite", "ignite_full"}
LIGHTNING = {"lightning", "lightning_full"}
# Every record's fields and the types their values may have (None: not measured on this device).
FIELDS = {
    "model": str, "runner": str, "precision": str, "device": str, "samples_per_s": numbers.Real,
    "us_per_iter": numbers.Real, "cpu_us_per_iter": numbers.Real, "ratio_to_raw": numbers.Real, "paired_ratio_to_raw": numbers.Real, "peak_mem_mb": (numbers.Real, type(None)),
    "host_syncs_per_iter": (numbers.Real, type(None)), "torch": str, "ignite": str,
    "lightning": (str, type(None)), "date": str, "commit": str,
}


def test_smoke_run_writes_every_record_with_its_schema(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--smoke", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"run.py --smoke failed:\n{result.stdout}\n{result.stderr}"
    records = json.loads(out.read_text())["records"]
    with_lightning = importlib.util.find_spec("lightning") is not None
    expected = RUNNERS | (LIGHTNING if with_lightning else set())
    assert {(r["model"], r["runner"]) for r in records} == {(m, r) for m in MODELS for r in expected}
    for record in records:
        for field, kind in FIELDS.items():
            assert isinstance(record[field], kind), (field, record[field])
        assert record["device"] == "cpu" and record["precision"] == "fp32"
        assert record["us_per_iter"] > 0 and record["samples_per_s"] > 0
        assert record["peak_mem_mb"] is None and record["host_syncs_per_iter"] is None  # CUDA-only measurements
        # Every runner did the same number of optimizer steps; the _full ones wrote checkpoints, the others none.
        assert record["optimizer_steps"] == 2, record
        assert (record["checkpoints"] > 0) == record["runner"].endswith("_full"), record
    by_key = {(r["model"], r["runner"]): r for r in records}
    for (model, runner), record in by_key.items():
        reference = by_key[(model, "raw_full" if runner.endswith("_full") else "raw")]
        assert abs(record["ratio_to_raw"] - record["us_per_iter"] / reference["us_per_iter"]) < 1e-9
        rounds = zip(record["us_per_iter_all"], reference["us_per_iter_all"])  # one repeat in --smoke: one round
        assert abs(record["paired_ratio_to_raw"] - statistics.median(t / r for t, r in rounds)) < 1e-9
    # The tables printed on stdout carry one row per record.
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| runner")]
    assert len(rows) == len(records)


# checkpoint_save.py's JSON: every summary row's fields and the types their values may have.
CKPT_ROW_FIELDS = {
    "row": str, "returns_s": numbers.Real, "returns_min_s": numbers.Real, "returns_max_s": numbers.Real,
    "durable_s": (numbers.Real, type(None)), "stall_per_save_s": numbers.Real, "stall_samples_s": list,
    "in_run_stall_per_save_s": (numbers.Real, type(None)), "blocking_per_save_s": (numbers.Real, type(None)),
    "median_step_clear_s": numbers.Real, "median_step_in_flight_s": (numbers.Real, type(None)),
    "steps_in_flight_per_loop": numbers.Real, "in_flight_slowdown": (numbers.Real, type(None)),
    "loops_with_write_in_flight_at_end": int, "back_pressure_waits": int, "extra_peak_bytes": (int, type(None)),
}
CKPT_LOOP_FIELDS = {"run_s": numbers.Real, "steps_s": list, "save_steps": list, "held_steps": list, "in_flight_after_step": list,
                    "in_flight_at_end": bool, "steps_in_flight": int, "saver": dict}


def test_checkpoint_save_smoke_prints_every_row(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from checkpoint_bench.savers import ASYNC_ROWS, PLAIN_COPY, ROWS
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    out = tmp_path / "ckpt.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "checkpoint_save.py"), "--smoke", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, f"checkpoint_save.py --smoke failed:\n{result.stdout}\n{result.stderr}"
    report = json.loads(out.read_text())
    assert {"environment", "config", "rows", "acceptance", "skipped", "isolated", "loops", "memory"} <= set(report)
    assert {"date_utc", "device", "torch", "ignite", "commit"} <= set(report["environment"])
    skipped = report["skipped"]
    measured = [row["row"] for row in report["rows"]]
    # Every row is measured or skipped with a reason; only Lightning (not installed) and the fence (not at this commit) may be.
    assert sorted(measured + list(skipped)) == sorted(ROWS)
    assert set(skipped) <= {"Lightning AsyncCheckpointIO", "engine_kit async (fence)"}
    assert all(isinstance(reason, str) and reason for reason in skipped.values())
    assert ("Lightning AsyncCheckpointIO" in skipped) == (importlib.util.find_spec("lightning") is None)
    repeats, loop_repeats, steps, every = (report["config"][k] for k in ("repeats", "loop_repeats", "steps", "every"))
    for row in report["rows"]:
        for field, kind in CKPT_ROW_FIELDS.items():
            assert isinstance(row[field], kind), (row["row"], field, row[field])
        name = row["row"]
        assert len(report["isolated"][name]["returns_s"]) == len(report["isolated"][name]["durable_s"]) == repeats
        assert all(r <= d for r, d in zip(report["isolated"][name]["returns_s"], report["isolated"][name]["durable_s"]))
        assert (row["durable_s"] is None) == (name == PLAIN_COPY)  # the copy writes no file
        assert len(report["loops"][name]) == loop_repeats
        for loop in report["loops"][name]:
            for field, kind in CKPT_LOOP_FIELDS.items():
                assert isinstance(loop[field], kind), (name, field, loop[field])
            assert len(loop["steps_s"]) == len(loop["in_flight_after_step"]) == steps
            assert loop["save_steps"] == list(range(every, steps + 1, every))
            if name not in ASYNC_ROWS:
                assert not any(loop["in_flight_after_step"]), name  # a synchronous save is done when it returns
            # Only the fence holds the step after a save.
            assert loop["held_steps"] == ([s + 1 for s in loop["save_steps"]] if name == "engine_kit async (fence)" else [])
        if name in report["memory"]:
            record = report["memory"][name]
            assert record["extra_peak_bytes"] == record["peak_rss_with_saves_bytes"] - record["peak_rss_without_saves_bytes"]
            assert record["peak_rss_without_saves_bytes"] > 0 and record["method"]
    assert set(report["memory"]) == {PLAIN_COPY, "engine_kit async (copy)"} - set(skipped)
    for check in report["acceptance"]:
        assert check["row"].startswith("engine_kit async") and isinstance(check["met"], bool), check
    # The printed tables: a line per row (measured or skipped), and the acceptance table for each async engine_kit row.
    cells = [line.split("|")[1].strip() for line in result.stdout.splitlines()
             if line.startswith("| ") and not line.startswith("|---")]
    for name in ROWS:
        assert name in cells, (name, result.stdout)
    assert cells.count("step slowdown while a write is in flight") == len([r for r in measured if r.startswith("engine_kit async")])
