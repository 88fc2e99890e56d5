"""``benchmarks/run.py --smoke`` still runs every runner on every model and writes a well-formed JSON.

No timing is asserted here: speed claims live in ``benchmarks/RESULTS.md``,
measured side by side with a raw loop, never in unit tests.
"""

from __future__ import annotations

import importlib.util
import json
import numbers
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
    "us_per_iter": numbers.Real, "cpu_us_per_iter": numbers.Real, "ratio_to_raw": numbers.Real, "peak_mem_mb": (numbers.Real, type(None)),
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
    # The tables printed on stdout carry one row per record.
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| runner")]
    assert len(rows) == len(records)


def test_checkpoint_save_smoke_prints_every_row(tmp_path: Path) -> None:
    out = tmp_path / "ckpt.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "checkpoint_save.py"), "--smoke", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"checkpoint_save.py --smoke failed:\n{result.stdout}\n{result.stderr}"
    cells = [line.split("|")[1].strip() for line in result.stdout.splitlines()
             if line.startswith("| ") and not line.startswith("|---")]
    for row in ("CheckpointRotation save", "torch.save (no fsync)", "torch.save + fsync", "engine_kit",
                "engine_kit + CheckpointRotation", "raw loop", "raw loop + torch.save"):
        assert row in cells, (row, result.stdout)
    assert {"environment", "config", "sizes", "isolated", "stall"} <= set(json.loads(out.read_text()))
