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


def test_the_lab_runs_end_with_their_final_checkpoint_verified(lab_runs, capsys):
    from engine_kit.checkpoint import CheckpointDirectory
    from engine_kit.cli import main as engine_kit_cli

    for run_dir in lab_runs[:2]:  # with CheckpointRotation's default save mode (background writes since issue 13)
        assert engine_kit_cli(["ckpt", "verify", str(run_dir / "checkpoints")]) == 0, capsys.readouterr().out
        assert CheckpointDirectory(run_dir / "checkpoints", read_only=True).newest_valid().step == 16


@pytest.mark.slow  # one more lab run; the two above ran with the default save mode
def test_with_async_saves_the_lab_ends_with_its_final_checkpoint_verified(lab_runs, tmp_path, capsys):
    from engine_kit.checkpoint import CheckpointDirectory
    from engine_kit.cli import main as engine_kit_cli

    straight = lab_runs[0]
    run_dir = tmp_path / "async"
    # tests/resume/writer_faults.py runs the lab with every CheckpointRotation forced to async_save=True.
    cmd = [sys.executable, "-m", "tests.resume.writer_faults", "lab", "--",
           "--run-dir", str(run_dir), "--quick", "--dataset", "digits", "--seed", "3"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "async rotations: 1" in result.stdout  # the lab's rotation wrote in the background
    assert engine_kit_cli(["ckpt", "verify", str(run_dir / "checkpoints")]) == 0, capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    # The run's end waited for the last background save: the final step's checkpoint is there, whole.
    assert CheckpointDirectory(run_dir / "checkpoints", read_only=True).newest_valid().step == summary["optimizer_steps"] == 16
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".ek-tmp")]
    assert summary["final_params_sha256"] == json.loads((straight / "summary.json").read_text())["final_params_sha256"]


# -- run directory checked up front ---------------------------------------------------------------------
def test_a_file_at_the_run_directory_fails_at_once_naming_the_path(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    cmd = [sys.executable, str(LAB), "--run-dir", str(blocker), "--quick", "--dataset", "digits"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"run directory '{blocker}': it is a regular file, not a directory" in result.stderr
    assert "To fix:" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("case", ["fifo", "parent is a file", "name too long", "not writable"])
def test_prepare_run_directory_refuses_with_a_typed_error(tmp_path, monkeypatch, case):
    import os
    import tempfile

    from engine_kit.errors import RunDirectoryError
    from engine_kit.run_directory import prepare_run_directory

    if case == "fifo":
        path, expected = tmp_path / "pipe", "it is a FIFO, not a directory"
        os.mkfifo(path)
    elif case == "parent is a file":
        (tmp_path / "file").write_text("x")
        path, expected = tmp_path / "file" / "run", "one of its parents is a file"
    elif case == "name too long":
        path, expected = tmp_path / ("n" * 300), "the path is too long for the filesystem"
    else:
        path, expected = tmp_path / "ro", "it is not writable"
        path.mkdir()
        path.chmod(0o500)
        if os.geteuid() == 0:  # root writes anywhere: simulate the read-only mount instead
            def refuse(*args, **kwargs):
                raise PermissionError(13, "Permission denied")
            monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(RunDirectoryError, match="To fix:") as info:
        prepare_run_directory(path)
    assert str(path) in str(info.value) and expected in str(info.value)
    assert isinstance(info.value, OSError)


# -- --epochs changes on resume, preemption (slow: several lab runs) ---------------------------------------
@pytest.mark.slow
def test_epochs_changes_on_a_crashed_and_a_finished_run(lab_runs, tmp_path):
    import shutil

    straight, _, _, _ = lab_runs
    grow = tmp_path / "grow"
    run_lab(grow, "--crash-at-step", "14", expect=1)  # crashed in epoch 2 (checkpoint at step 12)
    refused = subprocess.run(
        [sys.executable, str(LAB), "--run-dir", str(grow), "--quick", "--dataset", "digits", "--seed", "3", "--epochs", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert refused.returncode == 1 and "past the live max_epochs=1" in refused.stderr and "To fix:" in refused.stderr
    assert not (grow / "summary.json").exists()  # no report of a metric from another step
    extended = run_lab(grow, "--crash-at-step", "14", "--epochs", "3")
    assert "run length changed from 2 to 3 epochs: the OneCycle schedule is rebuilt for 24 steps" in extended
    summary = json.loads((grow / "summary.json").read_text())
    run = json.loads((grow / "run.json").read_text())
    assert summary["optimizer_steps"] == 24 and [h["epoch"] for h in run["val_history"]] == [1, 2, 3]
    assert summary["final_metric"] == run["val_history"][-1]["accuracy"]  # measured at step 24
    finished = tmp_path / "finished"
    shutil.copytree(straight, finished)
    extended = run_lab(finished, "--epochs", "3")
    assert "rebuilt for 24 steps, continuing at step 16" in extended
    assert json.loads((finished / "summary.json").read_text())["optimizer_steps"] == 24


@pytest.mark.slow
def test_sigterm_during_the_lab_saves_exits_75_and_the_rerun_is_exact(lab_runs, tmp_path):
    import signal

    straight, _, _, _ = lab_runs
    run_dir = tmp_path / "preempted"
    cmd = [sys.executable, str(LAB), "--run-dir", str(run_dir), "--quick", "--dataset", "digits", "--seed", "3"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch 1/2"):
            proc.send_signal(signal.SIGTERM)  # in epoch 2, at an arbitrary micro-batch
            break
    output = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=300) == 75, output
    assert "preempted by SIGTERM at optimizer step" in output and "Exit status 75" in output
    from engine_kit.checkpoint import CheckpointDirectory

    entry = CheckpointDirectory(run_dir / "checkpoints", read_only=True).newest_valid()
    step = int(output.split("preempted by SIGTERM at optimizer step ")[1].split()[0].rstrip(";"))
    assert entry.step == step and 8 <= step < 16  # a checkpoint at the window boundary after the signal
    rerun = run_lab(run_dir)
    assert "resumed from" in rerun
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((run_dir / "summary.json").read_text())
    assert b["final_params_sha256"] == a["final_params_sha256"]


def test_the_final_metric_is_only_a_validation_of_the_final_parameters():
    from engine_kit.report import summarize

    history = [{"epoch": 1, "optimizer_steps": 8, "accuracy": 0.5}, {"epoch": 2, "optimizer_steps": 16, "accuracy": 0.7}]
    assert summarize([], {"optimizer_steps": 16, "val_history": history})["final_metric"] == 0.7
    # Parameters of step 20 (a run stopped mid-epoch 3): the step-16 accuracy is not theirs.
    assert summarize([], {"optimizer_steps": 20, "val_history": history})["final_metric"] is None
