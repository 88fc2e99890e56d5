"""Bitwise exact resume after a real process kill (RELIABILITY case 18, issue acceptance 2).

Matrix: {kill mid-epoch, kill at an epoch boundary} x {num_workers 0, 2} x
{random augmentation on} x {accumulation 1, 4 — with 4 the mid-epoch kill lands
inside a window}. Each uninterrupted run is compared with a run killed by
``os._exit`` and resumed with ``resume="auto"``: final parameters, optimizer
state, scheduler position, learning rate and every per-step loss are equal.
The runs are subprocesses started side by side to use both cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "resume" / "train_script.py"

# 48 samples, batch 4 -> 12 iterations per epoch, 3 epochs.
CASES = {
    # name: (workers, accumulation, crash flag)
    "mid-epoch/w0/acc1": (0, 1, ["--crash-at-iteration", "17"]),
    "mid-epoch/w2/acc1": (2, 1, ["--crash-at-iteration", "17"]),
    "mid-epoch/w0/acc4": (0, 4, ["--crash-at-iteration", "23"]),  # iteration 23: inside window 21..24
    "mid-epoch/w2/acc4": (2, 4, ["--crash-at-iteration", "23"]),
    "epoch-boundary/w0/acc1": (0, 1, ["--crash-after-epoch", "1"]),
    "epoch-boundary/w2/acc1": (2, 1, ["--crash-after-epoch", "1"]),
    "epoch-boundary/w0/acc4": (0, 4, ["--crash-after-epoch", "2"]),
    "epoch-boundary/w2/acc4": (2, 4, ["--crash-after-epoch", "2"]),
}


def _start(run_dir: Path, out: Path, workers: int, accumulation: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, str(SCRIPT), "--dir", str(run_dir), "--out", str(out),
           "--workers", str(workers), "--accumulation", str(accumulation), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs: dict[str, subprocess.Popen], expected_rc: int) -> None:
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == expected_rc, f"{name}: exit {proc.returncode}\n{output[-3000:]}"


def test_killed_and_resumed_runs_equal_uninterrupted_runs_bitwise(tmp_path):
    # The whole matrix in the default suite (~35 s on 2 cores: 20 processes, two at a time).
    cases = CASES
    configs = sorted({(w, a) for w, a, _ in cases.values()})
    reference = {
        cfg: _start(tmp_path / f"ref-{cfg[0]}-{cfg[1]}", tmp_path / f"ref-{cfg[0]}-{cfg[1]}.json", *cfg, [])
        for cfg in configs
    }
    crashed = {
        name: _start(tmp_path / name.replace("/", "_"), tmp_path / f"{name.replace('/', '_')}.json", w, a, flag)
        for name, (w, a, flag) in cases.items()
    }
    _wait({str(k): v for k, v in reference.items()}, 0)
    _wait(crashed, 17)  # os._exit(17) from the crash handler
    for name in cases:
        assert not (tmp_path / f"{name.replace('/', '_')}.json").exists(), f"{name} did not crash"
    resumed = {
        name: _start(tmp_path / name.replace("/", "_"), tmp_path / f"{name.replace('/', '_')}.json", w, a, ["--resume"])
        for name, (w, a, _) in cases.items()
    }
    _wait(resumed, 0)
    for name, (workers, accumulation, _) in cases.items():
        want = json.loads((tmp_path / f"ref-{workers}-{accumulation}.json").read_text())
        got = json.loads((tmp_path / f"{name.replace('/', '_')}.json").read_text())
        assert got["resumed_from"], f"{name}: the second run did not resume"
        assert want["resumed_from"] is None
        assert got["losses"] == want["losses"], f"{name}: per-step losses differ"
        assert got["params"] == want["params"], f"{name}: final parameters differ"
        assert got["optimizer"] == want["optimizer"], f"{name}: optimizer state differs"
        assert (got["scheduler"], got["lr"]) == (want["scheduler"], want["lr"]), f"{name}: scheduler differs"
        assert got["optimizer_steps"] == want["optimizer_steps"] == 36 // accumulation
