"""``benchmarks/loop_instructions.py``: its variants run, and its report reads callgrind's dumps right.

No instruction count or time is asserted: counts are measured under valgrind
and recorded in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "loop_instructions.py"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_plain_and_full_variants_run_without_valgrind(tmp_path: Path) -> None:
    result = _run("--variants", "raw,engine_kit_full", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "CPU µs per micro-batch" in line]
    assert [line.split(":")[0] for line in lines] == ["raw", "engine_kit_full"]
    assert list(tmp_path.iterdir()) == []  # the runners' work directories are removed


def test_report_divides_each_dump_by_its_micro_batches(tmp_path: Path) -> None:
    # One dump per variant, numbered as callgrind's --dump-after numbers them; only the summary line is read.
    counts = {"raw": 400_000_000, "engine_kit": 420_000_000, "raw_full": 1_200_000_000, "engine_kit_full": 1_320_000_000}
    for index, total in enumerate(counts.values(), start=1):
        (tmp_path / f"loop.out.{index}").write_text(f"events: Ir\nsummary: {total}\n")
    result = _run("--report", str(tmp_path / "loop.out"), "--variants", ",".join(counts), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {line.split("|")[1].strip(" `"): line.split("|")[2:4] for line in result.stdout.splitlines()[2:]}
    # 400 micro-batches per plain epoch, 1200 per _full run (3 epochs); ratios against raw / raw_full.
    assert rows["raw"] == [" 1000.0 k ", " 1.000 "]
    assert rows["engine_kit"] == [" 1050.0 k ", " 1.050 "]
    assert rows["raw_full"] == [" 1000.0 k ", " 1.000 "]
    assert rows["engine_kit_full"] == [" 1100.0 k ", " 1.100 "]


def test_unknown_variant_is_refused(tmp_path: Path) -> None:
    result = _run("--variants", "raw,lightning", cwd=tmp_path)
    assert result.returncode == 2 and "unknown ['lightning']" in result.stderr


def test_an_ablation_variant_runs_the_standard_stack_without_the_named_handlers(tmp_path: Path) -> None:
    result = _run("--variants", "engine_kit_full-without-Doctor+StepLog", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "engine_kit_full-without-Doctor+StepLog:" in result.stdout
    assert "doctor [" not in result.stderr  # the doctor was left out: no finding printed
    refused = _run("--variants", "engine_kit_full-without-Progress", cwd=tmp_path)
    assert refused.returncode != 0 and "Doctor, NanGuard" in refused.stderr


def test_report_counts_an_ablation_variant_against_raw_full(tmp_path: Path) -> None:
    counts = {"raw_full": 1_200_000_000, "engine_kit_full-without-Doctor": 1_260_000_000}
    for index, total in enumerate(counts.values(), start=1):
        (tmp_path / f"loop.out.{index}").write_text(f"events: Ir\nsummary: {total}\n")
    result = _run("--report", str(tmp_path / "loop.out"), "--variants", ",".join(counts), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "| `engine_kit_full-without-Doctor` | 1050.0 k | 1.050 |" in result.stdout
