"""The FashionMNIST lab end to end: crash, automatic resume, artifacts (issue: lab acceptance 2, 3)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "examples" / "fashion_mnist.py"


def run_lab(run_dir: Path, *extra: str, expect: int = 0) -> str:
    cmd = [sys.executable, str(LAB), "--run-dir", str(run_dir), "--quick", "--dataset", "digits", "--seed", "3", *extra]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def png_pixels(path: Path) -> tuple[int, int, bytes]:
    """Decode a PNG (8-bit RGB/RGBA, as matplotlib writes) far enough to count colours."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour, *_ = header
    assert depth == 8 and colour in (2, 6)
    return width, height, zlib.decompress(idat)


@pytest.fixture(scope="module")
def lab_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("lab")
    straight = base / "straight"
    crashed = base / "crashed"
    run_lab(straight)
    first = run_lab(crashed, "--crash-at-step", "14", expect=1)
    second = run_lab(crashed, "--crash-at-step", "14")
    return straight, crashed, first, second


def test_crash_then_automatic_resume_matches_an_uninterrupted_run(lab_runs):
    straight, crashed, first, second = lab_runs
    assert "simulated crash after optimizer step 14" in first
    assert "resumed from" in second and "simulated crash" not in second
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((crashed / "summary.json").read_text())
    assert a["resumed_from"] is None
    assert b["resumed_from"] is not None  # resumed, not restarted
    assert b["resumes"][0] == {"from": b["resumed_from"], "step": 12, "crashed_after_step": 14}  # mid-epoch 2
    assert b["final_params_sha256"] == a["final_params_sha256"]
    assert a["optimizer_steps"] == b["optimizer_steps"] == 16


def test_the_curve_has_no_gap_across_the_crash(lab_runs):
    straight, crashed, _, _ = lab_runs
    rows = [json.loads(line) for line in (crashed / "steps.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == list(range(1, 17))  # every step once: no gap, no duplicate
    reference = [json.loads(line) for line in (straight / "steps.jsonl").read_text().splitlines() if line.strip()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in reference]
    history = json.loads((crashed / "run.json").read_text())["val_history"]
    assert [h["epoch"] for h in history] == [1, 2]


def test_artifacts_are_all_there_and_plots_have_content(lab_runs):
    _, crashed, _, _ = lab_runs
    for name in ("steps.jsonl", "steps.csv", "run.json", "summary.md", "summary.json", "curves.png", "grad_norm_hist.png"):
        assert (crashed / name).is_file(), name
    assert any((crashed / "tb").iterdir())
    summary = json.loads((crashed / "summary.json").read_text())
    for key in ("best_checkpoint", "final_metric", "best_metric", "clipped_fraction", "skipped_steps",
                "wall_time_per_epoch_s", "samples_per_s", "optimizer_steps", "resumed_from", "final_params_sha256"):
        assert key in summary, key
    assert summary["best_checkpoint"]["name"].endswith(".ekpt")
    for name in ("curves.png", "grad_norm_hist.png"):
        width, height, raw = png_pixels(crashed / name)
        assert width >= 400 and height >= 300
        # Non-trivial: many distinct byte values (lines, text, bars), not a blank canvas.
        assert len(set(raw)) > 50, f"{name} looks empty"


def test_report_command_regenerates_the_artifacts(lab_runs):
    _, crashed, _, _ = lab_runs
    (crashed / "summary.md").unlink()
    (crashed / "curves.png").unlink()
    result = subprocess.run([sys.executable, "-m", "engine_kit.cli", "report", str(crashed)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (crashed / "summary.md").is_file() and (crashed / "curves.png").is_file()
    assert "resumed from" in (crashed / "summary.md").read_text()
