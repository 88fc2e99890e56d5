"""The benchmark scripts still run: ``--smoke`` in a subprocess, a table with every variant.

No timing is asserted here: speed claims live in ``benchmarks/RESULTS.md``,
measured side by side with a raw loop, never in unit tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"

# Each script, the first cell of every table row it must print, and its JSON sections.
CASES = {
    "host_overhead.py": (
        ["raw", "ignite", "engine_kit", "stack", "stack+ckpt"],
        ["environment", "config", "results"],
    ),
    "checkpoint_save.py": (
        ["CheckpointRotation save", "torch.save (no fsync)", "torch.save + fsync",
         "engine_kit", "engine_kit + CheckpointRotation", "raw loop", "raw loop + torch.save"],
        ["environment", "config", "sizes", "isolated", "stall"],
    ),
    # One row per (model, variant); the first cell is the model.
    "train_speed.py": (["cnn", "gpt"], ["environment", "rows"]),
}


def first_cells(stdout: str) -> list[str]:
    """The first cell of every markdown table row that is neither a header nor a rule."""
    cells = []
    for line in stdout.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells.append(line.split("|")[1].strip())
    return cells


@pytest.mark.parametrize("script", sorted(CASES))
def test_smoke_run_prints_every_variant(script: str, tmp_path: Path) -> None:
    variants, sections = CASES[script]
    out_json = tmp_path / "out.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke", "--json", str(out_json)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, f"{script} --smoke failed:\n{result.stdout}\n{result.stderr}"
    cells = first_cells(result.stdout)
    missing = [name for name in variants if name not in cells]
    assert not missing, f"{script} printed no row for {missing}:\n{result.stdout}"
    numbers = json.loads(out_json.read_text())
    assert all(key in numbers for key in sections), sorted(numbers)
    if script == "train_speed.py":
        assert {(r["model"], r["variant"]) for r in numbers["rows"]} == {
            (m, v) for m in ("cnn", "gpt") for v in ("raw", "engine_kit", "engine_kit+stack")}
